"""The single sources of truth: the dtype table, the typed manifest, the runtime's provider choice,
fp16 range checks, and the package's import graph."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
import torch
from models import make_model

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx import dtypes, manifest
from moe_onnx.errors import ExportError, MoeOnnxError
from moe_onnx.runtime import providers

PACKAGE = Path(moe_onnx.__file__).parent


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = make_model("llama", num_hidden_layers=2, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return moe_onnx.export(model, tmp_path_factory.mktemp("structure") / "llama")


def test_dtype_rows_agree_with_numpy_onnx_and_onnxruntime():
    import onnx

    for row in dtypes.DTYPES.values():
        assert onnx.helper.tensor_dtype_to_np_dtype(row.onnx) == np.dtype(row.numpy)
        info = ml_dtypes.finfo(row.numpy) if row.is_float else ml_dtypes.iinfo(row.numpy)
        assert info.bits == row.bits
        onnx_name = onnx.helper.tensor_dtype_to_string(row.onnx)[len("TensorProto."):]
        assert row.ort == f"tensor({onnx_name.lower()})"
    assert dtypes.by_ort("tensor(float16)").name == "fp16"
    with pytest.raises(MoeOnnxError, match="unknown compute dtype 'fp8'"):
        dtypes.get("fp8")


def test_no_other_dtype_tables():
    """Only dtypes.py spells out the dtype names as a table (a dict or tuple of several of them)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "dtypes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Dict, ast.Tuple, ast.List, ast.Set)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                names = {k.value for k in items if isinstance(k, ast.Constant) and k.value in dtypes.DTYPES}
                if len(names) >= 2:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


def test_manifest_round_trip_and_errors(llama, tmp_path):
    m = manifest.read(llama)
    assert manifest.Manifest.from_json(m.to_json()) == m
    assert (m.dtype, m.weights, m.model_type) == ("fp32", "fp32", "llama")
    out = shutil.copytree(llama, tmp_path / "copy")
    data = json.loads((out / manifest.FILENAME).read_text())
    for change, message in [({"format": "other/9"}, "unknown format"),
                            ({"dtype": "fp8"}, "unknown compute dtype"),
                            ({"weights": "int3"}, "unknown weight dtype"),
                            ({"spec": {"vocab_size": 3}}, "not a valid")]:
        (out / manifest.FILENAME).write_text(json.dumps({**data, **change}))
        with pytest.raises(manifest.ManifestError, match=message):
            manifest.read(out)
    with pytest.raises(manifest.ManifestError, match="not a moe-onnx export"):
        manifest.read(tmp_path)


def test_manifest_of_an_older_export_with_hidden_act_still_reads(llama, tmp_path):
    """Exports before the spec dropped ``hidden_act`` (written, never read) carry it."""
    out = shutil.copytree(llama, tmp_path / "old")
    data = json.loads((out / manifest.FILENAME).read_text())
    data["spec"]["hidden_act"] = "silu"
    (out / manifest.FILENAME).write_text(json.dumps(data))
    assert manifest.read(out).spec == manifest.read(llama).spec


def test_manifest_is_parsed_in_one_place():
    readers = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if '"moe_onnx.json"' in p.read_text() or "'moe_onnx.json'" in p.read_text()]
    assert readers == ["manifest.py"]


def test_fp16_export_refuses_values_beyond_its_range(tmp_path):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = 1e6
    with pytest.raises(ExportError, match=r"'layers.1.mlp.down' holds 1 values beyond the fp16 range"):
        moe_onnx.export(model, tmp_path / "out", dtype="fp16")
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary directory


def test_runtime_uses_the_provider_the_session_really_got(llama, monkeypatch):
    """onnxruntime may place the model on CPU although CUDA was asked for: the steps must follow."""
    cuda = providers.Placement("cuda", providers.CUDA, (providers.CUDA, providers.CPU))
    monkeypatch.setattr(providers, "resolve", lambda provider: cuda)
    real = ort.InferenceSession
    seen = {}

    def cpu_only(path, options, providers):
        seen["providers"] = providers
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", cpu_only)
    session = rt.load(llama, provider="auto")
    assert session.device == "cpu"
    assert session.generate([1, 2, 3], max_new_tokens=3).ids[0]
    assert seen["providers"][0] == (providers.CUDA, {"use_tf32": "0"})  # TF32 off unless asked for
    with pytest.raises(providers.ProviderError, match="could not place"):
        rt.load(llama, provider="cuda")


def test_no_import_cycles():
    """Imports inside the package, lazy ones in functions included, form no cycle."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        mod = ".".join(("moe_onnx", *parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_onnx"):
                deps |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("moe_onnx")}
        graph[mod] = deps
    graph = {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, " -> ".join([*stack, m, d])
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
