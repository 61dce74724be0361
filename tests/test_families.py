"""What every MoE family gets beyond parity (issue: the edge MoE families): routing statistics from
``eval --routing`` (per MoE layer, k choices per token, the perplexity transformers gives on the
same windows) and ``moe-onnx bench OUT`` over an export of each, in one call; and the group
routers' choices against transformers' own."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from models import CASES, COMMON, TEXT_FILE, export_with_tokenizer, make_model

import moe_onnx
from moe_onnx import manifest
from moe_onnx.cli import main
from moe_onnx.evaluation import evaluate, token_windows
from moe_onnx.exporter import families
from moe_onnx.exporter.config import Config


def _is_moe(case: str) -> bool:
    model_type, config_cls, _, extra = CASES[case]
    return families.get(model_type).spec(Config(config_cls(**{**COMMON, **extra}).to_dict())).moe is not None


# One case per MoE model_type (its first in CASES).
MOE_CASES = sorted({model_type: case for case, (model_type, *_) in reversed(CASES.items())
                    if _is_moe(case)}.values())


def test_every_moe_family_is_covered():
    """Every registered family whose spec has experts has a case here, and these are MoE."""
    assert {CASES[c][0] for c in MOE_CASES} == {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe",
                                                "granitemoeshared", "phimoe", "ernie4_5_moe", "gpt_oss",
                                                "glm4_moe", "deepseek_v2", "deepseek_v3", "lfm2_moe", "afmoe",
                                                "granitemoehybrid", "qwen3_next", "qwen3_5_moe",
                                                "qwen3_5_moe_text"}


@pytest.mark.parametrize("case", MOE_CASES)
def test_eval_routing_counts_every_moe_layer(case, tmp_path):
    model, out = export_with_tokenizer(case, tmp_path)
    spec = manifest.read(out).spec
    windows = token_windows(out / "tokenizer.json", [TEXT_FILE], 32)[:2]
    report = evaluate(out, [TEXT_FILE], window=32, max_windows=2, routing=True)
    moe_layers = [i for i in range(spec.num_layers) if spec.is_moe_layer(i)]
    assert sorted(report.routing) == moe_layers
    for counts in report.routing.values():
        assert len(counts) == spec.moe.num_experts and sum(counts) == windows.size * spec.moe.top_k
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(windows)).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            torch.from_numpy(windows[:, 1:]).reshape(-1))
    assert report.perplexity == pytest.approx(float(nll.exp()), rel=1e-4)


def test_bench_takes_an_export_of_every_moe_family(tmp_path):
    outs = [str(moe_onnx.export(make_model(case), tmp_path / case)) for case in MOE_CASES]
    args = ["bench", *outs, "--per-session-threads", "--providers", "cpu", "--rounds", "1",
            "--decode-steps", "2", "--prompt-lens", "4", "--decode-contexts", "4",
            "--json", str(tmp_path / "b.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    want = {(c, p) for c in MOE_CASES for p in ("prefill", "decode")}
    assert {(r["model"], r["phase"]) for r in rows} == want
    assert all(r["p50_ms"] > 0 for r in rows)


@pytest.mark.parametrize("case", ["glm4_moe", "deepseek_v3", "deepseek_v2_groups"])
def test_group_routers_choose_the_experts_transformers_chooses(case, tmp_path):
    """Tokens per expert from the graph equal the experts transformers' own routers pick, layer by
    layer (layer 0 is dense): Glm4MoeTopkRouter and DeepseekV3TopkRouter (sigmoid + selection bias,
    group-limited) and DeepseekV2's group_limited_greedy softmax."""
    model, out = export_with_tokenizer(case, tmp_path)
    windows = token_windows(out / "tokenizer.json", [TEXT_FILE], 32)[:2]
    report = evaluate(out, [TEXT_FILE], window=32, max_windows=2, routing=True)
    assert sorted(report.routing) == [1, 2]
    chosen = {}
    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(
        lambda module, args, output, i=i: chosen.__setitem__(i, output[2].reshape(-1).numpy()))
        for i in (1, 2)]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(windows))
    for hook in hooks:
        hook.remove()
    for layer in (1, 2):
        assert report.routing[layer] == np.bincount(chosen[layer], minlength=8).tolist()
