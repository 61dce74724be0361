"""What onnxruntime charges per kernel on this machine: the numbers behind a decode step's fixed cost.

    python -m studies.kernel_costs [--shape coarse|fine] [--threads 2] [--rounds 5]

Small single-purpose graphs, each timed in interleaved rounds (median of round medians):

- ``per node``: a chain of 200 nodes of one kind on a ``[1, 1, H]`` row (elementwise, Reshape,
  Split + Concat, ReduceSum): the executor's cost per kernel when the kernel does almost nothing.
- ``zero rows``: 16 int4 expert projections (``DequantizeLinear`` -> ``MatMul``, fused by onnxruntime
  into ``MatMulNBits``) fed zero rows, as dispatch feeds the experts no token chose; beside them
  the same projections each behind an ``If`` whose branch is not taken (what skipping them with
  control flow would cost instead); and both on one row, the ``If`` taken.
- ``gemv``: one row through the int4 and int8 projections of the bench shape (block 32, fused into
  ``MatMulNBits`` with onnxruntime's default int8 activations), through per-column int8 in standard
  ops (``DynamicQuantizeLinear`` -> ``MatMulInteger``, fused into ``DynamicQuantizeMatMul``) and
  through their fp32 twins: µs, GB/s on the weight bytes (scales included) and weights per second.
- ``chosen experts``: the gate_up projection of the k experts one token chose, as ``dispatch`` runs
  it (Split by per-expert counts, one int4 projection per expert, E - k of them on zero rows,
  Concat) and as one chain whose size does not grow with E, in standard ops (Gather the chosen
  experts' int8 weights, ``DynamicQuantizeLinear`` the token, ``MatMulInteger``, scale).
- ``attention``: one query row over a ``[1, G, T, D]`` cache through the standard ``Attention`` op
  and through the spelled-out MatMul / Softmax / MatMul with the query heads folded into rows.

Only the kernels' own cost: caches are warm (each graph is small), so these are floors, not the
in-model figures (``step_profile`` and ``decode_ab`` give those).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

CHAIN = 200
EXPERTS = 16
F32 = TensorProto.FLOAT


def _session(nodes, inputs, outputs, inits, threads: int, opset: int = 21) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _io(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, shape)


def _int4(name: str, K: int, N: int, rng, bits: int = 4) -> list[onnx.TensorProto]:
    """An int4 (or int8) ``[K, N]`` weight and its float32 scales per 32 rows."""
    q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (K, N)).astype(np.int8)
    scales = (rng.random((K // 32, N)) * 0.01 + 1e-3).astype(np.float32)
    weight = helper.make_tensor(name, TensorProto.INT4, [K, N], q.ravel().tolist()) if bits == 4 else \
        numpy_helper.from_array(q, name)
    return [weight, numpy_helper.from_array(scales, name + "_scale")]


def _projection(name: str, x: str, out: str) -> list[onnx.NodeProto]:
    dq = helper.make_node("DequantizeLinear", [name, name + "_scale"], [name + "_dq"], axis=0, block_size=32)
    return [dq, helper.make_node("MatMul", [x, name + "_dq"], [out])]


def per_node(H: int, threads: int) -> dict[str, tuple[ort.InferenceSession, dict, int]]:
    """Chains of cheap kernels: name -> (session, feeds, kernels run)."""
    shape = numpy_helper.from_array(np.array([0, 0, H], np.int64), "shape")
    split = numpy_helper.from_array(np.array([H // 2, H - H // 2], np.int64), "split")
    axis = numpy_helper.from_array(np.array([-1], np.int64), "axis")
    kinds = {
        "Mul": lambda p, i: ([helper.make_node("Mul", [p, p], [f"t{i}"])], 1),
        "Reshape + Mul": lambda p, i: ([helper.make_node("Reshape", [p, "shape"], [f"r{i}"]),
                                        helper.make_node("Mul", [f"r{i}", f"r{i}"], [f"t{i}"])], 2),
        "Split + Concat": lambda p, i: (
            [helper.make_node("Split", [p, "split"], [f"a{i}", f"b{i}"], axis=-1),
             helper.make_node("Concat", [f"b{i}", f"a{i}"], [f"t{i}"], axis=-1)], 2),
        "ReduceSum + Add": lambda p, i: ([helper.make_node("ReduceSum", [p, "axis"], [f"r{i}"]),
                                          helper.make_node("Add", [p, f"r{i}"], [f"t{i}"])], 2),
    }
    out = {}
    for name, make in kinds.items():
        nodes, prev, kernels = [], "x", 0
        for i in range(CHAIN):
            made, n = make(prev, i)
            nodes, prev, kernels = nodes + made, f"t{i}", kernels + n
        session = _session(nodes, [_io("x", [1, 1, H])], [_io(prev, None)], [shape, split, axis], threads)
        out[name] = (session, {"x": np.full((1, 1, H), 0.5, np.float32)}, kernels)
    return out


def zero_rows(H: int, F: int, threads: int, rng) -> dict[str, tuple[ort.InferenceSession, dict, int]]:
    """16 expert projections on zero rows, plain and each behind an untaken If; and on one row,
    plain and behind a taken If (what gating would add to the experts a token chose)."""
    plain, gated, inits, outputs, gated_outputs = [], [], [], [], []
    for e in range(EXPERTS):
        weight = _int4(f"e{e}", H, F, rng)
        inits += weight
        plain += _projection(f"e{e}", "x", f"y{e}")
        outputs.append(_io(f"y{e}", None))
        taken = helper.make_graph(_projection(f"g{e}", "x", f"t{e}"), f"then{e}", [], [_io(f"t{e}", None)],
                                  initializer=[_renamed(w, f"e{e}", f"g{e}") for w in weight])
        empty = helper.make_graph([helper.make_node("Constant", [], [f"z{e}"], value=numpy_helper.from_array(
            np.zeros((0, F), np.float32)))], f"else{e}", [], [_io(f"z{e}", None)])
        gated.append(helper.make_node("If", ["cond"], [f"y{e}"], then_branch=taken, else_branch=empty))
        gated_outputs.append(_io(f"y{e}", None))
    x = _io("x", ["T", H])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    empty = {"x": np.zeros((0, H), np.float32), "cond": np.array(False)}
    row = {"x": rng.standard_normal((1, H)).astype(np.float32), "cond": np.array(True)}
    plain_session = _session(plain, [x], outputs, inits, threads)
    gated_session = _session(gated, [x, cond], gated_outputs, [], threads)
    return {"MatMulNBits, 0 rows": (plain_session, {"x": empty["x"]}, EXPERTS),
            "If, not taken": (gated_session, empty, EXPERTS),
            "MatMulNBits, 1 row": (plain_session, {"x": row["x"]}, EXPERTS),
            "If, taken, 1 row": (gated_session, row, EXPERTS)}


def _renamed(tensor: onnx.TensorProto, old: str, new: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = tensor.name.replace(old, new, 1)
    return copy


def gemv(shapes: dict[str, tuple[int, int]], threads: int, rng) -> dict[str, tuple]:
    """One row through each ``[K, N]`` projection, int4, int8 and fp32: name -> (session, feeds,
    weight bytes, weights)."""
    out = {}
    for name, (K, N) in shapes.items():
        x = rng.standard_normal((1, K)).astype(np.float32)
        for bits in (4, 8):
            quantized = _session(_projection("w", "x", "y"), [_io("x", [1, K])], [_io("y", None)],
                                 _int4("w", K, N, rng, bits), threads)
            out[f"{name} int{bits}"] = (quantized, {"x": x}, K * N * bits // 8 + K // 32 * N * 4, K * N)
        per_column = _per_column_int8(K, N, threads, rng)
        out[f"{name} int8 per-column"] = (per_column, {"x": x}, K * N + N * 4, K * N)
        dense = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w")
        out[f"{name} fp32"] = (_session([helper.make_node("MatMul", ["x", "w"], ["y"])], [_io("x", [1, K])],
                                        [_io("y", None)], [dense], threads), {"x": x}, K * N * 4, K * N)
    return out


def _per_column_int8(K: int, N: int, threads: int, rng) -> ort.InferenceSession:
    """The standard int8 pattern ``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> scale (one scale per
    output column), which onnxruntime fuses into its ``DynamicQuantizeMatMul``."""
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["acc_f"], to=F32),
             helper.make_node("Mul", ["xs", "w_scale"], ["scale"]),
             helper.make_node("Mul", ["acc_f", "scale"], ["y"])]
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (K, N)).astype(np.int8), "w"),
             numpy_helper.from_array((rng.random(N) * 0.01 + 1e-3).astype(np.float32), "w_scale")]
    return _session(nodes, [_io("x", [1, K])], [_io("y", None)], inits, threads)


def chosen_experts(E: int, K: int, H: int, N: int, threads: int, rng) -> dict[str, tuple]:
    """The ``[H, N]`` projection of the K experts of one token: dispatch's E projections (K on one
    row each) between a Split and a Concat, and the gathered int8 weights through MatMulInteger."""
    inits, nodes = [numpy_helper.from_array(np.array([1] * K + [0] * (E - K), np.int64), "counts")], []
    nodes.append(helper.make_node("Split", ["x", "counts"], [f"r{e}" for e in range(E)], axis=0))
    for e in range(E):
        inits += _int4(f"w{e}", H, N, rng)
        nodes += _projection(f"w{e}", f"r{e}", f"y{e}")
    nodes.append(helper.make_node("Concat", [f"y{e}" for e in range(E)], ["y"], axis=0))
    dispatch = _session(nodes, [_io("x", [K, H])], [_io("y", None)], inits, threads)
    gathered = [helper.make_node("Gather", ["w", "experts"], ["wk"], axis=0),
                helper.make_node("Gather", ["w_scale", "experts"], ["sk"], axis=0),
                helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                helper.make_node("MatMulInteger", ["xq", "wk", "xz"], ["acc"]),
                helper.make_node("Cast", ["acc"], ["acc_f"], to=F32),
                helper.make_node("Mul", ["acc_f", "xs"], ["t"]),
                helper.make_node("Mul", ["t", "sk"], ["y"])]
    weights = [numpy_helper.from_array(rng.integers(-127, 128, (E, H, N)).astype(np.int8), "w"),
               numpy_helper.from_array((rng.random((E, 1, N)) * 0.01 + 1e-3).astype(np.float32), "w_scale")]
    experts = helper.make_tensor_value_info("experts", TensorProto.INT64, [K])
    gather = _session(gathered, [_io("x", [1, H]), experts], [_io("y", None)], weights, threads)
    x = rng.standard_normal((K, H)).astype(np.float32)
    chosen = np.sort(rng.choice(E, K, replace=False)).astype(np.int64)
    # one output row per chosen expert either way
    assert dispatch.run(None, {"x": x})[0].shape == (K, N)
    assert gather.run(None, {"x": x[:1], "experts": chosen})[0].shape == (K, 1, N)
    return {f"dispatch: {E} MatMulNBits, {K} rows": (dispatch, {"x": x}),
            f"gathered int8 of {K}: MatMulInteger": (gather, {"x": x[:1], "experts": chosen})}


def attention(N: int, G: int, D: int, contexts: list[int], threads: int, rng) -> dict[str, tuple]:
    """One query row over T cached positions: the Attention op and the spelled-out form."""
    R = N // G
    op = [helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], scale=D**-0.5)]
    spelled = [helper.make_node("Reshape", ["q", "rows"], ["qr"]),
               helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
               helper.make_node("MatMul", ["qr", "kt"], ["s"]),
               helper.make_node("Mul", ["s", "scale"], ["ss"]),
               helper.make_node("Add", ["ss", "m"], ["l"]),
               helper.make_node("Softmax", ["l"], ["p"], axis=-1),
               helper.make_node("MatMul", ["p", "v"], ["c"]),
               helper.make_node("Reshape", ["c", "heads"], ["y"])]
    consts = [numpy_helper.from_array(np.array([1, G, R, D], np.int64), "rows"),
              numpy_helper.from_array(np.array([1, N, 1, D], np.int64), "heads"),
              numpy_helper.from_array(np.array(D**-0.5, np.float32), "scale")]
    inputs = [_io("q", [1, N, 1, D]), _io("k", [1, G, "T", D]), _io("v", [1, G, "T", D]),
              _io("m", [1, 1, 1, "T"])]
    sessions = {"Attention op": _session(op, inputs, [_io("y", None)], [], threads, opset=23),
                "spelled out": _session(spelled, inputs, [_io("y", None)], consts, threads, opset=23)}
    out = {}
    for T in contexts:
        feeds = {"q": rng.standard_normal((1, N, 1, D)).astype(np.float32),
                 "k": rng.standard_normal((1, G, T, D)).astype(np.float32),
                 "v": rng.standard_normal((1, G, T, D)).astype(np.float32),
                 "m": np.zeros((1, 1, 1, T), np.float32)}
        results = [session.run(None, feeds)[0] for session in sessions.values()]
        np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-5)  # the same attention
        for name, session in sessions.items():
            out[f"{name} @{T}"] = (session, feeds, 1)
    return out


def time_units(units: dict[str, tuple], rounds: int, runs: int) -> dict[str, float]:
    """name -> seconds per run, the median over rounds of each round's median (units interleaved)."""
    per_round: dict[str, list[float]] = {name: [] for name in units}
    for session, feeds, *_ in units.values():
        for _ in range(10):
            session.run(None, feeds)
    for _ in range(rounds):
        for name, (session, feeds, *_) in units.items():
            session.run(None, feeds)
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feeds)
                samples.append(time.perf_counter() - start)
            per_round[name].append(float(np.median(samples)))
    return {name: float(np.median(r)) for name, r in per_round.items()}


def main(argv=None) -> None:
    from moe_onnx.benchmarks.models import DEFAULT_SHAPES, shape_named

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=[s.name for s in DEFAULT_SHAPES], default="coarse")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--contexts", default="256,2048")
    p.add_argument("--tiny", action="store_true", help="the tiny twin of the shape (a smoke test)")
    args = p.parse_args(argv)
    shape = shape_named(args.shape, args.tiny)
    H, F, D = shape.hidden, shape.expert_width, shape.hidden // shape.heads
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, CPU, {args.threads} threads, {args.shape} shape (hidden {H}, "
          f"expert width {F}); median of {args.rounds} interleaved rounds x {args.runs} runs")

    chains = per_node(H, args.threads)
    print("per kernel, chains of cheap kernels:")
    for name, seconds in time_units(chains, args.rounds, args.runs).items():
        print(f"  {name:28s} {seconds / chains[name][2] * 1e6:6.2f} us per kernel")
    experts = zero_rows(H, 2 * F, args.threads, rng)
    print(f"experts on zero rows and on one ({EXPERTS} gate_up projections [{H}, {2 * F}]):")
    for name, seconds in time_units(experts, args.rounds, args.runs).items():
        print(f"  {name:28s} {seconds / EXPERTS * 1e6:6.2f} us per expert")
    shapes = {"qkv": (H, (shape.heads + 2 * shape.kv_heads) * D), "expert gate_up": (H, 2 * F),
              "expert down": (F, H), "lm_head": (H, shape.vocab)}
    projections = gemv(shapes, args.threads, rng)
    print("one row through a projection (decode):")
    for name, seconds in time_units(projections, args.rounds, args.runs).items():
        _, _, size, weights = projections[name]
        print(f"  {name:32s} {seconds * 1e6:7.1f} us  {size / seconds / 1e9:5.1f} GB/s  "
              f"{weights / seconds / 1e9:5.1f} G weights/s")
    chosen = chosen_experts(shape.experts, shape.top_k, H, 2 * F, args.threads, rng)
    print(f"the chosen experts' gate_up projections [{H}, {2 * F}] at one token (top-{shape.top_k} "
          f"of {shape.experts}):")
    for name, seconds in time_units(chosen, args.rounds, args.runs).items():
        print(f"  {name:40s} {seconds * 1e6:7.1f} us")
    contexts = [int(c) for c in args.contexts.split(",")]
    attend = attention(shape.heads, shape.kv_heads, D, contexts, args.threads, rng)
    print(f"one query over the cache ({shape.heads} heads, {shape.kv_heads} KV heads, head {D}, fp32):")
    for name, seconds in time_units(attend, args.rounds, args.runs).items():
        print(f"  {name:28s} {seconds * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
