"""``export(src, out, options, **kwargs)``: one ExportOptions value, or its fields as keywords."""

import dataclasses

import pytest
from models import make_model

import moe_onnx
from moe_onnx import manifest
from moe_onnx.errors import ExportError
from moe_onnx.exporter import ExportOptions, export


def test_options_and_keywords_make_the_same_export(tmp_path):
    model = make_model("mixtral")
    by_keywords = moe_onnx.export(model, tmp_path / "kw", weights="int8", moe_impl="gather", block_size=64)
    options = ExportOptions(weights="int8", moe_impl="gather", block_size=64)
    by_options = export(model, tmp_path / "opts", options)
    assert (by_keywords / "model.onnx").read_bytes() == (by_options / "model.onnx").read_bytes()
    assert (by_keywords / "model.onnx_data").read_bytes() == (by_options / "model.onnx_data").read_bytes()
    assert manifest.read(by_options).moe_impl == "gather"
    # Keywords beside options replace its fields.
    int4 = export(model, tmp_path / "int4", options, weights="int4")
    assert (manifest.read(int4).weights, manifest.read(int4).block_size) == ("int4", 64)


def test_options_are_checked_before_anything_is_read(tmp_path):
    with pytest.raises(ExportError, match="unknown moe impl 'sparse'"):
        export(tmp_path / "missing", tmp_path / "out", ExportOptions(moe_impl="sparse"))
    with pytest.raises(TypeError, match="moe_implementation"):
        export(tmp_path / "missing", tmp_path / "out", moe_implementation="dispatch")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ExportOptions().dtype = "fp16"
    assert not (tmp_path / "out").exists()
