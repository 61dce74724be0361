"""Checkpoints to ONNX decoders with explicit sparse expert routing."""

from moe_onnx.exporter.export import export
from moe_onnx.exporter.options import ExportOptions

__all__ = ["ExportOptions", "export"]
