"""The bench suite: target and bandwidth arithmetic on hand-made samples, the memory probe on a
known allocation, and the suite end to end on tiny shapes (rows, targets and files; never
asserting on timings)."""

import csv
import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

import moe_onnx
from moe_onnx.benchmarks.conditions import resolve_providers
from moe_onnx.benchmarks.memory import copy_bandwidth, peak_rss, rss_mb
from moe_onnx.benchmarks.models import DEFAULT_SHAPES, DENSE_FFN
from moe_onnx.benchmarks.peers import HF_ONNX, HF_ONNX_PREFILL_ONLY, TORCH
from moe_onnx.benchmarks.report import format_table, rows
from moe_onnx.benchmarks.targets import targets
from moe_onnx.benchmarks.timing import Stats, Unit, interleave, paired_ratio
from moe_onnx.cli import main
from moe_onnx.graphs.moe import MOE_IMPLS
from moe_onnx.runtime.providers import ProviderError, cuda_usable

# In-process runs keep a pool per session: a shared pool would bind every later session of the
# pytest process (onnxruntime then refuses sessions with their own); the subprocess test covers it.
TINY = ["--per-session-threads", "--tiny", "--rounds", "1", "--prefill-reps", "1", "--decode-steps", "1",
        "--decode-warmup", "2",
        "--prompt-lens", "4,8", "--decode-contexts", "4", "--threads", "1"]


def test_stats_and_interleaving_order():
    s = Stats.of([3.0, 1.0, 2.0, 10.0])
    assert (s.p50, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    calls = []
    units = [Unit(("a",), lambda: calls.append("a") or 1.0, 2),
             Unit(("b",), lambda: calls.append("b") or 2.0, 1)]
    samples = interleave(units, rounds=2, progress=lambda *a: None)
    # per round and unit: one untimed call, then the timed ones
    assert calls == ["a", "a", "a", "b", "b"] * 2
    assert samples == {("a",): [[1.0, 1.0]] * 2, ("b",): [[2.0]] * 2}
    # warm-up runs: untimed, before the timed ones of each round
    calls.clear()
    samples = interleave([Unit(("c",), lambda: calls.append("c") or float(len(calls)), 2, warmup=3)],
                         rounds=2, progress=lambda *a: None)
    assert len(calls) == 10 and samples == {("c",): [[4.0, 5.0], [9.0, 10.0]]}
    # a deadline already past: only the minimum number of whole rounds
    samples = interleave(units, rounds=5, progress=lambda *a: None, deadline=0.0, min_rounds=2)
    assert [len(r) for r in samples.values()] == [2, 2]
    # one round distorted by load: the median over rounds ignores it
    value, low, high, at_min = paired_ratio([[2.0], [2.0], [9.0]], [[1.0], [1.0], [1.0]])
    assert (value, low, high, at_min) == (2.0, 2.0, 9.0, 2.0)


# Hand-made samples for the coarse shape (E=8, k=2: 0.5 E/k = 2, dense-active limit 1.3), three
# rounds each, seconds. 25 M active fp32 parameters = 100 MB per decode step; copy bandwidth 20 GB/s,
# so a 10 ms step moves 10 GB/s = 50 % of it.
ACTIVE = 25_000_000
BANDWIDTH = 20.0


def _key(model, impl, phase, n):
    return (f"coarse-{model}/{impl}@cpu", phase, n)


SAMPLES = {
    # decode at context 64: every target met
    _key("moe", "dispatch", "decode", 64): [[0.010, 0.010], [0.008], [0.020]],
    _key("dense-active", DENSE_FFN, "decode", 64): [[0.010], [0.010], [0.010]],
    _key("dense-total", DENSE_FFN, "decode", 64): [[0.030], [0.030], [0.030]],
    _key("moe", TORCH, "decode", 64): [[0.050], [0.050], [0.050]],
    # decode at context 512: every target missed on the median (no torch samples: no torch target)
    _key("moe", "dispatch", "decode", 512): [[0.0125], [0.0125], [0.010]],
    _key("dense-active", DENSE_FFN, "decode", 512): [[0.005], [0.005], [0.005]],
    _key("dense-total", DENSE_FFN, "decode", 512): [[0.020], [0.020], [0.020]],
    # prefill: 32 met (5x), 256 missed (1.67x < 2)
    _key("moe", "dense", "prefill", 32): [[0.1], [0.1], [0.1]],
    _key("moe", "dispatch", "prefill", 32): [[0.02], [0.02], [0.02]],
    _key("moe", "dense", "prefill", 256): [[0.1], [0.1], [0.1]],
    _key("moe", "dispatch", "prefill", 256): [[0.06], [0.06], [0.06]],
}


def _variant(model, impl, active=ACTIVE):
    return SimpleNamespace(name=f"coarse-{model}/{impl}@cpu", model=f"coarse-{model}", impl=impl,
                           provider="cpu", params={"total": 4 * active, "active_per_token": active},
                           dtype="fp32", weights="", bytes_per_token=None, memory={}, note="", skips={},
                           kv_cache="concat")


VARIANTS = [_variant("moe", "dispatch"), _variant("moe", "dense"), _variant("moe", TORCH),
            _variant("dense-active", DENSE_FFN), _variant("dense-total", DENSE_FFN)]


def test_targets_met_and_missed_on_known_samples():
    # The fine shape has no samples: it contributes no targets.
    got = {t["what"]: t for t in targets(SAMPLES, VARIANTS, BANDWIDTH, DEFAULT_SHAPES)}
    assert {t["shape"] for t in got.values()} == {"coarse"}

    def check(what, value, low, high, at_min, met, met_at_min):
        t = got.pop(what)
        figures = (t["value"], t["low"], t["high"], t["at_min"])
        assert figures == pytest.approx((value, low, high, at_min), abs=1e-3), t
        assert (t["met"], t["met_at_min"]) == (met, met_at_min), t

    # decode@64, sparse / dense-active: per-round 1.0, 0.8, 2.0 -> median 1.0 <= 1.3; minimums 0.008/0.010
    check("decode@64: dispatch / dense-active", 1.0, 0.8, 2.0, 0.8, True, True)
    # dense-total / sparse: 3.0, 3.75, 1.5 -> 3.0 >= 2; minimums 0.030/0.008 = 3.75
    check("decode@64: dense-total / dispatch", 3.0, 1.5, 3.75, 3.75, True, True)
    # bandwidth: 100 MB per step at 10, 8, 20 ms = 10, 12.5, 5 GB/s = 50, 62.5, 25 % of 20 GB/s
    check("decode@64: dispatch % of copy bandwidth", 50.0, 25.0, 62.5, 62.5, True, True)
    check("decode@64: torch eager / dispatch", 5.0, 2.5, 6.25, 6.25, True, True)
    # decode@512: 2.5, 2.5, 2.0 -> 2.5 > 1.3; minimums 0.010/0.005 = 2.0
    check("decode@512: dispatch / dense-active", 2.5, 2.0, 2.5, 2.0, False, False)
    # 1.6, 1.6, 2.0 -> 1.6 < 2 on the median, but the ratio of minimums 0.020/0.010 = 2.0 meets it
    check("decode@512: dense-total / dispatch", 1.6, 1.6, 2.0, 2.0, False, True)
    # 8, 8, 10 GB/s = 40, 40, 50 %: median 40 < 50, the fastest step 50 % meets it
    check("decode@512: dispatch % of copy bandwidth", 40.0, 40.0, 50.0, 50.0, False, True)
    # dense-active <= sparse <= dense-total by round: 0.010 <= 0.010 <= 0.030 yes, 0.010 <= 0.008 no,
    # 0.010 <= 0.020 <= 0.030 yes -> 2 of 3 rounds; the minimums (0.010, 0.008, 0.030) do not keep it
    check("decode@64: dense-active <= dispatch <= dense-total", 2 / 3, 2 / 3, 2 / 3, 0.0, False, False)
    check("decode@512: dense-active <= dispatch <= dense-total", 1.0, 1.0, 1.0, 1.0, True, True)
    # the widest spread among our exports: sparse at 64, samples 8, 10, 10, 20 ms: p90 17 / p50 10
    check("decode p90/p50, worst ONNX variant", 1.7, 1.0, 1.7, 1.7, False, False)
    check("prefill@32: dense impl / dispatch", 5.0, 5.0, 5.0, 5.0, True, True)
    check("prefill@256: dense impl / dispatch", 1 / 0.6, 1 / 0.6, 1 / 0.6, 1 / 0.6, False, False)
    assert not got, f"unexpected targets: {sorted(got)}"  # no torch target at 512: no samples


def test_targets_per_weight_format():
    # The same coarse samples measured as int4 with a static fp16 cache: the twin targets repeat,
    # labelled; PyTorch eager (the checkpoint's fp32) is compared with the fp32 export only.
    tag = "/int4/static/fp16"
    samples = {(name.replace("@cpu", tag + "@cpu") if TORCH not in name else name, phase, n): per_round
               for (name, phase, n), per_round in SAMPLES.items()}
    variants = [SimpleNamespace(**{**vars(v), "name": v.name.replace("@cpu", tag + "@cpu")})
                if v.impl != TORCH else v for v in VARIANTS]
    got = {t["what"]: t for t in targets(samples, variants, BANDWIDTH, DEFAULT_SHAPES)}
    assert got["decode@64: dispatch / dense-active [int4 static fp16]"]["value"] == pytest.approx(1.0)
    assert got["decode@512: dense-active <= dispatch <= dense-total [int4 static fp16]"]["met"]
    assert got["decode p90/p50, worst ONNX variant"]["value"] == pytest.approx(1.7)
    assert not [w for w in got if "torch" in w]


def test_rows_bandwidth_figures_and_report_status():
    conditions = dict(prompt_lens=[32], decode_contexts=[64, 512], batch=1, threads=2, machine="test")
    moe, dense_active = _variant("moe", "dispatch"), _variant("dense-active", DENSE_FFN, active=2 * ACTIVE)
    dense_active.skips = {("decode", 512): "context beyond the model"}
    stats = {(moe.name, "prefill", 32): Stats.of([0.02]),
             (moe.name, "decode", 64): Stats.of([0.009, 0.010, 0.011]),
             (moe.name, "decode", 512): Stats.of([0.025]),
             (dense_active.name, "decode", 64): Stats.of([0.004])}
    by = {(r["model"], r["phase"], r["length"]): r
          for r in rows([moe, dense_active], stats, BANDWIDTH, conditions)}
    # prefill: 32 tokens in 20 ms; 2 FLOPs per active parameter per token
    r = by[("coarse-moe", "prefill", 32)]
    assert r["tokens_per_s"] == pytest.approx(1600)
    assert r["gflops_per_s"] == pytest.approx(2 * ACTIVE * 32 / 0.02 / 1e9)
    assert "pct_of_copy_bw" not in r  # a prefill reads its weights once for many tokens: no bandwidth figure
    # decode: 100 MB in 10 ms (the median) = 10 GB/s = 50 % of 20 GB/s; in 25 ms, 20 %
    r = by[("coarse-moe", "decode", 64)]
    assert (r["active_mb"], r["achieved_gbs"], r["pct_of_copy_bw"]) == pytest.approx((100, 10, 50))
    assert by[("coarse-moe", "decode", 512)]["pct_of_copy_bw"] == pytest.approx(20)
    # twice the active parameters in 4 ms: 200 MB / 4 ms = 50 GB/s = 250 %
    # (beyond the copy test: reported as is)
    assert by[("coarse-dense-active", "decode", 64)]["pct_of_copy_bw"] == pytest.approx(250)
    # not measured: the reason instead of figures
    r = by[("coarse-dense-active", "decode", 512)]
    assert r["note"] == "context beyond the model" and "p50_ms" not in r
    assert by[("coarse-dense-active", "prefill", 32)]["note"] == "not measured"

    # the terminal table says met / MISS per target as decided
    result = dict(conditions=dict(conditions, versions={"onnxruntime-gpu": "x", "torch": "y"},
                                  providers=["cpu"], copy_bandwidth_gbs=BANDWIDTH, rounds=3,
                                  prefill_reps=1, decode_steps=3, peer_reps=1,
                                  load_average_before=0, load_average_after=0, notes=[]),
                  rows=list(by.values()), variants=[], failures=[],
                  targets=targets(SAMPLES, VARIANTS, BANDWIDTH, DEFAULT_SHAPES))
    table = format_table(result)
    for t in result["targets"]:
        line = next(ln for ln in table.splitlines() if t["what"] in ln)
        assert line.split()[0] == ("met" if t["met"] else "MISS"), line


def test_peak_rss_sees_a_known_allocation():
    mb = 200
    before = rss_mb()
    with peak_rss() as peak:
        block = np.ones(mb * 1_000_000 // 8)  # np.ones writes every page: all of it resident
        during = rss_mb()
        time.sleep(0.05)  # held for a while: the 2 ms sampling fallback (not Linux) sees it too
        del block  # freed inside the block: the peak must still remember it
    after = rss_mb()
    assert during - before >= 0.75 * mb, (before, during)
    assert peak["peak_mb"] - before >= 0.75 * mb, (before, peak)
    assert peak["peak_mb"] >= during - 1
    assert after < peak["peak_mb"] - 0.75 * mb, (after, peak)  # a large array is unmapped when freed


def test_copy_bandwidth_is_in_gb_per_s():
    # bytes read + written per second / 1e9: any real machine is between these (a unit slip is 1e3x off)
    assert 0.5 < copy_bandwidth(gib=1 / 16, threads=2, repeats=2) < 5000


def test_providers():
    assert resolve_providers(["cpu"])[0] == [("cpu", ["CPUExecutionProvider"], "cpu")]
    with pytest.raises(ProviderError, match="takes cpu, cuda, auto, openvino, webgpu, wasm"):
        resolve_providers(["tpu"])
    if not cuda_usable():
        chosen, notes = resolve_providers(["auto"])
        assert [c[0] for c in chosen] == ["cpu"] and "cuda skipped" in notes[0]
        with pytest.raises(ProviderError, match="not usable"):
            resolve_providers(["cuda"])


def test_bench_cli_tiny(tmp_path):
    files = ["--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"),
             "--plot", str(tmp_path / "b.png")]
    result = CliRunner().invoke(main, ["bench", *TINY, "--impls", ",".join(MOE_IMPLS), *files])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b.json").read_text())
    c = data["conditions"]
    assert c["threads"] == 1 and c["batch"] == 1 and "machine" in c and c["decode_warmup"] == 2
    variants = {(r["model"], r["impl"]) for r in data["rows"]}
    for shape in ("coarse", "fine"):
        assert {(f"{shape}-moe", impl) for impl in MOE_IMPLS} <= variants
        assert {(f"{shape}-dense-active", DENSE_FFN), (f"{shape}-dense-total", DENSE_FFN)} <= variants
        assert (f"{shape}-moe", TORCH) in variants
        # transformers' generation export (a KV cache), or its failure reported and the
        # prefill-only graph labelled as such
        hf = (f"{shape}-moe", HF_ONNX) in variants
        assert hf or any(f["variant"] == f"{shape}-moe/{HF_ONNX}" for f in data["failures"])
    assert len(data["rows"]) == len(variants) * 3  # two prompt lengths + one decode context
    for r in data["rows"]:
        assert {"machine", "provider", "batch", "threads", "dtype", "length"} <= set(r)
        assert r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] >= r["min_ms"]
        if r["phase"] == "decode":
            # the row's own figures agree with each other and with the recorded copy bandwidth
            assert r["dtype"] == "fp32"
            active_bytes = r["active_params"] * 4
            assert r["active_mb"] == pytest.approx(active_bytes / 1e6)
            assert r["achieved_gbs"] == pytest.approx(active_bytes / (r["p50_ms"] / 1e3) / 1e9)
            pct = 100 * r["achieved_gbs"] / c["copy_bandwidth_gbs"]
            assert r["pct_of_copy_bw"] == pytest.approx(pct, rel=1e-2)
    assert {t["shape"] for t in data["targets"]} == {"coarse", "fine"}
    # each target's verdict is printed as decided
    lines = result.output.splitlines()
    for t in data["targets"]:
        status = "met" if t["met"] else "MISS"
        assert any(ln.split()[:2] == [status, t["shape"]] and t["what"] in ln for ln in lines), t
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "targets" in result.output and "decode, per token" in result.output


def _bench_mixtral(tmp_path, providers: str, contexts: str = "4", kv_cache: str = "concat"):
    """``moe-onnx bench`` of a tiny Mixtral export on ``providers``, one round of 4-token prompts:
    the CLI's result and the JSON it wrote."""
    from models import make_model

    out = moe_onnx.export(make_model("mixtral"), tmp_path / kv_cache / "mixtral", kv_cache=kv_cache)
    args = ["bench", str(out), "--per-session-threads", "--providers", providers, "--rounds", "1",
            "--decode-steps", "2", "--prompt-lens", "4", "--decode-contexts", contexts,
            "--json", str(tmp_path / "bench.json")]
    result = CliRunner().invoke(main, args)
    data = json.loads((tmp_path / "bench.json").read_text()) if result.exit_code == 0 else None
    return result, data


def test_bench_user_export(tmp_path):
    result, data = _bench_mixtral(tmp_path, "cpu", contexts="4,8")
    assert result.exit_code == 0, result.output
    assert {(r["model"], r["impl"], r["phase"], r["length"]) for r in data["rows"]} == {
        ("mixtral", "dispatch", "prefill", 4), ("mixtral", "dispatch", "decode", 4),
        ("mixtral", "dispatch", "decode", 8)}
    assert data["targets"] == []


def test_bench_on_openvino_beside_cpu(tmp_path):
    """``--providers cpu,openvino``: the same export timed on both in the same rounds, each row
    labelled with its provider, and the nodes each session placed on which EP reported."""
    pytest.importorskip("onnxruntime_ep_openvino", reason="the OpenVINO plugin EP is not installed")
    result, data = _bench_mixtral(tmp_path, "cpu,openvino")
    assert result.exit_code == 0, result.output
    assert {(r["provider"], r["phase"]) for r in data["rows"] if "p50_ms" in r} == {
        ("cpu", "prefill"), ("cpu", "decode"), ("openvino", "prefill"), ("openvino", "decode")}
    placed = {v["provider"]: v["placement"] for v in data["variants"]}
    assert placed["openvino"].startswith("OpenVINOExecutionProvider "), placed
    assert "CPUExecutionProvider" not in placed["openvino"], placed  # no node fell back
    assert placed["cpu"].startswith("CPUExecutionProvider ")
    line = r"mixtral\s+dispatch\s+openvino OpenVINOExecutionProvider \d+ nodes"
    assert re.search(line, result.output), result.output


def test_bench_on_wasm_in_node_beside_cpu(tmp_path):
    """``--providers cpu,wasm``: onnxruntime-web's wasm backend in a Node process, timed in the same
    rounds as onnxruntime CPU, its rows labelled ``wasm``; a static-cache export is refused by name."""
    from moe_onnx.benchmarks.wasm import wasm_usable

    why = wasm_usable()
    if why:
        pytest.skip(why)
    result, data = _bench_mixtral(tmp_path, "cpu,wasm")
    assert result.exit_code == 0, result.output
    timed = {(r["provider"], r["phase"]): r["p50_ms"] for r in data["rows"] if "p50_ms" in r}
    assert set(timed) == {("cpu", "prefill"), ("cpu", "decode"), ("wasm", "prefill"), ("wasm", "decode")}
    assert all(ms > 0 for ms in timed.values())
    assert "onnxruntime-web wasm in Node" in {v["provider"]: v["placement"] for v in data["variants"]}["wasm"]
    result, _ = _bench_mixtral(tmp_path, "wasm", kv_cache="static")
    assert "static KV cache" in result.output, result.output


def test_bench_bad_arguments(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--tiny", "--providers", "tpu"])
    assert result.exit_code == 2 and "cpu, cuda, auto, openvino, webgpu, wasm" in result.output
    result = CliRunner().invoke(main, ["bench", "--tiny", "--impls", "nope", "--no-peers"])
    assert result.exit_code == 2 and "unknown MoE impl" in result.output
    result = CliRunner().invoke(main, ["bench", "--tiny", "--shapes", "medium", "--no-peers"])
    assert result.exit_code == 2 and "unknown shape(s) medium; choose from coarse, fine" in result.output
    for weights, message in (("int5", "unknown weight format 'int5'; choose from fp32, int8, int4"),
                             ("fp32:64", "a block size goes with int8 or int4"),
                             ("int4:x", "a block size goes with int8 or int4")):
        result = CliRunner().invoke(main, ["bench", "--tiny", "--weights", weights, "--no-peers"])
        assert result.exit_code == 2 and message in result.output, result.output


def test_weight_formats_and_their_labels():
    from moe_onnx.benchmarks.variants import weight_format, weights_label

    assert [weight_format(w) for w in ("fp32", "int8", "int4:128")] == [("fp32", None), ("int8", None),
                                                                         ("int4", 128)]
    assert [weights_label(*weight_format(w)) for w in ("int4", "int4:32", "int4:128")] == ["int4", "int4",
                                                                                           "int4:128"]
    if not cuda_usable():
        result = CliRunner().invoke(main, ["bench", "--tiny", "--providers", "cuda"])
        assert result.exit_code == 2 and "CUDA execution provider is not usable" in result.output


def test_bench_shares_one_thread_pool_by_default(tmp_path):
    """The default bench puts every onnxruntime session of its process on one pool (in a child
    process: the pool is process-wide)."""
    import subprocess
    import sys

    args = ["--tiny", "--no-peers", "--impls", "dispatch", "--rounds", "1", "--decode-steps", "1",
            "--prompt-lens", "4", "--decode-contexts", "4,10", "--threads", "1",  # 10: pasts in chunks of 4
            "--kv-cache", "concat,static:fp16", "--shapes", "fine",
            "--json", str(tmp_path / "b.json")]
    code = ("import sys; from moe_onnx.cli import main; from moe_onnx.runtime import threads\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('shared pool', not threads.session_options().use_per_session_threads, "
            "threads.share_threads(1))")  # share_threads refuses another size than the pool's
    result = subprocess.run([sys.executable, "-c", code, "bench", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shared pool True 1" in result.stdout
    data = json.loads((tmp_path / "b.json").read_text())
    decode = [r["variant"] for r in data["rows"] if r["phase"] == "decode"]
    static = {v for v in decode if "/static/fp16@" in v}
    assert len(static) == 3 and "fine-moe/dispatch/static/fp16@cpu" in static, static  # MoE + 2 twins


def test_transformers_generation_peer_decodes_against_its_cache(tmp_path):
    """The transformers peer's decode step is one token through its decode graph against the
    context's cache (past inputs), not a recompute of the prefix; its logits match the model's."""
    import gc
    import weakref

    import torch

    from moe_onnx.benchmarks.models import TINY_SHAPES, build_models
    from moe_onnx.benchmarks.peers import export_for_generation, generation_runner

    model = build_models(TINY_SHAPES[0])["coarse-moe"].eval()
    runner = generation_runner(export_for_generation(model, tmp_path / "hf"), threads=1)
    assert any("past_key_values" in i.name for i in runner.decode_session.get_inputs())
    # one graph's session at a time (each holds every weight): the other is let go
    decode = weakref.ref(runner.decode_session)
    assert runner.prefill_session is not None
    gc.collect()
    assert decode() is None
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 6))
    runner.prepare_decode(ids)
    fed, run = [], runner.decode_session.run
    runner.decode_session.run = lambda names, feeds: fed.append(feeds) or run(names, feeds)
    assert runner.decode_step(6, ids[:, :1]) > 0
    (feeds,) = fed  # what the timed step ran: one token at position 6 against the 6-token cache
    pasts = [name for name in feeds if "past_key_values" in name]
    assert pasts and all(feeds[name].shape[-2] == 6 for name in pasts), {n: f.shape for n, f in feeds.items()}
    assert feeds["input_ids"].shape == (1, 1) and feeds["position_ids"].tolist() == [[6]]
    logits = run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(np.concatenate([ids, ids[:, :1]], axis=1))).logits[:, -1:]
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("kv_cache", ["concat", "static"])
def test_onnx_runner_decodes_against_the_whole_context(kv_cache, tmp_path):
    """The bench's decode step is one token against the cache of the whole context (built in
    chunks), every step from that same past: its feeds say so, and its logits are the last
    logits of a full forward of context + token (an empty or short past gives others)."""
    from models import make_model

    import moe_onnx.runtime as rt
    from moe_onnx.benchmarks.runners import onnx_runner

    out = moe_onnx.export(make_model("mixtral"), tmp_path / "m", kv_cache=kv_cache)
    runner = onnx_runner(out, "cpu", threads=1, max_chunk=3)  # a context of 7 in chunks of 3
    seen, step = [], runner.session.step

    def spy(ids, mask, positions, cache, keep):
        logits, new = step(ids, mask, positions, cache, keep)
        seen.append((mask.shape, positions.tolist(), cache.length, np.array(logits)))
        return logits, new

    runner.session.step = spy
    rng = np.random.default_rng(0)
    vocab = runner.session.info.vocab_size
    context = rng.integers(0, vocab, (1, 7))
    runner.prepare_decode(context)
    assert [s[2] for s in seen] == [0, 3, 6]  # the chunks' pasts
    seen.clear()
    tokens = [rng.integers(0, vocab, (1, 1)) for _ in range(2)]
    for token in tokens:
        assert runner.decode_step(7, token) > 0
    full = rt.load(out, provider="cpu", threads=1)
    for token, (mask_shape, positions, past, logits) in zip(tokens, seen, strict=True):
        assert (mask_shape, positions, past) == ((1, 8), [[7]], 7)
        expected, _ = full.forward(np.concatenate([context, token], axis=1))
        np.testing.assert_allclose(logits[:, -1], expected[:, -1], rtol=1e-4, atol=1e-5)


def test_bench_holds_one_model_at_a_time(monkeypatch):
    """Each round loads, runs and frees one variant after another (onnxruntime sessions, the torch
    peer's model, transformers' graphs): never two at once, and every variant still timed in
    every round (the rounds stay interleaved)."""
    import gc
    import weakref

    from moe_onnx.benchmarks import peers, runners
    from moe_onnx.benchmarks.suite import BenchOptions, run_bench

    live, most = weakref.WeakSet(), [0]
    for cls in (runners.OnnxRunner, peers.TorchRunner, peers.GenerationRunner, peers.RecomputeRunner):
        def counting(self, *args, init=cls.__init__, **kwargs):
            gc.collect()  # a runner nothing refers to any more is not held
            live.add(self)
            most[0] = max(most[0], len(live))
            init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    opts = BenchOptions(tiny=True, shapes=["coarse"], shared_threads=False, threads=1, rounds=2,
                        time_budget_s=None, prompt_lens=[4], decode_contexts=[4], decode_steps=1,
                        decode_warmup=1, bandwidth_gib=1 / 64)
    result = run_bench(opts, log=lambda *_: None)
    assert most[0] == 1
    impls = {r["impl"] for r in result["rows"]}
    assert {"dispatch", "dense", "fused", DENSE_FFN, TORCH} <= impls
    assert len(impls & {HF_ONNX, HF_ONNX_PREFILL_ONLY}) == 1
    assert len(result["rows"]) == 7 * 2  # (3 MoE impls, 2 twins, torch, transformers) x (prefill, decode)
    assert all(len(r["round_p50s_ms"]) == 2 for r in result["rows"])


def test_bench_refuses_a_variant_set_beyond_the_memory(monkeypatch):
    """The estimate (model sizes, KV caches, the measured activation factor) is checked before
    any work: over --max-memory, or over the memory available, a clear error and exit status 2."""
    from moe_onnx.benchmarks import budget
    from moe_onnx.benchmarks.models import DEFAULT_SHAPES, parameter_count
    from moe_onnx.benchmarks.options import DEFAULT_IMPLS, BenchOptions

    result = CliRunner().invoke(main, ["bench", "--max-memory", "1", "--no-peers", "--shapes", "fine"])
    assert result.exit_code == 2, result.output
    named = "the variant set (shapes fine x impls dispatch,dense,fused + dense twins, weights fp32"
    assert named in result.output, result.output
    assert re.search(r"needs an estimated [0-9,]+ MB at its peak, more than --max-memory 1 GB", result.output)
    # the default set: one model at a time, the largest the fine MoE in one form or another
    est = budget.estimate(BenchOptions(), list(DEFAULT_SHAPES), list(DEFAULT_IMPLS))
    fine = 4 * parameter_count(DEFAULT_SHAPES[1], "fine-moe") / 1e6
    assert est.group == "fine" and est.largest_mb >= fine
    assert est.peak_mb == pytest.approx(est.process_mb + est.largest_mb)
    # without --max-memory: what the machine has available now
    # (plus this process's own: a fine MoE session needs more than 100 MB beyond it)
    monkeypatch.setattr(budget.psutil, "virtual_memory", lambda: SimpleNamespace(available=100e6))
    result = CliRunner().invoke(main, ["bench", "--no-peers", "--shapes", "fine"])
    assert result.exit_code == 2 and "more than the memory available now" in result.output, result.output
