"""The graph is written so ONNX Runtime's own fusions apply, and fusing changes no result."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from models import make_model

import moe_onnx


def _session(path, level, optimized=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if optimized:
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "opt.data"
        )
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_rmsnorm_fuses_and_fusion_changes_nothing(tmp_path):
    model = make_model("qwen2_moe")
    out = moe_onnx.export(model, tmp_path / "out")
    fused = _session(out / "model.onnx", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, tmp_path / "opt.onnx")
    plain = _session(out / "model.onnx", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    optimized = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in optimized.graph.node)
    # Every RMSNorm (2 per layer + the final one) became one fused node.
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 2 * 3 + 1
    ids = np.array([[3, 14, 15, 92, 65, 35]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None],
             "num_logits_to_keep": np.array(0)}
    for inp in plain.get_inputs()[3:]:
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), np.float32)
    np.testing.assert_allclose(fused.run(["logits"], feeds)[0], plain.run(["logits"], feeds)[0],
                               rtol=1e-4, atol=1e-5)
