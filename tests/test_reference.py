"""The reference checkpoints shipped in reference_models/ (shapes, training records, perplexity
through ONNX against the recorded PyTorch figure) and the demo that runs them end to end."""

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

import moe_onnx
from moe_onnx.cli import main
from moe_onnx.evaluation import onnx_quality, token_windows
from moe_onnx.exporter import families
from moe_onnx.exporter.config import Config
from moe_onnx.reference import MODEL_NAMES, default_models_dir
from moe_onnx.reference.corpus import files_digest, stdlib_files
from moe_onnx.reference.train import parameter_counts
from moe_onnx.spec import ModelSpec

SHIPPED = default_models_dir()


def test_shipped_reference_models_have_the_documented_shapes():
    models = {n: AutoModelForCausalLM.from_pretrained(SHIPPED / n) for n in MODEL_NAMES}
    moe = models["moe"].config
    assert moe.model_type == "mixtral" and moe.num_local_experts == 8 and moe.num_experts_per_tok == 2
    assert models["dense-active"].config.intermediate_size == 2 * moe.intermediate_size
    assert models["dense-total"].config.intermediate_size == 8 * moe.intermediate_size
    for twin in ("dense-active", "dense-total"):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "vocab_size"):
            assert getattr(models[twin].config, key) == getattr(moe, key), (twin, key)
    assert all(p.dtype == torch.float32 for m in models.values() for p in m.parameters())
    # The twins match the MoE in active and in total parameters, counted by the training code and
    # by the exporter's spec alike.
    for counts in ({n: parameter_counts(m) for n, m in models.items()}, _spec_counts()):
        assert abs(counts["dense-active"]["active_per_token"] / counts["moe"]["active_per_token"] - 1) < 0.05
        assert abs(counts["dense-total"]["total"] / counts["moe"]["total"] - 1) < 0.10


def _spec_counts() -> dict[str, dict]:
    configs = {n: json.loads((SHIPPED / n / "config.json").read_text()) for n in MODEL_NAMES}
    return {n: families.get(c["model_type"]).spec(Config(c)).parameter_counts() for n, c in configs.items()}


def test_shipped_reference_models_record_their_training():
    records = {n: json.loads((SHIPPED / n / "training.json").read_text()) for n in MODEL_NAMES}
    assert len({r["tokens_seen"] for r in records.values()}) == 1
    assert len({r["train_files_digest"] for r in records.values()}) == 1
    for name, r in records.items():
        assert r["parameters"] == parameter_counts(AutoModelForCausalLM.from_pretrained(SHIPPED / name))
        assert 1 < r["heldout_ppl"] < r["budget"]["vocab_size"]
        Tokenizer.from_file(str(SHIPPED / name / "tokenizer.json"))
    assert len(records["moe"]["expert_load"]["tokens_per_expert"]) == records["moe"]["budget"]["layers"]
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 32e6


def test_shipped_moe_perplexity_through_onnx_matches_pytorch(tmp_path):
    out = moe_onnx.export(SHIPPED / "moe", tmp_path / "moe")
    training = json.loads((SHIPPED / "moe" / "training.json").read_text())
    held_out = [f for f in stdlib_files()[1] if f.name in set(training["heldout_files"])]
    digest = files_digest(held_out)
    if digest != training["heldout_files_digest"]:
        pytest.skip(
            f"the held-out text is the running Python's standard library ({sys.version.split()[0]} here, "
            f"{training['versions']['python']} when recorded): its held-out files hash to {digest}, not the "
            f"recorded {training['heldout_files_digest']}, so the recorded perplexity is of other text"
        )
    windows = token_windows(out / "tokenizer.json", held_out, training["budget"]["context"])
    report = onnx_quality(out, windows[: training["budget"]["eval_windows"]])
    # Same windows as recorded, then the same perplexity: the ONNX graph against PyTorch's figure
    # recorded at the end of training (fp32 both; measured 2e-9 apart, the tolerance is 1e-5).
    assert (report.windows, report.tokens) == (training["heldout_windows"], training["heldout_tokens"])
    assert report.perplexity == pytest.approx(training["heldout_ppl"], rel=1e-5)
    assert ModelSpec.from_dict(json.loads((out / "moe_onnx.json").read_text())["spec"]).moe.num_experts == 8


def test_demo_runs_end_to_end(tiny_reference_models, tmp_path):
    args = ["demo", "--models", str(tiny_reference_models), "--work", str(tmp_path / "demo")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "greedy completion" in result.output and "dense-total" in result.output
