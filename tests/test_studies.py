"""Every study in ``studies/`` (the scripts behind BENCHMARKS.md) runs on a tiny model and prints
the figures it promises: rows per variant, numbers where numbers belong. Timings are never
asserted. Studies that give onnxruntime one process-wide thread pool run in a child process (the
pool would bind every later session of the pytest process); those run from the repository root,
as ``python -m studies.NAME`` does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models import make_model

import moe_onnx

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def _study(name: str, *args: str, timeout: int = 300) -> str:
    """``python -m studies.NAME ARGS`` from the repository root; its stdout (stderr on failure)."""
    result = subprocess.run([sys.executable, "-m", f"studies.{name}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _llama_cpp_build() -> str | None:
    """scripts/build_llama_cpp.sh's build where it put it, or None (CI builds none)."""
    from moe_onnx.benchmarks.llama_cpp import LlamaCpp
    from moe_onnx.errors import MoeOnnxError

    where = os.environ.get("MOE_ONNX_LLAMA_CPP_DIR", str(Path.home() / ".cache" / "moe-onnx" / "llama.cpp"))
    try:
        LlamaCpp.locate(where)
    except MoeOnnxError:
        return None
    return where


def test_edge_scale_exports_and_times_a_tiny_checkpoint(tmp_path):
    """The headline study's own path: checkpoint written as bf16 shards, exported to int4 in a child,
    decode and prefill timed through the runtime; llama.cpp too where a build is found."""
    args = ["--tiny", "--work", str(tmp_path), "--context", "8", "--prompt", "4", "--steps", "1",
            "--rounds", "1", "--threads", "1"]
    llama = _llama_cpp_build()
    if llama:
        args += ["--llama-cpp", llama]
    out = _study("edge_scale", *args)
    assert re.search(rf"checkpoint: {NUMBER} GB bf16", out), out
    assert re.search(r"export --weights int4 --block-size 32 --moe-impl dispatch --kv-cache concat: "
                     rf"{NUMBER} s, peak RSS {NUMBER} MB", out), out
    # 2 layers of 8 experts (top-2) of width 32 on hidden 64, vocabulary 512: ~0.14 M params
    assert re.search(r"params total 0\.00 B", out), out
    assert re.search(rf"moe-onnx dispatch +prefill 4 tokens +{NUMBER} ms +decode at context 8: "
                     rf"+{NUMBER} ms/token", out), out
    assert not (tmp_path / "checkpoint").exists()  # deleted without --keep
    if llama:
        assert "llama.cpp q4_0 / moe-onnx dispatch" in out, out


def test_edge_scale_checkpoint_has_the_olmoe_layout(tmp_path):
    import json

    from studies import edge_scale

    size = edge_scale.write_checkpoint(tmp_path, scale=1.0, tiny=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_experts"] == 8 and config["hidden_size"] == 64
    names = index["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names and "lm_head.weight" in names
    assert index["metadata"]["total_size"] == size == 2 * sum(
        int(np.prod(shape)) for _, shape in edge_scale._tensors(config))


def test_kernel_costs_prints_every_section(capsys):
    from studies import kernel_costs

    kernel_costs.main(["--tiny", "--rounds", "1", "--runs", "1", "--contexts", "8"])
    out = capsys.readouterr().out
    for line in ("Split + Concat", "MatMulNBits, 0 rows", "If, not taken", "If, taken, 1 row",
                 "expert gate_up int4", "lm_head int8", "qkv int8 per-column", "qkv fp32", "Attention op @8",
                 "spelled out @8", "gathered int8 of 2: MatMulInteger"):
        assert re.search(rf"{re.escape(line)}.* {NUMBER} ", out), line


def test_threading_modes_times_every_mode():
    out = _study("threading_modes", "--tiny", "--context", "4", "--steps", "2", "--rounds", "1",
                 "--threads", "1")
    for mode in ("per-session", "no-spin", "shared"):
        assert re.search(rf"round 0  {mode} +alone +{NUMBER} / +{NUMBER} +after_b +{NUMBER}", out), out


def test_decode_ab_compares_builtin_caches():
    out = _study("decode_ab", "--builtin", "fine", "--tiny", "--contexts", "4,8", "--rounds", "1",
                 "--steps", "1", "--threads", "1", "--weights", "int4,int4:16")
    rows = [line.split()[0] for line in out.splitlines() if "@" in line]
    assert sorted(set(rows)) == ["fine-int4-concat", "fine-int4-static-fp16", "fine-int4b16-concat",
                                 "fine-int4b16-static-fp16"] and len(rows) == 8


def test_step_profile_prints_kernels_by_op(tmp_path, capsys):
    from studies import step_profile

    out = moe_onnx.export(make_model("mixtral"), tmp_path / "out")
    step_profile.main([str(out), "--contexts", "4,8", "--threads", "1", "--steps", "2", "--top", "3"])
    text = capsys.readouterr().out
    for context in (4, 8):
        assert re.search(rf"@ context {context}: [0-9]+ kernels, {NUMBER} ms of kernel time", text), text
    assert len(re.findall(r"^  \S+ +[0-9]+ kernels", text, re.M)) == 6  # --top 3 per context


def test_logits_to_keep_times_both_settings(capsys):
    from studies import logits_to_keep

    logits_to_keep.main(["--tiny", "--vocab", "256", "--lengths", "4,8", "--rounds", "1", "--threads", "1"])
    text = capsys.readouterr().out
    for n in (4, 8):
        assert re.search(rf"{n} tokens: every position +{NUMBER} +last only +{NUMBER}", text), text


def test_runtime_overhead_times_both_loops(capsys):
    from studies import runtime_overhead

    runtime_overhead.main(["--hidden", "64", "--layers", "1", "--tokens", "2", "--rounds", "1",
                           "--threads", "1"])
    text = capsys.readouterr().out
    assert re.search(rf"bare InferenceSession.run loop +{NUMBER} ms/token", text), text
    assert re.search(rf"Session.generate +{NUMBER} ms/token +\(ratio {NUMBER}", text), text


def test_sparsity_times_every_impl(capsys):
    from studies import sparsity

    sparsity.main(["--experts", "4", "--top-k", "1", "--hidden", "32", "--expert-size", "16", "--layers", "1",
                   "--tokens", "8", "--rounds", "1", "--threads", "1"])
    text = capsys.readouterr().out
    assert "2 rows per expert" in text, text  # 8 tokens x k=1 / 4 experts
    for impl in ("dispatch", "gather", "dense"):
        assert re.search(rf"^  {impl} +{NUMBER} ms .*faster than dense", text, re.M), text


@pytest.mark.skipif(not Path("/usr/bin/time").is_file(), reason="export_memory reads /usr/bin/time -v")
def test_export_memory_measures_a_tiny_export(capsys):
    from studies import export_memory

    export_memory.main(["--tiny", "--gb", "0.001"])
    text = capsys.readouterr().out
    assert re.search(rf"checkpoint {NUMBER} GB .* -> export {NUMBER} GB", text), text
    assert re.search(rf"peak RSS {NUMBER} MB; budget .*(within|OVER) budget", text), text
    assert "onnxruntime runs the export: logits (1, 1, 512)" in text, text


def test_ort_quantizer_scores_three_exports(tmp_path, capsys):
    from studies import ort_quantizer

    ort_quantizer.main(["--work", str(tmp_path), "--windows", "2"])
    text = capsys.readouterr().out
    assert "ORT MatMulNBitsQuantizer:" in text
    for name in ("fp32", "moe-onnx --weights int4", "ORT MatMulNBitsQuantizer int4"):
        assert re.search(rf"^  {re.escape(name)} +perplexity +{NUMBER}", text, re.M), text
    # ours quantizes while exporting: its expert MatMuls are DequantizeLinear -> MatMul, ORT's MatMulNBits
    ours = re.search(r"moe-onnx --weights int4 .*MatMulNBits +([0-9]+) +DequantizeLinear +([0-9]+)", text)
    theirs = re.search(r"ORT MatMulNBitsQuantizer int4 .*MatMulNBits +([0-9]+)", text)
    assert int(ours.group(2)) > 0 and int(theirs.group(1)) > 0, text


def test_batch_decode_counts_every_row(tmp_path):
    """``studies.batch_decode``: left-padded prompts of different lengths, every row decoding all
    its tokens: the rate is every row's tokens over the decode time, and a short row is refused."""
    from types import SimpleNamespace

    from studies import batch_decode

    prompts = batch_decode.left_padded_prompts(4, 12, 128, np.random.default_rng(0))
    assert [len(p) for p in prompts] == [12, 4, 1, 1]
    full = SimpleNamespace(ids=[[1, 2, 3]] * 4, decode_tokens=8, decode_seconds=2.0)
    assert batch_decode.decode_rate(full, new=3) == 4.0
    with pytest.raises(RuntimeError, match="stopped early"):
        batch_decode.decode_rate(SimpleNamespace(ids=[[1, 2, 3], [1]], decode_tokens=3, decode_seconds=1.0),
                                 new=3)
    out = moe_onnx.export(make_model("mixtral", eos_token_id=None), tmp_path / "out")
    rates, tokens = batch_decode.ours(out, [1, 4], prompt=12, new=3, rounds=1, threads=1)
    # the first token of each row comes from the prefill: decode makes the other new - 1
    assert tokens == {1: 2, 4: 8} and set(rates) == {1, 4} and all(r > 0 for r in rates.values())


def test_batch_decode_main_prints_every_batch(capsys):
    from studies import batch_decode

    batch_decode.main(["--tiny", "--batches", "1,2", "--prompt", "4", "--new", "2", "--rounds", "1",
                       "--threads", "1"])
    text = capsys.readouterr().out
    for b in (1, 2):
        assert re.search(rf"batch +{b} +moe-onnx +{NUMBER}", text), text


def test_serve_load_main_against_a_live_server(tmp_path, capsys):
    pytest.importorskip("starlette", reason="the server needs the serve extra")
    from test_server_support import LiveServer, tiny_export

    import moe_onnx.runtime as rt
    from moe_onnx.server.app import build_app
    from moe_onnx.server.engine import ServedModel
    from studies import serve_load

    session = rt.load(tiny_export(tmp_path / "tiny"), provider="cpu", threads=1)
    with LiveServer(build_app([ServedModel("tiny", session, max_batch=2, max_queue=4)])) as live:
        serve_load.main(["--url", live.url, "--clients", "2", "--requests", "4", "--max-tokens", "2",
                         "--json", str(tmp_path / "load.json")])
    import json

    report = json.loads((tmp_path / "load.json").read_text())
    assert report["ok"] + report["rejected"] == 4 and report["bad"] == 0, report


def test_edge_memory_measures_a_tiny_export_in_children(tmp_path):
    """Load, memory and decode of both loads (the prepared copy and the export as it is), each in a
    child process; a cap (a cgroup) only where this machine lets the tests make one."""
    model = make_model("olmoe", num_hidden_layers=2)
    out = moe_onnx.export(model, tmp_path / "int4", weights="int4")
    table = _study("edge_memory", str(out), "--caps", "none", "--texts", "skewed,uniform",
                   "--ort-cache", "on,off", "--prompt", "8", "--steps", "2", "--threads", "1")
    assert re.search(rf"{NUMBER} GiB of model files; .* routes to {NUMBER} MB of expert weights", table)
    rows = [line for line in table.splitlines() if line.startswith("| moe-onnx")]
    assert len(rows) == 4, table
    for row in rows:  # load s, anon / file GiB, peak GiB, decode ms, MB read, share in memory, wall s
        assert re.search(rf"\| {NUMBER} \| {NUMBER} / {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| "
                         rf"{NUMBER}% \| {NUMBER} \|$", row), row
    assert (out / "ort-cache" / "cache.json").is_file()  # "on" built the prepared copy


def test_load_time_times_the_cli_and_the_runtime_in_children(tmp_path):
    """Process wall of ``moe-onnx run`` and of a child that splits it into imports, load and first
    token, with onnxruntime's parallel pre-packing on and off, from the prepared copy."""
    out = moe_onnx.export(make_model("olmoe", num_hidden_layers=2), tmp_path / "int4", weights="int4")
    table = _study("load_time", str(out), "--runs", "1", "--threads", "2", "--parallel-prepack", "on,off")
    rows = [line for line in table.splitlines() if line.startswith("| moe-onnx run")]
    assert len(rows) == 2, table
    for mode in ("on", "off"):
        name = f"| rt.load + 1 token (parallel pre-pack {mode})"
        row = next(line for line in table.splitlines() if line.startswith(name))
        # process wall, imports, load, first token: each a median and its range
        assert len(re.findall(rf"\| {NUMBER} \({NUMBER}-{NUMBER}\) ", row)) == 4, row
    runs = json.loads(table.strip().splitlines()[-1])
    assert all(r["prepared"] for name, rs in runs.items() if name.startswith("rt.load") for r in rs)


def test_recurrent_prefill_times_both_forms_of_each_mixer(tmp_path):
    """Scan and chunked forms of both recurrent mixers at a released layer's size, one decode token
    and a short prefill: both forms run and agree."""
    import json

    from studies import recurrent_prefill

    out = str(tmp_path / "r.json")
    recurrent_prefill.main(["--lengths", "1,8", "--reps", "1", "--threads", "1", "--json", out])
    rows = json.loads((tmp_path / "r.json").read_text())
    expected = {(m, n) for m in recurrent_prefill.MIXERS for n in (1, 8)}
    assert {(r["mixer"], r["tokens"]) for r in rows} == expected
    assert all(r["scan_ms"] > 0 and r["chunked_ms"] > 0 and r["rel_diff"] < 1e-4 for r in rows), rows


def test_serve_load_side_by_side_without_llama_cpp_measures_ours_and_says_so(tmp_path, capsys):
    """``--checkpoint`` without ``--llama-cpp``: the checkpoint exported, the same seeded requests
    streamed to a fresh ``moe-onnx serve`` per load (the 1-client burst first, as the reference),
    every answer ok, and the llama-server side skipped with its reason."""
    pytest.importorskip("starlette", reason="the server needs the serve extra")
    import json

    from models import byte_level_tokenizer

    from studies import serve_load, serve_side_by_side

    tokenizer = byte_level_tokenizer()
    model = make_model("qwen3_moe", vocab_size=tokenizer.get_vocab_size(), eos_token_id=None,
                       bos_token_id=None, pad_token_id=None)
    checkpoint = tmp_path / "tiny"
    model.save_pretrained(checkpoint)
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    out = tmp_path / "sbs.json"
    serve_load.main(["--checkpoint", str(checkpoint), "--work", str(tmp_path / "work"), "--weights", "int4",
                     "--loads", "2", "--arrivals", "burst,poisson", "--rate", "50", "--requests", "4",
                     "--short", "3,6", "--long", "10,12", "--answers", "2,4", "--threads", "1",
                     "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["llama_server"] == serve_side_by_side.LLAMA_SKIPPED
    assert serve_side_by_side.LLAMA_SKIPPED in capsys.readouterr().err
    runs = report["runs"]
    assert [(r["server"], r["clients"], r["arrivals"]) for r in runs] == [
        ("moe-onnx", 2, "burst"), ("moe-onnx", 2, "poisson")]
    for r in runs:
        assert (r["ok"], r["errors"]) == (4, 0), r["problems"]
        assert r["tokens_per_s"] > 0 and r["ttft_p99_ms"] > 0 and r["completion_tokens"] >= 8


def test_hybrid_scale_writes_the_released_layout_exports_and_times_it(tmp_path):
    """LFM2-8B-A1B's layout cut to 4 layers of hidden 64: the tensor names transformers saves,
    exported to int4, stable (prefill against token by token), then load, prefill and decode timed
    in a child process; no llama.cpp (CI builds none)."""
    from safetensors import safe_open
    from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM

    from studies import hybrid_scale

    cfg = hybrid_scale.lfm2_moe_config(layers=4, hidden=64, vocab=512)
    assert cfg["layer_types"] == ["conv", "conv", "full_attention", "conv"] and cfg["num_dense_layers"] == 2
    fields = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
    Lfm2MoeForCausalLM(Lfm2MoeConfig(**fields)).save_pretrained(tmp_path / "hf")  # per-expert names
    with safe_open(tmp_path / "hf" / "model.safetensors", "np") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {name: tuple(shape) for name, shape in hybrid_scale.lfm2_moe_tensors(cfg)} == saved
    released = hybrid_scale.lfm2_moe_tensors(hybrid_scale.lfm2_moe_config())
    assert 8.3e9 < sum(int(np.prod(shape)) for _, shape in released) < 8.4e9  # 8.3 B parameters
    out = _study("hybrid_scale", str(tmp_path / "run"), "--layers", "4", "--hidden", "64", "--vocab", "512",
                 "--contexts", "8,16", "--prompt", "8", "--steps", "2", "--rounds", "1", "--threads", "1",
                 "--wait-quiet", "0")
    assert re.search(rf"checkpoint: {NUMBER} GB bf16", out), out
    assert re.search(rf"export --weights int4 --kv-cache concat: {NUMBER} s, peak RSS {NUMBER} MB", out), out
    assert "logits finite True" in out and "the same when repeated: True" in out, out
    row = (rf"\| moe-onnx int4 \| {NUMBER} \| {NUMBER} \({NUMBER} \+ {NUMBER}\) \| {NUMBER} \| {NUMBER} \| "
           rf"{NUMBER} \|")
    assert re.search(row, out), out  # load s, peak RSS (anon + file), prefill, decode at both contexts
    assert not (tmp_path / "run" / "checkpoint").exists()  # deleted without --keep


def test_provider_matrix_fills_its_cells(tmp_path):
    """Two exports on the runtimes every machine has: each cell runs, with its parity against
    onnxruntime CPU's float32 kernels and a decode time; the markdown table has a row per runtime."""
    out = _study("provider_matrix", "--work", str(tmp_path / "work"), "--exports", "fp32,int4", "--runtimes",
                 "onnxruntime CPU,onnx ReferenceEvaluator", "--steps", "2", "--context", "8",
                 "--json", str(tmp_path / "m.json"))
    cells = json.loads((tmp_path / "m.json").read_text())
    assert set(cells) == {"fp32", "int4"}
    for export in cells.values():
        for runtime, c in export.items():
            assert c["runs"] and c["decode_ms"] > 0, (runtime, c)
            assert c["error"] < (1e-5 if runtime == "onnx ReferenceEvaluator" else 5e-2), (runtime, c)
    assert "| onnxruntime CPU | rel " in out and "| onnx ReferenceEvaluator | rel " in out, out
