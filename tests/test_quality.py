"""Perplexity and routing statistics through the ONNX graph agree with PyTorch on the same windows."""


import numpy as np
import pytest
from click.testing import CliRunner
from models import TEXT_FILE, export_with_tokenizer, make_model

import moe_onnx
from moe_onnx.cli import main
from moe_onnx.evaluation import evaluate, token_windows, torch_quality


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_with_tokenizer("mixtral", tmp_path_factory.mktemp("quality"))


def test_perplexity_matches_pytorch(exported):
    model, out = exported
    report = evaluate(out, [TEXT_FILE], window=64, max_windows=6, routing=True)
    windows = token_windows(out / "tokenizer.json", [TEXT_FILE], 64)[:6]
    reference = torch_quality(model, windows)
    assert report.tokens == reference.tokens == 6 * 63
    assert abs(report.perplexity - reference.perplexity) / reference.perplexity < 1e-4
    # Routing: every layer routes each of the 6 x 64 tokens to k = 3 experts.
    assert sorted(report.routing) == [0, 1, 2]
    for counts in report.routing.values():
        assert sum(counts) == 6 * 64 * 3 and len(counts) == 6


def test_routing_counts_match_pytorch_router(exported):
    """Tokens per expert from the ONNX graph equal the PyTorch router's top-k choices."""
    import torch

    model, out = exported
    windows = token_windows(out / "tokenizer.json", [TEXT_FILE], 32)[:2]
    report = evaluate(out, [TEXT_FILE], window=32, max_windows=2, routing=True)
    with torch.no_grad():
        result = model(input_ids=torch.from_numpy(windows), output_router_logits=True)
    for layer, logits in enumerate(result.router_logits):
        chosen = torch.topk(logits.float().softmax(-1), 3, dim=-1).indices.reshape(-1).numpy()
        assert report.routing[layer] == np.bincount(chosen, minlength=6).tolist()


def test_eval_cli(exported):
    _, out = exported
    result = CliRunner().invoke(main, ["eval", str(out), "--text-files", str(TEXT_FILE), "--window", "64",
                                       "--max-windows", "2", "--routing"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "layer  0 tokens per expert" in result.output


def test_eval_without_tokenizer_is_a_clear_error(tmp_path):
    out = moe_onnx.export(make_model("llama"), tmp_path / "out")
    result = CliRunner().invoke(main, ["eval", str(out), "--text-files", str(TEXT_FILE)])
    assert result.exit_code != 0 and "tokenizer.json" in result.output and "Traceback" not in result.output
