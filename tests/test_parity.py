"""Every architecture against its PyTorch reference: left-padded batch of 2, prefill, 3 decode steps."""

import pytest
from models import CASES, make_model

import moe_onnx
from moe_onnx import manifest
from moe_onnx.errors import ExportError
from moe_onnx.exporter import families
from moe_onnx.exporter.verify import compare


def test_every_registered_architecture_has_a_parity_case():
    covered = {model_type for model_type, *_ in CASES.values()}
    assert covered == set(families.supported())


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_fp32(case, tmp_path):
    model = make_model(case)
    model.save_pretrained(tmp_path / "src")
    out = moe_onnx.export(tmp_path / "src", tmp_path / "out")
    report = compare(model, out, manifest.read(out).spec, lengths=(9, 5), decode_steps=3)
    assert report.max_rel <= 1e-4, report
    assert report.argmax_agree == 1.0, report


# Every impl of every router flavour; phimoe (sparsemixer), ernie4_5_moe (selection bias + norm_min),
# glm4_moe, deepseek_v2's group-limited routing and deepseek_v3 have no fused form (refused, below).
NO_FUSED = ("phimoe", "ernie4_5_moe", "glm4_moe", "deepseek_v2_groups", "deepseek_v3")
IMPL_CASES = [(case, impl) for case in ("mixtral", "qwen2_moe", "granitemoeshared", "phimoe", "ernie4_5_moe",
                                        "gpt_oss", "glm4_moe", "deepseek_v2", "deepseek_v2_groups",
                                        "deepseek_v3", "granitemoehybrid", "qwen3_next", "qwen3_5_moe")
              for impl in ("dispatch", "gather", "dense", "fused")
              if not (impl == "fused" and case in NO_FUSED)]


@pytest.mark.parametrize("case, impl", IMPL_CASES)
def test_every_moe_impl_matches(case, impl, tmp_path):
    model = make_model(case, seed=1)
    out = moe_onnx.export(model, tmp_path / "out", moe_impl=impl)
    report = compare(model, out, manifest.read(out).spec, lengths=(7, 2), decode_steps=3)
    assert report.max_rel <= 1e-4, report
    assert report.argmax_agree == 1.0, report


@pytest.mark.parametrize("case, message", [
    ("phimoe", "fused cannot express the sparsemixer router"),
    ("ernie4_5_moe", "fused cannot express a selection bias"),
    ("glm4_moe", "fused cannot express a selection bias"),
    ("deepseek_v2_groups", "fused cannot express a selection bias, a clamped renormalisation or a scaling"),
    ("deepseek_v3", "fused cannot express a selection bias"),
])
def test_fused_impl_refuses_what_the_moe_op_cannot_express(case, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        moe_onnx.export(make_model(case), tmp_path / "out", moe_impl="fused")
    assert not (tmp_path / "out").exists()


def test_fp16_export_is_close(tmp_path):
    model = make_model("qwen3_moe", seed=2)
    out = moe_onnx.export(model, tmp_path / "out", dtype="fp16")
    report = compare(model, out, manifest.read(out).spec, lengths=(6, 3), decode_steps=2)
    assert report.max_rel <= 2e-2, report
    # As in fp32, every compared position's argmax agrees (measured: 13 of 13, max rel err 7e-4).
    # fp16 can flip only a near-tie: a position whose top-two reference logits are closer than twice
    # its error. This model has none; qwen2 with seed 2 has one (margin 1e-4 < error 1.7e-3, 12 of 13).
    assert report.argmax_agree == 1.0, report
