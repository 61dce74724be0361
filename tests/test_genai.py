"""onnxruntime-genai (from PyPI) runs an export through the genai_config.json written beside it."""

import pytest
import torch
from models import make_model

import moe_onnx

og = pytest.importorskip("onnxruntime_genai")


@pytest.mark.parametrize("case", ["qwen3_moe", "llama"])
def test_genai_greedy_matches_transformers(case, tmp_path):
    model = make_model(case, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    out = moe_onnx.export(model, tmp_path / "out")
    prompt = [5, 17, 33, 2, 9, 64]
    genai_model = og.Model(str(out))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    reference = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt):].tolist()
    # genai stops early only at the EOS id it was given (0 when the model has none).
    assert len(tokens) == 12 or tokens[-1] == 0
    assert tokens == reference[: len(tokens)]
