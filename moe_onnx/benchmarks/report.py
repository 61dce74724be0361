"""Bench results as rows, target checks, a terminal table, JSON, CSV and a PNG plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from moe_onnx.errors import MoeOnnxError

BYTES_FP32 = 4


def rows(variants, stats: dict, bandwidth_gbs: float, batch: int = 1) -> list[dict]:
    """One row per (variant, phase, length) with latency, throughput and bandwidth figures."""
    out = []
    for v in variants:
        active, total = v.params["active_per_token"], v.params["total"]
        for (name, phase, length), s in stats.items():
            if name != v.name:
                continue
            tokens = batch * (length if phase == "prefill" else 1)
            row = dict(model=v.model, impl=v.impl, provider=v.provider, phase=phase, length=length,
                       p50_ms=s.p50 * 1e3, p90_ms=s.p90 * 1e3, min_ms=s.min * 1e3, n=s.n,
                       tokens_per_s=tokens / s.p50, total_params=total, active_params=active,
                       gflops_per_s=2 * active * tokens / s.p50 / 1e9,
                       session_rss_mb=v.extra.get("session_rss_mb"))
            if phase == "decode":
                # Bytes a token must read at least: its active weights (fp32), once.
                row["active_mb"] = active * BYTES_FP32 / 1e6
                row["achieved_gbs"] = active * BYTES_FP32 / s.p50 / 1e9
                row["pct_of_bandwidth"] = 100 * row["achieved_gbs"] / bandwidth_gbs
            out.append(row)
    return out


def _p50(result_rows, model, impl, phase, length):
    for r in result_rows:
        if (r["model"], r["impl"], r["phase"], r["length"], r["provider"]) == (model, impl, phase, length, "cpu"):
            return r["p50_ms"]
    return None


def checks(result_rows: list[dict], shapes) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    out = []
    decode_ctx = min((r["length"] for r in result_rows if r["phase"] == "decode"), default=None)
    prefill_len = max((r["length"] for r in result_rows if r["phase"] == "prefill"), default=None)
    for shape in shapes:
        s, ek = shape.name, shape.experts / shape.top_k
        sparse = _p50(result_rows, f"{s}-moe", "dispatch", "decode", decode_ctx)
        active = _p50(result_rows, f"{s}-dense-active", "dense-ffn", "decode", decode_ctx)
        total = _p50(result_rows, f"{s}-dense-total", "dense-ffn", "decode", decode_ctx)
        dense_impl = _p50(result_rows, f"{s}-moe", "dense", "prefill", prefill_len)
        sparse_pf = _p50(result_rows, f"{s}-moe", "dispatch", "prefill", prefill_len)
        eager = _p50(result_rows, f"{s}-moe", "torch-eager", "decode", decode_ctx)
        bw = next((r["pct_of_bandwidth"] for r in result_rows if (r["model"], r["impl"], r["phase"], r["length"])
                   == (f"{s}-moe", "dispatch", "decode", decode_ctx)), None)
        limit = 1.3 if s == "coarse" else 1.5
        candidates = [
            (f"decode@{decode_ctx}: sparse / dense-active (x)", sparse / active if sparse and active else None, f"<= {limit}", lambda v, lim=limit: v <= lim),
            (f"decode@{decode_ctx}: dense-total / sparse (x)", total / sparse if sparse and total else None, f">= {0.5 * ek:g} (0.5 E/k)", lambda v, t=0.5 * ek: v >= t),
            (f"prefill@{prefill_len}: dense impl / sparse (x)", dense_impl / sparse_pf if dense_impl and sparse_pf else None, f">= {0.5 * ek:g} (0.5 E/k)", lambda v, t=0.5 * ek: v >= t),
            (f"decode@{decode_ctx}: % of copy bandwidth on active bytes", bw, ">= 50", lambda v: v >= 50),
            (f"decode@{decode_ctx}: torch eager / sparse (x)", eager / sparse if eager and sparse else None, "> 1", lambda v: v > 1),
        ]
        for what, value, target, ok in candidates:
            if value is not None:
                out.append(dict(shape=s, what=what, value=round(value, 2), target=target, met=bool(ok(value))))
    return out


def format_table(result: dict) -> str:
    """The terminal report: conditions, prefill and decode tables, target checks."""
    c, rs = result["conditions"], result["rows"]
    lines = [f"moe-onnx bench — {c['machine']}; onnxruntime {c['onnxruntime']}; {c['threads']} threads; "
             f"batch {c['batch']}; {c['dtype']}; copy bandwidth {c['copy_bandwidth_gbs']} GB/s; "
             f"medians of {c['rounds']} interleaved rounds"]
    for phase, cols in (("prefill", "ms  tok/s"), ("decode", "p50 ms  p90 ms  GB/s  %bw")):
        lengths = sorted({r["length"] for r in rs if r["phase"] == phase})
        keys = sorted({(r["model"], r["impl"], r["provider"]) for r in rs if r["phase"] == phase})
        lines.append("")
        lines.append(f"{phase} ({cols}) at " + ", ".join(f"{'prompt' if phase == 'prefill' else 'context'} {n}" for n in lengths))
        for key in keys:
            cells = []
            for n in lengths:
                r = next((r for r in rs if (r["model"], r["impl"], r["provider"], r["phase"], r["length"]) == (*key, phase, n)), None)
                if r is None:
                    cells.append(" " * 30)
                elif phase == "prefill":
                    cells.append(f"{r['p50_ms']:9.2f} {r['tokens_per_s']:9.0f}")
                else:
                    cells.append(f"{r['p50_ms']:7.2f} {r['p90_ms']:7.2f} {r['achieved_gbs']:5.1f} {r['pct_of_bandwidth']:4.0f}%")
            lines.append(f"  {key[0]:19s} {key[1]:18s} {key[2]:4s} " + "   ".join(cells))
    if result.get("checks"):
        lines += ["", "targets"]
        for ch in result["checks"]:
            lines.append(f"  {'met ' if ch['met'] else 'MISS'} {ch['shape']:6s} {ch['what']:52s} {ch['value']:8.2f}  target {ch['target']}")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2))


def write_csv(result: dict, path: Path) -> None:
    fields = sorted({k for r in result["rows"] for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result["rows"])


def write_plot(result: dict, path: Path) -> None:
    """Decode latency per token vs context, and prefill tokens/s vs prompt length, per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoeOnnxError("--plot needs matplotlib: pip install 'moe-onnx[bench]'") from None
    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(13, 5))
    for phase, ax, value in (("decode", ax_d, "p50_ms"), ("prefill", ax_p, "tokens_per_s")):
        keys = sorted({(r["model"], r["impl"], r["provider"]) for r in result["rows"] if r["phase"] == phase})
        for key in keys:
            pts = sorted((r["length"], r[value]) for r in result["rows"]
                         if (r["model"], r["impl"], r["provider"], r["phase"]) == (*key, phase))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} {key[1]}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_d.set(title="decode: latency per token (p50)", xlabel="context length", ylabel="ms / token")
    ax_p.set(title="prefill throughput", xlabel="prompt length", ylabel="tokens / s")
    ax_p.legend(fontsize=7, loc="best")
    fig.suptitle(f"moe-onnx bench — {result['conditions']['machine']}, {result['conditions']['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
