"""Moved to :mod:`moe_onnx.evaluation`; this alias goes once tests/test_reference.py imports from there."""

from moe_onnx.evaluation import onnx_quality, token_windows  # noqa: F401
