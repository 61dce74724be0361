"""The embeddable runtime: onnxruntime + numpy + tokenizers, no torch (sentencepiece, optional, reads
a tokenizer.model that has no exact tokenizer.json).

    import moe_onnx.runtime as rt
    session = rt.load("out/", provider="auto")
    print(session.generate("def fib(n):", max_new_tokens=32).text)
"""

from moe_onnx.runtime.cache import KVCache
from moe_onnx.runtime.generate import GenerationResult, Token
from moe_onnx.runtime.providers import ProviderError
from moe_onnx.runtime.session import RuntimeInputError, Session, load

__all__ = ["KVCache", "GenerationResult", "ProviderError", "RuntimeInputError", "Session", "Token", "load"]
