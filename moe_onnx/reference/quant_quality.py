"""Held-out perplexity of the shipped reference models per weight format, through the ONNX graph.

    python -m moe_onnx.reference.quant_quality [--formats fp32,int8,int4,int4-search,int4-b128,...]
                                                [--windows N] [--threads 2] [--work out/quant-quality]

Each model (``moe``, ``dense-active``, ``dense-total`` in reference_models/) is exported once per
format and scored on the held-out windows the reference README uses (the held-out stdlib files,
256-token windows; all of them unless ``--windows``). ONNX Runtime runs with its defaults: its
MatMulNBits kernel quantizes activations to int8 per block (accuracy level 4) unless
``--exact-matmul`` asks it for float32 arithmetic, which isolates the weights' own error.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moe_onnx.dtypes import QUANTIZED_DTYPES

FORMATS = {  # name -> export options
    "fp32": {},
    **{w: dict(weights=w) for w in QUANTIZED_DTYPES},
    "int4-search": dict(weights="int4", quant_method="search"),
    "int4-b128": dict(weights="int4", block_size=128),
    "int4-b128-search": dict(weights="int4", block_size=128, quant_method="search"),
    "int8-b128": dict(weights="int8", block_size=128),
}
MODELS = ("moe", "dense-active", "dense-total")


def held_out_windows(models: Path, out: Path):
    from moe_onnx.evaluation import token_windows
    from moe_onnx.reference.corpus import stdlib_files

    training = json.loads((models / "moe" / "training.json").read_text())
    names = set(training["heldout_files"])
    files = [f for f in stdlib_files()[1] if f.name in names]
    return token_windows(out / "tokenizer.json", files, training["budget"]["context"])


def main(argv=None) -> None:
    import moe_onnx
    from moe_onnx import manifest
    from moe_onnx.evaluation import onnx_quality
    from moe_onnx.reference.demo import default_models_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--windows", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="out/quant-quality")
    parser.add_argument("--exact-matmul", action="store_true")
    args = parser.parse_args(argv)
    models, work = default_models_dir(), Path(args.work)
    print(f"held-out perplexity through ONNX ({'float32' if args.exact_matmul else 'default'} MatMulNBits "
          f"arithmetic), {args.threads} threads")
    print(f"{'model':14s} {'format':12s} {'ppl':>8s} {'vs fp32':>8s} "
          f"{'weights MB/token':>17s} {'file MB':>8s}")
    for name in MODELS:
        base = None
        for fmt in args.formats.split(","):
            out = work / f"{name}-{fmt}"
            if not (out / "model.onnx").exists():
                moe_onnx.export(models / name, out, force=True, progress=False, **FORMATS[fmt])
            windows = held_out_windows(models, out)[: args.windows]
            start = time.perf_counter()
            ppl = onnx_quality(out, windows, threads=args.threads, exact_matmul=args.exact_matmul).perplexity
            base = ppl if base is None else base
            m = manifest.read(out)
            size = sum(f.stat().st_size for f in out.glob("model.onnx*")) / 1e6
            print(f"{name:14s} {fmt:12s} {ppl:8.3f} {100 * (ppl / base - 1):+7.2f}% "
                  f"{m.bytes_per_token / 1e6:17.3f} {size:8.1f}   "
                  f"({len(windows)} windows, {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
