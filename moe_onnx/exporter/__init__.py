"""Checkpoints to ONNX decoders with explicit sparse expert routing."""

from moe_onnx.exporter.export import export

__all__ = ["export"]
