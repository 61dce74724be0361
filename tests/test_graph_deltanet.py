"""The Gated DeltaNet mixer graph (moe_onnx.graphs.deltanet) against transformers' layer and cache,
for both checkpoint layouts (qwen3_next's fused projections, qwen3_5_moe's separate ones): prefill,
decode steps, a prefill continuing from a state, left padding, fp16, and the chunked prefill."""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
import pytest
import torch

from moe_onnx.graphs.context import GraphContext
from moe_onnx.graphs.deltanet import deltanet_mixer, deltanet_weights
from moe_onnx.spec import DeltaNetSpec

FAMILIES = ("qwen3_next", "qwen3_5_moe")
SPEC = DeltaNetSpec(num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16, conv_kernel=4)
H = 64
DTYPES = {"fp32": (ir.DataType.FLOAT, np.float32), "fp16": (ir.DataType.FLOAT16, np.float16)}


@functools.cache
def torch_layer(family: str):
    """A transformers GatedDeltaNet of ``family`` with random weights (decay and gate included)."""
    if family == "qwen3_next":
        from transformers import Qwen3NextConfig as Config
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet as Layer
    else:
        from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig as Config
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet as Layer
    config = Config(hidden_size=H, num_hidden_layers=1, layer_types=["linear_attention"],
                    linear_num_key_heads=SPEC.num_k_heads, linear_num_value_heads=SPEC.num_v_heads,
                    linear_key_head_dim=SPEC.head_k_dim, linear_value_head_dim=SPEC.head_v_dim,
                    linear_conv_kernel_dim=SPEC.conv_kernel, rms_norm_eps=SPEC.norm_eps, dtype="float32")
    torch.manual_seed(0)
    layer = Layer(config, 0).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "A_log":
                p.copy_(torch.randn_like(p) * 0.5 - 1.0)
            elif name == "norm.weight":
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.3 if "conv" in name else 0.12))
    return config, layer


class DictWeights:
    def __init__(self, weights: dict[str, np.ndarray], dtype):
        self.weights, self.dtype = weights, dtype

    def tensor(self, name):
        return ir.tensor(self.weights[name].astype(self.dtype), name=name)

    def blocked(self, name):
        return None


@functools.cache
def session(family: str, dtype: str = "fp32", prefill: str = "scan") -> ort.InferenceSession:
    """An ONNX model of the mixer alone: inputs x, mask, past_conv, past_recurrent; outputs y and
    the presents."""
    onnx_dtype, np_dtype = DTYPES[dtype]
    _, layer = torch_layer(family)
    state = {k: v.float().numpy() for k, v in layer.state_dict().items()}
    weights = {"l." + k: v for k, v in deltanet_weights(state.__getitem__, family, SPEC).items()}
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 21}, name="deltanet")
    builder = onnxscript.GraphBuilder(graph)
    ctx = GraphContext(builder, DictWeights(weights, np_dtype), onnx_dtype)
    s = SPEC
    x = builder.input("x", onnx_dtype, ["B", "S", H])
    mask = builder.input("mask", ir.DataType.INT64, ["B", "S"])
    conv = builder.input("past_conv", onnx_dtype, ["B", s.conv_dim, s.conv_kernel])
    rec = builder.input("past_recurrent", onnx_dtype, ["B", s.num_v_heads, s.head_k_dim, s.head_v_dim])
    for value, name in zip(deltanet_mixer(ctx, s, "l.", x, mask, conv, rec, prefill=prefill),
                           ("y", "present_conv", "present_recurrent"), strict=True):
        builder.add_output(value, name)
    model = ir.to_proto(ir.Model(graph, ir_version=10))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def zero_states(batch: int, dtype=np.float32):
    s = SPEC
    return (np.zeros((batch, s.conv_dim, s.conv_kernel), dtype),
            np.zeros((batch, s.num_v_heads, s.head_k_dim, s.head_v_dim), dtype))


def run(sess, x, mask, states, dtype=np.float32):
    """The graph's (y, present_conv, present_recurrent) as float32."""
    feeds = {"x": x.astype(dtype), "mask": mask, "past_conv": states[0].astype(dtype),
             "past_recurrent": states[1].astype(dtype)}
    return [o.astype(np.float32) for o in sess.run(None, feeds)]


class Reference:
    """transformers' layer with the cache its model builds (DynamicCache from the config), fed the
    recurrent-layer mask its model's forward makes."""

    def __init__(self, family: str):
        from transformers import DynamicCache

        self.config, self.layer = torch_layer(family)
        self.cache = DynamicCache(config=self.config)
        self.mask = None

    def step(self, x: np.ndarray, mask: np.ndarray | None = None):
        from transformers.masking_utils import create_recurrent_attention_mask

        new = torch.ones(x.shape[:2], dtype=torch.long) if mask is None else torch.from_numpy(mask)
        self.mask = new if self.mask is None else torch.cat([self.mask, new], dim=1)
        xt = torch.from_numpy(x)
        layer_mask = create_recurrent_attention_mask(self.config, xt, self.mask, self.cache)
        with torch.no_grad():
            y = self.layer(xt, cache_params=self.cache, attention_mask=layer_mask)
        cache = self.cache.layers[0]
        return y.numpy(), cache.conv_states[0].numpy().copy(), cache.recurrent_states[0].numpy().copy()


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def inputs(batch: int, seq: int, seed: int):
    x = np.random.default_rng(seed).standard_normal((batch, seq, H)).astype(np.float32)
    return x, np.ones((batch, seq), np.int64)


def assert_close(got, want, tol):
    for name, g, w in zip(("y", "conv", "recurrent"), got, want, strict=True):
        assert g.shape == w.shape, name
        assert rel(g, w) < tol, (name, rel(g, w))


@pytest.mark.parametrize("prefill", ["scan", "chunked", "auto"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_steps_match_transformers(family, prefill):
    sess, ref = session(family, prefill=prefill), Reference(family)
    x, mask = inputs(1, 7, seed=1)
    got, want = run(sess, x, mask, zero_states(1)), ref.step(x)
    assert_close(got, want, 1e-4)
    assert np.abs(want[2]).max() > 0.1  # the state carries something to compare
    for t in range(3):
        x, mask = inputs(1, 1, seed=10 + t)
        got, want = run(sess, x, mask, got[1:]), ref.step(x)
        assert_close(got, want, 1e-4)


@pytest.mark.parametrize("prefill", ["scan", "chunked", "auto"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_continues_from_a_state(family, prefill):
    sess, ref = session(family, prefill=prefill), Reference(family)
    x, mask = inputs(1, 7, seed=2)
    first = run(sess, x, mask, zero_states(1))
    ref.step(x)
    x, mask = inputs(1, 5, seed=3)
    assert_close(run(sess, x, mask, first[1:]), ref.step(x), 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_is_invisible(family):
    sess, pad = session(family), 3
    x, mask = inputs(2, 7, seed=4)
    mask[1, :pad] = 0
    x[1, :pad] = 100.0  # padding's inputs must not matter
    y, conv, rec = run(sess, x, mask, zero_states(2))
    y1, conv1, rec1 = run(sess, x[1:, pad:], mask[1:, pad:], zero_states(1))
    assert rel(y[1:, pad:], y1) < 1e-5 and rel(conv[1:], conv1) < 1e-5 and rel(rec[1:], rec1) < 1e-5
    assert_close((y, conv, rec), Reference(family).step(x, mask), 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_graph_is_close_to_float32_transformers(family):
    sess, ref = session(family, "fp16"), Reference(family)
    x, mask = inputs(1, 7, seed=5)
    got, want = run(sess, x, mask, zero_states(1), np.float16), ref.step(x)
    assert_close(got, want, 2e-2)
    x, mask = inputs(1, 1, seed=6)
    assert_close(run(sess, x, mask, got[1:], np.float16), ref.step(x), 2e-2)


def test_chunked_prefill_matches_the_scan_across_chunks():
    """Past one chunk of 64 (and not a multiple of it), from a non-zero state."""
    scan, chunked = session("qwen3_next"), session("qwen3_next", prefill="chunked")
    x, mask = inputs(2, 150, seed=7)
    mask[1, :70] = 0
    states = [s + np.random.default_rng(8).standard_normal(s.shape).astype(np.float32) * 0.3
              for s in zero_states(2)]
    assert_close(run(chunked, x, mask, states), run(scan, x, mask, states), 1e-4)


def test_weight_layouts_agree():
    """qwen3_next's interleaved projections and qwen3_5_moe's separate ones give the same
    canonical in_proj for the same q, k, v, z, b, a rows."""
    s, rng = SPEC, np.random.default_rng(9)
    G, r, Dk, Dv = s.num_k_heads, s.num_v_heads // s.num_k_heads, s.head_k_dim, s.head_v_dim
    q, k = (rng.standard_normal((G, Dk, H)) for _ in range(2))
    v, z = (rng.standard_normal((G, r * Dv, H)) for _ in range(2))
    b, a = (rng.standard_normal((G, r, H)) for _ in range(2))
    common = {"conv1d.weight": np.zeros((s.conv_dim, 1, s.conv_kernel)), "dt_bias": 0, "A_log": 0,
              "norm.weight": 0, "out_proj.weight": np.zeros((H, s.num_v_heads * Dv))}
    fused = {"in_proj_qkvz.weight": np.concatenate([q, k, v, z], axis=1).reshape(-1, H),
             "in_proj_ba.weight": np.concatenate([b, a], axis=1).reshape(-1, H), **common}
    separate = {"in_proj_qkv.weight": np.concatenate([x.reshape(-1, H) for x in (q, k, v)]),
                "in_proj_z.weight": z.reshape(-1, H), "in_proj_b.weight": b.reshape(-1, H),
                "in_proj_a.weight": a.reshape(-1, H), **common}
    one = deltanet_weights(fused.__getitem__, "qwen3_next", s)["in_proj"]
    other = deltanet_weights(separate.__getitem__, "qwen3_5_moe", s)["in_proj"]
    assert one.shape == (H, s.conv_dim + s.num_v_heads * (Dv + 2))
    np.testing.assert_array_equal(one, other)
