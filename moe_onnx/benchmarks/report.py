"""Bench results as rows, a terminal table, JSON, CSV and a PNG plot.

Each row is one variant at one phase and length, and carries its conditions (machine, provider,
threads, batch, dtype), so a row read alone still says what was measured.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from moe_onnx import dtypes
from moe_onnx.benchmarks.plot import write_plot  # noqa: F401 - one import place for the writers


def _figures(v, phase: str, length: int, s, bandwidth_gbs: float, batch: int) -> dict:
    active = v.params["active_per_token"]
    tokens = batch * (length if phase == "prefill" else 1)
    row = dict(p50_ms=s.p50 * 1e3, p90_ms=s.p90 * 1e3, p10_ms=s.p10 * 1e3,
               min_ms=s.min * 1e3, max_ms=s.max * 1e3, n=s.n,
               tokens_per_s=tokens / s.p50,
               # 2 FLOPs per active parameter per token (matmuls; attention scores not counted)
               gflops_per_s=2 * active * tokens / s.p50 / 1e9)
    if phase == "decode":
        # The least a batch-1 step must read: every active weight once (the KV cache is extra).
        active_bytes = v.bytes_per_token or active * dtypes.DTYPES[v.dtype].bytes
        row.update(active_mb=active_bytes / 1e6, achieved_gbs=active_bytes / s.p50 / 1e9,
                   pct_of_copy_bw=100 * active_bytes / s.p50 / 1e9 / bandwidth_gbs)
    return row


def rows(variants, stats: dict, bandwidth_gbs: float, conditions: dict) -> list[dict]:
    """One row per (variant, phase, length); skipped ones carry their reason instead of figures."""
    out = []
    phases = [("prefill", n) for n in conditions["prompt_lens"]]
    phases += [("decode", c) for c in conditions["decode_contexts"]]
    for v in variants:
        for phase, length in phases:
            row = dict(variant=v.name, model=v.model, impl=v.impl, provider=v.provider, phase=phase,
                       length=length,
                       batch=conditions["batch"], threads=conditions["threads"], dtype=v.dtype,
                       weights=v.weights or v.dtype, kv_cache=v.kv_cache,
                       machine=conditions["machine"], total_params=v.params["total"],
                       active_params=v.params["active_per_token"],
                       rss_load_mb=v.memory.get("rss_load_mb"), peak_rss_mb=v.memory.get("peak_rss_mb"),
                       note=v.note)
            s = stats.get((v.name, phase, length))
            if s is None:
                row["note"] = v.skips.get((phase, length), "not measured")
            else:
                row.update(_figures(v, phase, length, s, bandwidth_gbs, conditions["batch"]))
            out.append(row)
    return out


def _label(r: dict) -> tuple:
    """(model, impl[/weights][/static], provider): the impl column names what sets a variant apart."""
    weights = r.get("weights", r["dtype"])
    impl = r["impl"] if weights in ("", r["dtype"]) else f"{r['impl']}/{weights}"
    if r.get("kv_cache", "concat") != "concat":
        impl += "/" + r["kv_cache"].replace(":", "/")
    return r["model"], impl, r["provider"]


IMPL_WIDTH = 17  # the impl column's least width; the phase tables' headers are laid out for it


def _impl_width(labelled: list[dict]) -> int:
    """The impl column's width: the longest label (``dispatch/int4:128/static/fp16``), at least
    :data:`IMPL_WIDTH`."""
    return max([IMPL_WIDTH] + [len(_label(r)[1]) for r in labelled])


def _provider_width(labelled: list[dict]) -> int:
    """The provider column's width: 4 (cpu, cuda), or the longest name (openvino)."""
    return max([4] + [len(r["provider"]) for r in labelled])


def _phase_table(result_rows: list[dict], phase: str) -> list[str]:
    mine = [r for r in result_rows if r["phase"] == phase]
    lengths = sorted({r["length"] for r in mine})
    width, pwidth = _impl_width(result_rows), _provider_width(result_rows)
    pad = " " * (width - IMPL_WIDTH + pwidth - 4)
    if phase == "prefill":
        head = "".join(f"{'prompt ' + str(n):>22s}" for n in lengths)
        lines = [f"prefill: p50 ms and tokens/s{'':13s}{pad}{head}"]
    else:
        head = "".join(f"{'context ' + str(n):>33s}" for n in lengths)
        lines = [f"decode, per token: p50 / p90 ms, GB/s, % copy bw{pad}{head}"]
    by_key: dict[tuple, dict] = {}
    for r in mine:
        by_key.setdefault(_label(r), {})[r["length"]] = r
    for label, per_len in by_key.items():
        cells = []
        for n in lengths:
            r = per_len.get(n)
            if r is None or "p50_ms" not in r:
                cells.append(f"{'(skipped)':>22s}" if phase == "prefill" else f"{'(skipped)':>33s}")
            elif phase == "prefill":
                cells.append(f"{r['p50_ms']:11.1f} {r['tokens_per_s']:8.0f}/s ")
            else:
                cells.append(f"{r['p50_ms']:9.2f} /{r['p90_ms']:7.2f} "
                             f"{r['achieved_gbs']:6.1f} {r['pct_of_copy_bw']:5.0f}% ")
        lines.append(f"  {label[0]:19s} {label[1]:{width}s} {label[2]:{pwidth}s}" + "".join(cells))
    return lines


def _memory_table(result: dict) -> list[str]:
    lines = ["memory, MB of process RSS growth: after load / peak while warming "
             "(largest prefill + decode pasts)"]
    width, pwidth = _impl_width(result["variants"]), _provider_width(result["variants"])
    for v in result["variants"]:
        _, impl, _ = _label(v)
        lines.append(f"  {v['model']:19s} {impl:{width}s} {v['provider']:{pwidth}s}"
                     f"{v.get('rss_load_mb', 0):10.0f} {v.get('peak_rss_mb', 0):10.0f}"
                     f"   active/token {v['active_per_token'] / 1e6:6.1f}M"
                     f"  total {v['total'] / 1e6:6.1f}M params")
    return lines


def format_table(result: dict) -> str:
    """The terminal report: conditions, prefill, decode, memory, targets, notes."""
    c = result["conditions"]
    lines = [f"moe-onnx bench on {c['machine']}; onnxruntime {c['versions']['onnxruntime-gpu']}, "
             f"torch {c['versions']['torch']}; providers {','.join(c['providers'])}; {c['threads']} threads; "
             f"batch {c['batch']}; fp32 unless stated",
             f"copy bandwidth (read+write) {c['copy_bandwidth_gbs']} GB/s; "
             f"{c['rounds']} interleaved rounds x ({c['prefill_reps']} prefill after 1 untimed / "
             f"{c['decode_steps']} decode timed runs after {c.get('decode_warmup', 1)} untimed; "
             f"peers {c['peer_reps']}); "
             f"load average {c['load_average_before']} -> {c['load_average_after']}", ""]
    lines += _phase_table(result["rows"], "prefill") + [""] + _phase_table(result["rows"], "decode")
    lines += [""] + _memory_table(result)
    placed = [(_label(v), v["placement"]) for v in result["variants"] if v.get("placement")]
    if any(label[2] not in ("cpu", "cuda") for label, _ in placed):  # a plugin EP or onnxruntime-web
        lines += ["", "placement: nodes per execution provider, as onnxruntime partitioned the graph"]
        width, pwidth = _impl_width(result["variants"]), _provider_width(result["variants"])
        lines += [f"  {model:19s} {impl:{width}s} {where:{pwidth}s} {text}"
                  for (model, impl, where), text in placed]
    if result.get("targets"):
        lines += ["", "targets: median over rounds of the per-round ratio [lowest .. highest round], "
                  "and the ratio of minimums"]
        width = max(len(t["what"]) for t in result["targets"])
        for t in result["targets"]:
            status = {True: "met ", False: "MISS"}[t["met"]]
            spread = f"[{t['low']:.2f} .. {t['high']:.2f}]"
            lines.append(f"  {status} {t['shape']:6s} {t['what']:{width}s} {t['value']:7.2f} {spread:16s} "
                         f"min {t['at_min']:6.2f}  target {t['target']}")
    notes = list(c["notes"]) + [f"{f['variant']} failed: {f['reason']}" for f in result.get("failures", [])]
    notes += sorted({f"{r['model']}/{r['impl']}: {r['note']}" for r in result["rows"] if r.get("note")})
    if notes:
        lines += ["", "notes"] + [f"  - {n}" for n in notes]
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    """The whole result: conditions, variants, rows, targets, failures."""
    Path(path).write_text(json.dumps(result, indent=2))


def write_csv(result: dict, path: Path) -> None:
    """One line per row; every line carries its conditions."""
    fields = list(dict.fromkeys(k for r in result["rows"] for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})
