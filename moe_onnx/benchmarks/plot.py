"""The bench plot: per shape, decode latency per token vs context and prefill tokens/s vs prompt length."""

from __future__ import annotations

from pathlib import Path

from moe_onnx.errors import MoeOnnxError

PEERS = ("torch-eager", "transformers-onnx", "transformers-onnx-prefill-only")


def _groups(result_rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by shape (``coarse-moe`` -> ``coarse``); user exports form one group."""
    groups: dict[str, list[dict]] = {}
    for r in result_rows:
        shape = r["model"].split("-")[0] if "-moe" in r["model"] or "-dense-" in r["model"] else "exports"
        groups.setdefault(shape, []).append(r)
    return groups


def _draw(ax, rows: list[dict], phase: str, value: str) -> None:
    measured = [r for r in rows if r["phase"] == phase and value in r]
    labels = dict.fromkeys((r["model"], r["impl"], r["provider"]) for r in measured)
    for label in labels:
        pts = sorted(
            (r["length"], r[value]) for r in measured if (r["model"], r["impl"], r["provider"]) == label
        )
        style = "--" if label[1] in PEERS else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=" ".join(label))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)


def write_plot(result: dict, path: Path) -> None:
    """A PNG with one row per shape: decode ms/token (p50) vs context, prefill tokens/s (p50) vs prompt."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoeOnnxError("--plot needs matplotlib: pip install 'moe-onnx[bench]'") from None
    groups = _groups(result["rows"])
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, 4.5 * len(groups)), squeeze=False)
    for (shape, rows), (ax_d, ax_p) in zip(groups.items(), axes, strict=True):
        _draw(ax_d, rows, "decode", "p50_ms")
        _draw(ax_p, rows, "prefill", "tokens_per_s")
        ax_d.set(title=f"{shape}: decode latency per token (p50)",
                 xlabel="context length (tokens)", ylabel="ms / token")
        ax_p.set(title=f"{shape}: prefill throughput (p50)",
                 xlabel="prompt length (tokens)", ylabel="tokens / s")
        ax_p.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    c = result["conditions"]
    fig.suptitle(f"moe-onnx bench: {c['machine']}; {c['threads']} threads; batch {c['batch']}; fp32; "
                 f"dashed = peers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
