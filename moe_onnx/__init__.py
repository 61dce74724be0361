"""moe-onnx: MoE and dense transformer checkpoints to ONNX with explicit sparse expert routing."""

from moe_onnx.errors import MoeOnnxError

__version__ = "0.1.0"
__all__ = ["MoeOnnxError", "export", "__version__"]


def export(src, out, **kwargs):
    """Export ``src`` (a checkpoint directory or an in-memory transformers model) to ``out``.

    See :func:`moe_onnx.exporter.export` for the options.
    """
    from moe_onnx.exporter import export as _export

    return _export(src, out, **kwargs)
