"""The llama.cpp peer without a llama.cpp build: llama-bench's JSON, its arguments, the stub
tokenizer, the per-round sampling, and the note when no build is given (nothing is built here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moe_onnx.benchmarks import llama_cpp
from moe_onnx.cli import main
from moe_onnx.errors import MoeOnnxError

# llama-bench -o json, trimmed to the fields the peer reads plus a few (two tests in one run)
BENCH_JSON = """[
  {
    "build_commit": "0c1e570-dirty",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "backends": "CPU",
    "model_filename": "/tmp/coarse-moe-hf-q4_0.gguf",
    "model_type": "llama 8x0.2B Q4_0",
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "type_k": "f16",
    "type_v": "f16",
    "flash_attn": -1,
    "repack": true,
    "n_prompt": 256,
    "n_gen": 0,
    "n_depth": 0,
    "avg_ns": 50000000,
    "stddev_ns": 1000000,
    "avg_ts": 5120.0,
    "stddev_ts": 100.0,
    "samples_ns": [ 51000000, 49000000, 50000000 ],
    "samples_ts": [ 5019.6, 5224.5, 5120.0 ]
  },
  {
    "build_commit": "0c1e570-dirty",
    "build_number": 1,
    "n_prompt": 0,
    "n_gen": 1,
    "n_depth": 128,
    "samples_ns": [ 2500000, 2400000 ],
    "samples_ts": [ 400.0, 416.7 ]
  }
]
"""


def test_parse_bench_json():
    tests = llama_cpp.parse_bench_json(BENCH_JSON)
    assert [(t["n_prompt"], t["n_gen"], t["n_depth"]) for t in tests] == [(256, 0, 0), (0, 1, 128)]
    assert tests[0]["samples_s"] == pytest.approx([0.051, 0.049, 0.050])
    assert tests[1]["samples_s"] == pytest.approx([0.0025, 0.0024])
    for bad in ("", "main: error: failed to load model", '{"samples_ns": [1]}', '[{"n_prompt": 1}]'):
        with pytest.raises(RuntimeError, match="llama-bench"):
            llama_cpp.parse_bench_json(bad)


def test_bench_args_prefill_and_decode_at_a_context():
    prefill = llama_cpp.bench_args("m.gguf", 2, "prefill", 256, 3)
    assert prefill == ["-m", "m.gguf", "-t", "2", "-p", "256", "-n", "0", "-r", "3", "-o", "json"]
    decode = llama_cpp.bench_args("m.gguf", 2, "decode", 128, 9)
    assert decode == ["-m", "m.gguf", "-t", "2", "-p", "0", "-n", "1", "-d", "128", "-r", "9", "-o", "json"]
    probe = llama_cpp.bench_args("m.gguf", 2, "decode", 2000, 5, "0,1")
    assert probe == ["-m", "m.gguf", "-t", "2", "-p", "0", "-n", "1", "-d", "2000", "-fa", "0,1", "-r", "5",
                     "-o", "json"]


def _fa_json(medians_ns: dict) -> str:
    """llama-bench -fa 0,1 -o json: one test per setting, three samples around each median."""
    return json.dumps([{"flash_attn": int(fa), "samples_ns": [m - 1, m, m + 100 * m]}
                       for fa, m in medians_ns.items()])


def test_flash_attention_probed_once_per_phase_and_length(monkeypatch):
    # the faster setting by median (one slow outlier does not decide it)
    assert llama_cpp.faster_flash_attn(llama_cpp.parse_bench_json(_fa_json({"0": 1000, "1": 2300}))) == "0"
    assert llama_cpp.faster_flash_attn(llama_cpp.parse_bench_json(_fa_json({"0": 3000, "1": 2000}))) == "1"
    with pytest.raises(RuntimeError, match="settings"):
        llama_cpp.faster_flash_attn(llama_cpp.parse_bench_json(_fa_json({"1": 2000})))

    commands = []

    def fake_run(cmd, what, watch_memory=False):
        commands.append(cmd)
        fa = cmd[cmd.index("-fa") + 1]
        depth = int(cmd[cmd.index("-d") + 1]) if "-d" in cmd else 0
        if fa == "0,1":  # at context 2000 attention without flash attention is faster, with it at 128
            return _fa_json({"0": 1000, "1": 2300} if depth == 2000 else {"0": 1500, "1": 1000}), 10.0
        reps = int(cmd[cmd.index("-r") + 1])
        return json.dumps([{"flash_attn": int(fa), "samples_ns": [1000] * reps}]), 10.0

    monkeypatch.setattr(llama_cpp, "_run", fake_run)
    llama = llama_cpp.LlamaCpp(Path("tree"), Path("llama-bench"), Path("llama-quantize"))
    runner = llama_cpp.LlamaBenchRunner(llama, "m.gguf", 2)
    assert runner.samples("decode", 2000, 3) == [1e-6] * 3
    assert runner.samples("decode", 2000, 2) == [1e-6] * 2
    runner.samples("decode", 128, 1)
    fas = [c[c.index("-fa") + 1] for c in commands]
    assert fas == ["0,1", "0", "0", "0,1", "1"]  # one probe per (phase, length), then its choice
    assert runner.flash_attn == {"decode@2000": "0", "decode@128": "1"}
    note = llama_cpp.describe(llama, {"tensors": 1, "types": {"Q4_0": 1}, "bytes": 1e6}, {"flash_attn": 0},
                              runner.flash_attn)
    assert "flash_attn probed: decode@128 on, decode@2000 off" in note


def test_gguf_types_of_the_weight_formats():
    assert [llama_cpp.gguf_type(w) for w in ("fp32", "int8", "int4")] == ["f32", "q8_0", "q4_0"]
    with pytest.raises(MoeOnnxError, match="no llama.cpp counterpart"):
        llama_cpp.gguf_type("fp16")


class FakeRunner:
    """Stands for a LlamaBenchRunner: each call is one 'process' giving ``reps`` samples."""

    def __init__(self):
        self.calls = []

    def samples(self, phase, length, reps):
        self.calls.append((phase, length, reps))
        return [float(len(self.calls) * 10 + i) for i in range(reps)]


def test_one_llama_bench_process_per_round_serves_the_untimed_and_the_timed_runs():
    from moe_onnx.benchmarks.timing import Unit, interleave

    runner = FakeRunner()
    unit = Unit(("m/llama.cpp/q4_0@cpu", "decode", 128), llama_cpp.RoundSamples(runner, "decode", 128, 3), 3)
    samples = interleave([unit], rounds=2, progress=lambda *a: None)
    assert runner.calls == [("decode", 128, 4), ("decode", 128, 4)]  # reps + 1 each round
    assert samples[unit.key] == [[11.0, 12.0, 13.0], [21.0, 22.0, 23.0]]  # the first of each dropped


def test_stub_tokenizer_has_the_model_vocab_size(tmp_path):
    from transformers import AutoTokenizer

    for vocab in (8192, 64):
        path = tmp_path / str(vocab)
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "mixtral", "vocab_size": vocab}))
        llama_cpp.write_stub_tokenizer(path, vocab)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert sorted(tokenizer.get_vocab().values()) == list(range(vocab))
        assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None


def test_locate_refuses_a_directory_without_a_build(tmp_path):
    with pytest.raises(MoeOnnxError, match="run scripts/build_llama_cpp.sh"):
        llama_cpp.LlamaCpp.locate(tmp_path)
    bin_dir = tmp_path / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("llama-bench", "llama-quantize"):
        (bin_dir / name).write_text("")
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    for given in (tmp_path, tmp_path / "build", bin_dir):
        assert llama_cpp.LlamaCpp.locate(given).bench == bin_dir.resolve() / "llama-bench"


def test_ratio_block_formatting():
    ratios = [dict(model="coarse-moe", weights="q4_0", ours="coarse-moe/dispatch/int4@cpu", phase="decode",
                   length=128, value=1.5, low=1.2, high=1.8, at_min=1.4)]
    text = llama_cpp.format_ratios(ratios)
    assert "decode@128: llama.cpp/q4_0 / dispatch/int4" in text and "1.50" in text
    assert llama_cpp.format_ratios([]) == ""


TINY = ["--per-session-threads", "--tiny", "--providers", "cpu", "--impls", "dispatch", "--no-peers",
        "--rounds", "1", "--decode-steps", "1", "--prompt-lens", "4", "--decode-contexts", "4",
        "--threads", "1", "--time-budget", "0"]


def test_bench_without_llama_cpp_notes_the_skip(tmp_path):
    result = CliRunner().invoke(main, ["bench", *TINY, "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert llama_cpp.SKIPPED in result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert llama_cpp.SKIPPED in data["conditions"]["notes"]
    assert not any(r["impl"] == llama_cpp.LLAMA_CPP for r in data["rows"]) and data["llama_cpp"] == []


def test_bench_refuses_a_llama_cpp_dir_without_a_build(tmp_path):
    result = CliRunner().invoke(main, ["bench", *TINY, "--llama-cpp", str(tmp_path)])
    assert result.exit_code == 2 and "no llama.cpp build there" in result.output


def test_gguf_summary_bytes_per_token(tmp_path, monkeypatch):
    """One embedding row, k/E of each expert tensor, the rest whole (a fake gguf reader)."""
    import sys
    import types

    class T:
        def __init__(self, name, shape, n_bytes):
            self.name, self.shape, self.n_bytes = name, np.array(shape), n_bytes
            self.tensor_type = types.SimpleNamespace(name="F32")

    tensors = [T("token_embd.weight", [16, 100], 6400), T("blk.0.ffn_up_exps.weight", [16, 8, 4], 2048),
               T("blk.0.attn_q.weight", [16, 16], 1024)]
    fake = types.SimpleNamespace(GGUFReader=lambda path: types.SimpleNamespace(tensors=tensors))
    monkeypatch.setitem(sys.modules, "gguf", fake)
    summary = llama_cpp.gguf_summary(tmp_path / "x.gguf", tmp_path, top_k=2)
    assert summary["tensors"] == 3 and summary["types"] == {"F32": 3}
    assert summary["bytes_per_token"] == pytest.approx(6400 / 100 + 2048 * 2 / 4 + 1024)


def test_llama_cpp_is_paired_with_every_moe_impl_of_the_same_weights():
    from moe_onnx.benchmarks.options import BenchOptions
    from moe_onnx.benchmarks.suite import _llama_cpp_ratios
    from moe_onnx.benchmarks.variants import Variant

    params = {"total": 4, "active_per_token": 1}

    def variant(impl, weights):
        return Variant("coarse-moe", impl, "cpu", lambda: None, params, 64, weights=weights)

    llama = variant(llama_cpp.LLAMA_CPP, "q4_0")
    ours = [variant("dispatch", "int4"), variant("fused", "int4"), variant("dispatch", "")]  # "" = fp32
    rounds = {llama.name: [[0.002], [0.003]], ours[0].name: [[0.004], [0.003]],
              ours[1].name: [[0.001], [0.001]], ours[2].name: [[0.010], [0.010]]}
    samples = {(name, "decode", 128): per_round for name, per_round in rounds.items()}
    opts = BenchOptions(impls=["dispatch", "fused"], weights=["int4"])
    got = {r["ours"]: r["value"] for r in _llama_cpp_ratios(samples, [llama, *ours], opts)}
    # per round 0.002/0.004 = 0.5 and 0.003/0.003 = 1 -> median 0.75; against QMoE 2 and 3 -> 2.5;
    # the fp32 export is not Q4_0's counterpart
    assert got == {ours[0].name: 0.75, ours[1].name: 2.5}
