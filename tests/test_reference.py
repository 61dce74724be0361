"""The reference models: the training entry point, the shipped checkpoints, and the demo."""

import json
import sys

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

import moe_onnx
from moe_onnx.cli import main
from moe_onnx.evaluation import onnx_quality, token_windows
from moe_onnx.reference import MODEL_NAMES, default_models_dir
from moe_onnx.reference.corpus import files_digest, stdlib_files
from moe_onnx.reference.train import main as train_main
from moe_onnx.spec import ModelSpec


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train_main(["--tiny", "--steps", "2", "--out", str(out), "--threads", "1"])
    return out


def test_training_entry_point(tiny_models):
    train, held_out = stdlib_files()
    assert held_out and not set(train) & set(held_out)
    for name in MODEL_NAMES:
        AutoModelForCausalLM.from_pretrained(tiny_models / name)
        Tokenizer.from_file(str(tiny_models / name / "tokenizer.json"))
        record = json.loads((tiny_models / name / "training.json").read_text())
        assert record["tokens_seen"] == 2 * 2 * 32 and record["heldout_ppl"] > 1


def test_demo_runs_end_to_end(tiny_models, tmp_path):
    args = ["demo", "--models", str(tiny_models), "--work", str(tmp_path / "demo")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "greedy completion" in result.output and "dense-total" in result.output


SHIPPED = default_models_dir()


def test_shipped_reference_models_have_the_documented_shapes():
    specs = {}
    for name in MODEL_NAMES:
        cfg = json.loads((SHIPPED / name / "config.json").read_text())
        specs[name] = cfg
    assert specs["moe"]["model_type"] == "mixtral"
    assert specs["moe"]["num_local_experts"] == 8 and specs["moe"]["num_experts_per_tok"] == 2
    from moe_onnx.exporter import families
    from moe_onnx.exporter.config import Config

    counts = {n: families.get(c["model_type"]).spec(Config(c)).parameter_counts() for n, c in specs.items()}
    assert abs(counts["dense-active"]["active_per_token"] / counts["moe"]["active_per_token"] - 1) < 0.05
    assert abs(counts["dense-total"]["total"] / counts["moe"]["total"] - 1) < 0.10
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
