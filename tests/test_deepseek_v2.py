"""deepseek_v2 beyond the shared matrices (parity, every impl, greedy generation, quantized weights
and the static cache are in test_parity, test_runtime, test_quantize and test_static_cache): the
cache is the latent transformers caches, not expanded K/V; the runtime grows it with its own
shapes; the group-limited router on forced scores (against transformers' own in test_families);
V2-Lite's figures; inspect; the refusals."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from models import (
    CASES,
    assert_config_value_refused,
    make_model,
    run_router,
)

import moe_onnx
from moe_onnx import contract as io
from moe_onnx import manifest
from moe_onnx import runtime as rt
from moe_onnx.exporter import families
from moe_onnx.exporter.config import Config
from moe_onnx.exporter.describe import describe
from moe_onnx.exporter.families import deepseek_v2
from moe_onnx.exporter.verify import left_padded_batch
from moe_onnx.manifest import ManifestError

# DeepSeek-V2-Lite's config.json as the hub ships it (q_lora_rank null, YaRN in the legacy form).
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
    "vocab_size": 102400,
}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = make_model("deepseek_v2_groups", max_position_embeddings=1024)
    return model, moe_onnx.export(model, tmp_path_factory.mktemp("ds") / "out")


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("case", ["deepseek_v2_groups", "deepseek_v3"])
def test_the_cache_is_the_latent_and_the_roped_key_transformers_caches(case, export, tmp_path):
    """present.{i}.key is the normalised latent [B, 1, T, kv_lora_rank], .value the roped key
    [B, 1, T, qk_rope_head_dim]: the very tensors in transformers' cache, after prefill and a step
    (deepseek_v3 with rope_interleave: in transformers' order, the checkpoint's pairs reordered at load)."""
    model, out = export if case == "deepseek_v2_groups" else (make_model(case), None)
    out = out or moe_onnx.export(model, tmp_path / "out")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    shapes = {v.name: _dims(v) for v in [*graph.input, *graph.output]}
    assert shapes["past_key_values.2.key"] == [io.BATCH, 1, io.PAST, 32]
    assert shapes["past_key_values.2.value"] == [io.BATCH, 1, io.PAST, 8]
    assert shapes["present.0.key"] == [io.BATCH, 1, io.TOTAL, 32]
    assert shapes["present.0.value"] == [io.BATCH, 1, io.TOTAL, 8]
    m = manifest.read(out)
    assert m.kv_dims == ((1, 32), (1, 8))
    assert json.loads((out / manifest.FILENAME).read_text())["kv_dims"] == {"key": [1, 32], "value": [1, 8]}
    assert m.kv_bytes_per_token == 3 * (32 + 8) * 4  # expanded K/V would hold 3 * 4 * (24 + 12) values

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask, pos = left_padded_batch([7, 4], 128, np.random.default_rng(0))
    feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: pos, **io.keep_all(),
             **io.empty_pasts(2, 3, m.kv_dims)}
    past = None
    for _ in range(2):  # prefill, then one step through the cache
        with torch.no_grad():
            past = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         position_ids=torch.from_numpy(pos), past_key_values=past,
                         use_cache=True).past_key_values
        names = io.present_names(3)
        presents = dict(zip(names, session.run(names, feeds), strict=True))
        real = mask.astype(bool)  # padded positions hold whatever either side computed there
        for i, layer in enumerate(past.layers):
            for name, theirs in ((io.PRESENT_KEY % i, layer.keys), (io.PRESENT_VALUE % i, layer.values)):
                ours, theirs = presents[name], theirs.numpy()
                assert ours.shape == theirs.shape, name
                np.testing.assert_allclose(ours[:, 0][real], theirs[:, 0][real], rtol=1e-4, atol=1e-5,
                                           err_msg=name)
        ids = np.array([[3], [9]])
        mask, pos = np.concatenate([mask, np.ones_like(ids)], axis=1), pos[:, -1:] + 1
        feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: pos, **io.keep_all(),
                 **{p: presents[n] for p, n in zip(io.past_names(3), names, strict=True)}}


def test_runtime_caches_and_grows_the_latent(export, tmp_path):
    """The runtime's caches take the manifest's shapes; a static cache grows past 256 positions
    (a copy of both the latent and the roped key) and gives the concat export's logits."""
    model, concat = export
    static = moe_onnx.export(model, tmp_path / "static", kv_cache="static")
    ids = np.random.default_rng(1).integers(0, 128, size=(2, 250))
    ours = {}
    for name, out in (("concat", concat), ("static", static)):
        session = rt.load(out, provider="cpu")
        logits, cache = session.forward(ids)
        steps = []
        for t in range(10):  # past 256: the static buffers grow
            step, cache = session.forward(ids[:, t : t + 1] + 1, cache=cache)
            steps.append(step)
        ours[name] = np.concatenate([logits[:, -1:], *steps], axis=1)
        key, value = cache.layers[1]
        if name == "concat":
            assert key.shape == (2, 1, 260, 32) and value.shape == (2, 1, 260, 8)
        else:
            assert (cache.length, cache.capacity) == (260, 512)
            assert tuple(key.shape()) == (2, 1, 512, 32) and tuple(value.shape()) == (2, 1, 512, 8)
    np.testing.assert_allclose(ours["static"], ours["concat"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["deepseek_v2", "deepseek_v2_groups", "deepseek_v3", "deepseek_v3_halves"])
def test_parameter_counts_match_transformers(case):
    model = make_model(case)
    spec = families.get(CASES[case][0]).spec(Config(model.config.to_dict()))
    biases = (b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))  # stored buffers
    stored = [*model.parameters(), *biases]
    assert spec.parameter_counts()["total"] == sum(t.numel() for t in stored)


def test_v2_lite_caches_576_values_per_token_and_layer():
    """V2-Lite's spec from its hub config: the cache per token and layer is the 512-value latent
    plus the 64-value roped key (576) where expanded K/V would be 16 heads x (192 + 128) = 5,120;
    15.7 B parameters, 2.45 B active (lm_head included); YaRN's mscale_all_dim on the softmax."""
    spec = deepseek_v2.spec(Config(dict(V2_LITE)))
    assert spec.kv_dims() == ((1, 512), (1, 64))
    assert spec.num_heads * (spec.head_dim + spec.mla.v_head_dim) == 5120
    assert spec.parameter_counts() == {"total": 15_706_484_224, "active_per_token": 2_451_437_056}
    assert spec.attention_scale == pytest.approx(192**-0.5 * (0.1 * 0.707 * np.log(40) + 1) ** 2)
    assert spec.rope.interleaved and spec.rope.rope_type == "yarn" and spec.rope.attention_scaling == 1.0
    assert (spec.moe.num_experts, spec.moe.top_k, spec.moe.shared_expert_size) == (64, 6, 2816)
    assert spec.moe_layers == (False,) + (True,) * 26


def test_group_limited_greedy_keeps_the_groups_with_the_best_expert():
    """4 groups of 2, 2 kept: a group's score is its best probability (not the sum of its best two,
    as for the sigmoid router), the chosen are weighed by their softmax over all experts, times the
    scaling factor; plain greedy takes the top 3 of all."""
    from moe_onnx.spec import MoeSpec

    logits = np.array([[8.0, 1.0, 7.0, 0.5, 6.5, 6.4, 0.0, 0.0],  # by sum, groups 2 and 0 would win
                       [0.0, 2.0, 0.1, 0.2, 0.3, 1.9, 3.0, 1.8]])  # 5 is in a dropped group
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    groups = MoeSpec(num_experts=8, top_k=3, expert_size=4, norm_topk_prob=False, n_group=4, topk_group=2,
                     routed_scaling_factor=2.5)
    weights, experts = run_router(groups, logits)
    assert [sorted(e) for e in experts.tolist()] == [[0, 1, 2], [1, 6, 7]]
    np.testing.assert_allclose(weights, 2.5 * np.take_along_axis(probs, experts, -1), rtol=1e-6)
    greedy = MoeSpec(num_experts=8, top_k=3, expert_size=4, norm_topk_prob=False)
    assert [sorted(e) for e in run_router(greedy, logits)[1].tolist()] == [[0, 2, 4], [1, 5, 6]]
    assert run_router(groups, np.zeros((0, 8)))[1].shape == (0, 3)


def test_inspect_names_the_latent_cache_and_the_router(export):
    text = describe(export[1])
    assert "heads 4 (latent attention, q/k head 24, v head 12)" in text
    assert ("attention    multi-head latent: queries by q_a (rank 24) -> norm -> q_b; the cache holds 40 "
            "values per token and layer, the latent 32 + the roped key 8 (expanded K/V: 144, 3.6x more)"
            ) in text
    assert ("router       top-3 of softmax(router logits) within the best 2 of 4 expert groups (a group's "
            "score: its best probability), times 2.5") in text
    assert "kv cache     concat, fp32, 0.5 KB per position" in text
    assert "rope         yarn factor 8, cos/sin scaled by 1.036\n" in text  # not "partial": the roped dims


def test_no_genai_config_and_why(export, caplog, tmp_path):
    """onnxruntime-genai sizes key and value caches alike: no genai_config.json, and the export says so."""
    assert not (export[1] / "genai_config.json").exists()
    with caplog.at_level("WARNING", logger="moe_onnx.export"):
        moe_onnx.export(make_model("deepseek_v2"), tmp_path / "out")
    assert "genai_config.json not written" in caplog.text
    assert "key [batch, 1, positions, 32], value [batch, 1, positions, 8]" in caplog.text


def test_runtime_refuses_a_graph_whose_cache_is_not_its_manifests(export, tmp_path):
    """A manifest naming a latent cache beside a graph with a [B, G, P, D] one (3 layers each)."""
    import shutil

    from moe_onnx.errors import MoeOnnxError

    other = moe_onnx.export(make_model("llama"), tmp_path / "llama")
    shutil.copy(export[1] / manifest.FILENAME, other / manifest.FILENAME)
    message = (r"past_key_values.0.key is \['batch_size', 2, 'past_sequence_length', 24\], "
               r"not the \[batch, 1, positions, 32\] of its manifest's kv_dims")
    with pytest.raises(MoeOnnxError, match=message):
        rt.load(other, provider="cpu")


def test_damaged_kv_dims_are_refused(export, tmp_path):
    data = json.loads((export[1] / manifest.FILENAME).read_text())
    for bad, message in (({"key": [1, 32]}, "kv_dims must be"),
                         ({"key": [4, 24], "value": [4, 24]}, "disagree")):
        with pytest.raises(ManifestError, match=message):
            manifest.Manifest.from_json({**data, "kv_dims": bad})
    del data["kv_dims"]  # an export from before the field: the spec's
    assert manifest.Manifest.from_json(data).kv_dims == ((1, 32), (1, 8))


@pytest.mark.parametrize("options", [dict(dtype="fp16"), dict(kv_dtype="fp16"),
                                     dict(kv_dtype="fp16", kv_cache="static")])
def test_fp16_compute_or_latent_cache_is_close(options, tmp_path):
    from moe_onnx.exporter.verify import compare

    model = make_model("deepseek_v2", seed=2)
    out = moe_onnx.export(model, tmp_path / "out", **options)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # the latent, stored fp16
    report = compare(model, out, manifest.read(out).spec, lengths=(6, 3), decode_steps=2)
    assert report.max_rel <= 2e-2 and report.argmax_agree == 1.0, report


def test_fused_refuses_group_limited_routing_even_unscaled(tmp_path):
    from moe_onnx.errors import ExportError

    with pytest.raises(ExportError, match="fused cannot express group-limited routing"):
        moe_onnx.export(make_model("deepseek_v2_groups", routed_scaling_factor=1.0), tmp_path / "out",
                        moe_impl="fused")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, field, value, message", [
    ("deepseek_v2", "topk_method", "noaux_tc",
     "deepseek_v2 with topk_method 'noaux_tc' is not supported (greedy, group_limited_greedy)"),
    ("deepseek_v2", "norm_topk_prob", True, "deepseek_v2 with norm_topk_prob True is not supported"),
    ("deepseek_v2", "scoring_func", "sigmoid", "deepseek_v2 with scoring_func 'sigmoid' is not supported"),
    ("deepseek_v2", "moe_layer_freq", 2, "deepseek_v2 with moe_layer_freq 2 is not supported"),
    ("deepseek_v2_groups", "n_group", 3,
     "deepseek_v2 with n_routed_experts 8, n_group 3, topk_group 2: the experts must split evenly"),
])
def test_deepseek_v2_unsupported_config_value_is_one_line_naming_it(case, field, value, message, tmp_path):
    assert_config_value_refused(case, field, value, message, tmp_path)
