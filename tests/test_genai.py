"""onnxruntime-genai (from PyPI) runs an export through the genai_config.json written beside it."""

import platform

import pytest
import torch
from models import make_model

import moe_onnx

if platform.system() != "Linux" or platform.machine() != "x86_64":
    # pyproject.toml's test extra installs onnxruntime-genai-cuda only where
    # sys_platform == 'linux' and platform_machine == 'x86_64'.
    pytest.skip(f"onnxruntime-genai-cuda (the test extra) is installed on Linux x86-64 only, not on "
                f"{platform.system()} {platform.machine()}", allow_module_level=True)

# On Linux x86-64 the test extra installed it: a broken or missing import fails here, never skips.
import onnxruntime_genai as og  # noqa: E402


def _genai_greedy(out, prompt: list[int], new_tokens: int) -> list[int]:
    genai_model = og.Model(str(out))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("case", ["qwen3_moe", "llama", "gpt_oss", "lfm2_moe", "afmoe", "granitemoehybrid",
                                  "qwen3_next", "qwen3_5_moe"])
def test_genai_greedy_matches_transformers(case, tmp_path):
    model = make_model(case, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    out = moe_onnx.export(model, tmp_path / "out")
    prompt = [5, 17, 33, 2, 9, 64]
    tokens = _genai_greedy(out, prompt, 12)
    reference = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt):].tolist()
    # genai stops early only at the EOS id it was given (0 when the model has none).
    assert len(tokens) == 12 or tokens[-1] == 0
    assert tokens == reference[: len(tokens)]


def test_genai_runs_an_int4_export_as_our_runtime_does(tmp_path):
    import moe_onnx.runtime as rt

    model = make_model("mixtral", eos_token_id=None, bos_token_id=None, pad_token_id=None)
    out = moe_onnx.export(model, tmp_path / "int4", weights="int4")
    prompt = [5, 17, 33, 2, 9, 64]
    tokens = _genai_greedy(out, prompt, 8)
    ours = rt.load(out, provider="cpu").generate(prompt, max_new_tokens=8).ids[0]
    assert len(tokens) == 8 or tokens[-1] == 0
    assert tokens == ours[: len(tokens)]
