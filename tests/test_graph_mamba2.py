"""The Mamba2 mixer graph (``moe_onnx.graphs.mamba2``) against transformers' granitemoehybrid
mamba layer run through its hybrid cache: prefill, decode steps, prefill continuing from a state,
left padding, fp16; both prefill forms (Scan and chunked SSD)."""

from functools import cache

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript
import pytest
import torch
from transformers import DynamicCache, GraniteMoeHybridConfig
from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer

from moe_onnx.graphs.context import GraphContext
from moe_onnx.graphs.mamba2 import A_NEG, DT_BIAS, D, mamba2_mixer, mamba2_sources, mamba2_weights
from moe_onnx.spec import Mamba2Spec

H = 32
FORMS = [("scan", 0), ("chunked", 4), ("auto", 4)]  # chunks of 4: S = 7 and 5 span two chunks, padded
FP32, FP16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


@cache
def layer(groups: int, proj_bias: bool = False) -> GraniteMoeHybridMambaLayer:
    """A tiny mamba layer (4 heads of 16, state 8, kernel 4) with random weights throughout;
    ``proj_bias`` also drops the conv's bias (Granite has the conv's, not the projections')."""
    cfg = GraniteMoeHybridConfig(hidden_size=H, num_hidden_layers=1, layer_types=["mamba"], mamba_n_heads=4,
                                 mamba_d_head=16, mamba_d_state=8, mamba_n_groups=groups, mamba_d_conv=4,
                                 mamba_expand=2, mamba_chunk_size=4, num_attention_heads=4, vocab_size=16,
                                 intermediate_size=32, rms_norm_eps=1e-5, mamba_proj_bias=proj_bias,
                                 mamba_conv_bias=not proj_bias)
    torch.manual_seed(groups)
    module = GraniteMoeHybridMambaLayer(cfg, 0).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        module.A_log.copy_(torch.rand(4) * 2 - 1)  # A in [-e, -1/e]
        module.dt_bias.copy_(torch.randn(4))
        module.D.copy_(torch.randn(4))
        module.norm.weight.copy_(1 + torch.randn_like(module.norm.weight) * 0.2)
    module.config = cfg
    return module


def spec_of(module: GraniteMoeHybridMambaLayer) -> Mamba2Spec:
    cfg = module.config
    low, high = cfg.time_step_limit
    return Mamba2Spec(num_heads=cfg.mamba_n_heads, head_dim=cfg.mamba_d_head, state_size=cfg.mamba_d_state,
                      n_groups=cfg.mamba_n_groups, conv_kernel=cfg.mamba_d_conv,
                      intermediate_size=cfg.mamba_expand * cfg.hidden_size, conv_bias=cfg.mamba_conv_bias,
                      proj_bias=cfg.mamba_proj_bias, norm_eps=cfg.rms_norm_eps, time_step_min=low,
                      time_step_max=0.0 if high == float("inf") else high)


class Weights:
    def __init__(self, arrays: dict[str, np.ndarray], dtype: ir.DataType):
        self.arrays, self.dtype = arrays, dtype

    def tensor(self, name):
        return ir.tensor(self.arrays[name].astype(self.dtype.numpy()), name=name)

    def blocked(self, name):
        return None


@cache
def model(groups: int, form: str, chunk: int, dtype: ir.DataType = FP32, drop: str = "", proj_bias=False):
    """The mixer alone as an ONNX model; ``drop`` zeroes one weight."""
    module = layer(groups, proj_bias)
    spec = spec_of(module)
    params = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    arrays = {"mamba." + k: v for k, v in mamba2_weights(spec, H, params.__getitem__).items()}
    if drop:
        arrays["mamba." + drop] = np.zeros_like(arrays["mamba." + drop])
    graph = ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 21}, name="mamba2")
    builder = onnxscript.GraphBuilder(graph)
    ctx = GraphContext(builder, Weights(arrays, dtype), dtype)
    x = builder.input("x", dtype, ["B", "S", H])
    mask = builder.input("mask", ir.DataType.INT64, ["B", "S"])
    conv = builder.input("past_conv", dtype, ["B", spec.conv_dim, spec.conv_kernel])
    ssm = builder.input("past_ssm", dtype, ["B", spec.num_heads, spec.head_dim, spec.state_size])
    kwargs = {"form": form, "chunk_size": chunk} if chunk else {"form": form}
    for value, name in zip(mamba2_mixer(ctx, spec, "mamba.", x, mask, conv, ssm, **kwargs),
                           ("y", "present_conv", "present_ssm"), strict=True):
        builder.add_output(value, name)
    return ir.to_proto(ir.Model(graph, ir_version=10)), spec


def session(*args):
    """The model of ``args`` (see :func:`model`) on onnxruntime CPU."""
    proto, spec = model(*args)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), spec


class Onnx:
    """Runs the graph step by step, feeding its states back."""

    def __init__(self, groups: int, form: str, chunk: int, batch=1, dtype=FP32, drop="", proj_bias=False):
        self.sess, spec = session(groups, form, chunk, dtype, drop, proj_bias)
        self.np = dtype.numpy()
        self.conv = np.zeros((batch, spec.conv_dim, spec.conv_kernel), self.np)
        self.ssm = np.zeros((batch, spec.num_heads, spec.head_dim, spec.state_size), self.np)

    def __call__(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        mask = np.ones(x.shape[:2], np.int64) if mask is None else mask
        feeds = {"x": x.astype(self.np), "mask": mask, "past_conv": self.conv, "past_ssm": self.ssm}
        y, self.conv, self.ssm = self.sess.run(None, feeds)
        return y.astype(np.float32)


class Reference:
    """transformers' layer through the model's hybrid cache (``DynamicCache(config=...)``)."""

    def __init__(self, groups: int, proj_bias: bool = False):
        self.module = layer(groups, proj_bias)
        self.cache = DynamicCache(config=self.module.config)

    def __call__(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        with torch.no_grad():
            mask = None if mask is None else torch.from_numpy(mask)  # the model passes None when unpadded
            return self.module(torch.from_numpy(x), cache_params=self.cache, attention_mask=mask).numpy()

    @property
    def conv(self) -> np.ndarray:
        return self.cache.layers[0].conv_states[0].numpy()

    @property
    def ssm(self) -> np.ndarray:
        return self.cache.layers[0].recurrent_states[0].numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b).max() / np.abs(b).max())


def assert_same(ours: Onnx, ref: Reference, y: np.ndarray, y_ref: np.ndarray, tol: float = 1e-4) -> None:
    assert rel(y, y_ref) < tol
    assert rel(ours.conv, ref.conv) < tol
    assert rel(ours.ssm, ref.ssm) < tol


def tokens(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("groups,proj_bias", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("form,chunk", FORMS)
def test_prefill_then_decode_steps(groups, proj_bias, form, chunk):
    ours, ref = Onnx(groups, form, chunk, proj_bias=proj_bias), Reference(groups, proj_bias)
    assert_same(ours, ref, ours(x := tokens(0, (1, 7, H))), ref(x))
    for step in range(3):
        assert_same(ours, ref, ours(x := tokens(1 + step, (1, 1, H))), ref(x))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("form,chunk", FORMS)
def test_prefill_continues_from_a_state(groups, form, chunk):
    ours, ref = Onnx(groups, form, chunk), Reference(groups)
    ours(x := tokens(0, (1, 7, H))), ref(x)
    assert np.abs(ours.ssm).max() > 0.1
    assert_same(ours, ref, ours(x := tokens(1, (1, 5, H))), ref(x))


@pytest.mark.parametrize("form,chunk", FORMS)
def test_left_padding_leaves_real_positions_and_states_as_unpadded(form, chunk):
    x = tokens(0, (2, 7, H))  # row 1: 3 positions of padding (non-zero inputs) then 4 tokens
    mask = np.array([[1] * 7, [0] * 3 + [1] * 4], np.int64)
    batch, ref = Onnx(2, form, chunk, batch=2), Reference(2)
    y, y_ref = batch(x, mask), ref(x, mask)
    assert_same(batch, ref, y, y_ref)
    for row, real in ((0, slice(0, 7)), (1, slice(3, 7))):
        alone = Onnx(2, form, chunk)
        assert rel(y[row:row + 1, real], alone(x[row:row + 1, real])) < 1e-5
        assert rel(batch.conv[row], alone.conv[0]) < 1e-5
        assert rel(batch.ssm[row], alone.ssm[0]) < 1e-5


@pytest.mark.parametrize("form,chunk", FORMS)
def test_fp16_graph_matches_fp32_transformers(form, chunk):
    ours, ref = Onnx(2, form, chunk, dtype=FP16), Reference(2)
    assert ours.conv.dtype == np.float16
    assert_same(ours, ref, ours(x := tokens(0, (1, 7, H))), ref(x), tol=2e-2)
    assert_same(ours, ref, ours(x := tokens(1, (1, 1, H))), ref(x), tol=2e-2)


@pytest.mark.parametrize("form,chunk", FORMS)
def test_graph_is_standard_onnx(form, chunk):
    proto, _ = model(2, form, chunk)
    onnx.checker.check_model(proto, full_check=True)
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    assert {domain for domain, _ in ops} == {""}
    assert (("", "Scan") in ops) == (form == "scan")


@pytest.mark.parametrize("groups,proj_bias", [(1, False), (2, True)])
def test_sources_name_every_tensor_of_the_layer_with_its_shape(groups, proj_bias):
    params = layer(groups, proj_bias).state_dict()
    sources = mamba2_sources(spec_of(layer(groups, proj_bias)), H).values()
    assert {s.tensor: s.shape for s in sources} == {k: tuple(v.shape) for k, v in params.items()}


@pytest.mark.parametrize("drop", [D, DT_BIAS, A_NEG])
def test_parity_fails_without_a_term(drop):
    """The weights are random enough that dropping any one term is far outside the tolerance."""
    ours, ref = Onnx(1, "scan", 0, drop=drop), Reference(1)
    y, y_ref = ours(x := tokens(0, (1, 7, H))), ref(x)
    assert rel(y, y_ref) > 1e-2 or rel(ours.ssm, ref.ssm) > 1e-2
