"""One small module per supported ``model_type``, found by that name."""

from __future__ import annotations

import importlib
import pkgutil

from moe_onnx.errors import UnsupportedArchitectureError
from moe_onnx.exporter.family import Architecture


def supported() -> list[str]:
    """Every ``model_type`` with a module in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(model_type: str) -> Architecture:
    """The architecture for ``model_type``, or a clear error listing what is supported."""
    if model_type not in supported():
        raise UnsupportedArchitectureError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported())}"
        )
    return importlib.import_module(f"{__name__}.{model_type}").ARCH
