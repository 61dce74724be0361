"""Checkpoint formats: sharded safetensors, pytorch .bin, fused 3-D experts, bf16 weights, in memory."""

import json

import torch
from models import make_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_onnx
from moe_onnx import manifest
from moe_onnx.exporter.verify import compare


def assert_parity(model, out):
    report = compare(model, out, manifest.read(out).spec, lengths=(6, 4), decode_steps=2)
    assert report.max_rel <= 1e-4 and report.argmax_agree == 1.0, report


def test_sharded_safetensors(tmp_path):
    model = make_model("qwen2_moe")
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    assert_parity(model, moe_onnx.export(tmp_path / "src", tmp_path / "out"))


def test_pytorch_bin(tmp_path):
    """pytorch_model.bin with hub names (transformers 5 no longer writes .bin itself)."""
    model = make_model("mixtral")
    model.save_pretrained(tmp_path / "src")
    st = tmp_path / "src" / "model.safetensors"
    torch.save(load_file(str(st)), tmp_path / "src" / "pytorch_model.bin")
    st.unlink()
    assert_parity(model, moe_onnx.export(tmp_path / "src", tmp_path / "out"))


def test_per_expert_names_on_disk(tmp_path):
    """The hub layout (experts.3.w1 / experts.3.gate_proj) as transformers saves it."""
    for case, name in (("mixtral", "block_sparse_moe.experts.0.w1.weight"),
                       ("olmoe", "mlp.experts.0.gate_proj.weight")):
        model = make_model(case)
        model.save_pretrained(tmp_path / case)
        index = (tmp_path / case / "model.safetensors").read_bytes()[:20000]
        assert name.encode() in index
        assert_parity(model, moe_onnx.export(tmp_path / case, tmp_path / f"{case}-out"))


def test_fused_3d_experts_on_disk(tmp_path):
    """A checkpoint holding ``experts.gate_up_proj`` [E, 2F, H] and ``experts.down_proj``."""
    model = make_model("qwen3_moe")
    src = tmp_path / "src"
    src.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(model.config.to_dict()))
    assert_parity(model, moe_onnx.export(src, tmp_path / "out"))


def test_in_memory_model(tmp_path):
    model = make_model("olmoe")
    assert_parity(model, moe_onnx.export(model, tmp_path / "out"))


def test_bf16_checkpoint_to_fp32(tmp_path):
    model = make_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    out = moe_onnx.export(tmp_path / "src", tmp_path / "out")
    # Reload in float32 (not model.float(), which would also round the RoPE buffer to bf16).
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32,
                                                     attn_implementation="eager")
    assert_parity(reference.eval(), out)


def test_manifest_and_side_files(tmp_path):
    model = make_model("qwen2_moe")
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    out = moe_onnx.export(tmp_path / "src", tmp_path / "out")
    manifest = json.loads((out / "moe_onnx.json").read_text())
    assert manifest["model_type"] == "qwen2_moe" and manifest["moe_impl"] == "dispatch"
    params = manifest["params"]
    torch_total = sum(p.numel() for p in model.parameters())
    assert params["total"] == torch_total
    assert params["active_per_token"] < params["total"]
    assert len(manifest["source"]["sha256"]) == 64
    for name in ("tokenizer.json", "generation_config.json", "config.json", "genai_config.json"):
        assert (out / name).exists(), name


def test_sharded_pytorch_bin(tmp_path):
    """pytorch_model-0000x-of-00002.bin shards listed by pytorch_model.bin.index.json."""
    model = make_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    st = tmp_path / "src" / "model.safetensors"
    state = load_file(str(st))
    st.unlink()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / "src" / shard)
        weight_map.update({k: shard for k in keys})
    (tmp_path / "src" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_parity(model, moe_onnx.export(tmp_path / "src", tmp_path / "out"))
