"""The hybrids' recurrent mixers on onnxruntime CPU: a Scan over the tokens against the chunked
form (and ``auto``, an If between them on the token count, what the decoder uses), at prefill
lengths and for one decode token, at a released model's layer sizes.

    python -m studies.recurrent_prefill [--lengths 1,256,2000] [--threads 2] [--reps 3] [--json F]

One layer's mixer alone (its in_proj, conv, recurrence, gated norm and out_proj; random weights,
fp32), built by :mod:`moe_onnx.graphs.mamba2` (Granite-4.0-H-Tiny's Mamba2: hidden 1536, 48 heads
of 64, state 128, one group) and :mod:`moe_onnx.graphs.deltanet` (Qwen3-Next's Gated DeltaNet:
hidden 2048, 16 key heads and 32 value heads of 128), each form in its own graph, from a zero
state. Reported: the best of ``--reps`` runs after one warm-up, per form and length, and the
largest difference between the forms' outputs (they compute the same function); see
BENCHMARKS.md "Hybrid models".
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxscript

from moe_onnx.graphs.context import GraphContext
from moe_onnx.graphs.decoder import IR_VERSION, OPSET
from moe_onnx.runtime.threads import session_options
from moe_onnx.spec import DeltaNetSpec, Mamba2Spec

GRANITE_TINY = Mamba2Spec(num_heads=48, head_dim=64, state_size=128, n_groups=1, conv_kernel=4,
                          intermediate_size=3072, norm_eps=1e-5)
QWEN3_NEXT = DeltaNetSpec(num_k_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128, conv_kernel=4)
FORMS = ("scan", "chunked", "auto")
MIXERS = {"mamba2 (granite-4.0-h-tiny)": (GRANITE_TINY, 1536), "deltanet (qwen3-next)": (QWEN3_NEXT, 2048)}


class RandomWeights:
    """Every weight a mixer asks for, random with a scale that keeps the recurrence stable."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        rng = np.random.default_rng(0)
        self.arrays = {name: (rng.standard_normal(shape) * (0.5 if len(shape) < 2 else 0.02))
                       .astype(np.float32) for name, shape in shapes.items()}
        for name in self.arrays:
            if name == "a_neg":  # Mamba2's A = -exp(A_log) < 0: the state decays
                self.arrays[name] = -np.abs(self.arrays[name]) - 0.1

    def tensor(self, name):
        return ir.tensor(self.arrays[name], name=name)

    def blocked(self, name):
        return None


def _weights(kind: str, spec, hidden: int) -> RandomWeights:
    if kind.startswith("mamba2"):
        from moe_onnx.graphs.mamba2 import mamba2_sources

        sources = mamba2_sources(spec, hidden)
        return RandomWeights({name: source.graph_shape for name, source in sources.items()})
    else:
        from moe_onnx.graphs.deltanet import deltanet_sources

        sources = deltanet_sources(spec, "qwen3_5_moe", hidden)
        return RandomWeights({name: source.shape for name, source in sources.items()})


def build(kind: str, form: str) -> tuple[bytes, list[tuple[str, tuple[int, ...]]], int]:
    """One mixer's graph in ``form``: the serialized model, its states' (name, shape) and hidden."""
    spec, hidden = MIXERS[kind]
    weights = _weights(kind, spec, hidden)
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": OPSET}, name="mixer")
    builder = onnxscript.GraphBuilder(graph)
    ctx = GraphContext(builder, weights, ir.DataType.FLOAT, OPSET)
    f32 = ir.DataType.FLOAT
    x = builder.input("x", f32, ["B", "S", hidden])
    mask = builder.input("mask", ir.DataType.INT64, ["B", "S"])
    if kind.startswith("mamba2"):
        from moe_onnx.graphs.mamba2 import mamba2_mixer

        states = [("past_conv", (spec.conv_dim, spec.conv_kernel)),
                  ("past_ssm", (spec.num_heads, spec.head_dim, spec.state_size))]
        pasts = [builder.input(name, f32, ["B", *shape]) for name, shape in states]
        outputs = mamba2_mixer(ctx, spec, "", x, mask, *pasts, form=form)
    else:
        from moe_onnx.graphs.deltanet import deltanet_mixer

        states = [("past_conv", (spec.conv_dim, spec.conv_kernel)),
                  ("past_recurrent", (spec.num_v_heads, spec.head_k_dim, spec.head_v_dim))]
        pasts = [builder.input(name, f32, ["B", *shape]) for name, shape in states]
        outputs = deltanet_mixer(ctx, spec, "", x, mask, *pasts, prefill=form)
    for name, value in zip(("y", "present_conv", "present_state"), outputs, strict=True):
        builder.add_output(value, name)
    proto = ir.to_proto(ir.Model(graph, ir_version=IR_VERSION))
    return proto.SerializeToString(), states, hidden


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1,256,2000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = []
    for kind in MIXERS:
        sessions = {}
        for form in FORMS:
            model, states, hidden = build(kind, form)
            sessions[form] = ort.InferenceSession(model, session_options(args.threads),
                                                  providers=["CPUExecutionProvider"])
        for S in lengths:
            rng = np.random.default_rng(S)
            feeds = {"x": rng.standard_normal((1, S, hidden)).astype(np.float32),
                     "mask": np.ones((1, S), np.int64)}
            feeds.update({name: np.zeros((1, *shape), np.float32) for name, shape in states})
            times, outputs = {}, {}
            for form, session in sessions.items():
                outputs[form] = session.run(None, feeds)[0]  # warm-up
                best = float("inf")
                for _ in range(args.reps):
                    start = time.perf_counter()
                    session.run(None, feeds)
                    best = min(best, time.perf_counter() - start)
                times[form] = best
            scale = np.abs(outputs["scan"]).max()
            diff = max(float(np.abs(outputs[f] - outputs["scan"]).max() / scale) for f in FORMS)
            row = dict(mixer=kind, tokens=S, **{f"{f}_ms": 1e3 * times[f] for f in FORMS},
                       scan_over_chunked=times["scan"] / times["chunked"], rel_diff=diff)
            rows.append(row)
            timing = "  ".join(f"{f} {row[f + '_ms']:9.2f} ms" for f in FORMS)
            print(f"{kind:28s} S={S:5d}  {timing}  scan/chunked {row['scan_over_chunked']:5.2f}  "
                  f"(outputs differ by {diff:.1e})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
