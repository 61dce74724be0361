"""One small module per supported family, named after its ``model_type`` and found by that name.

Each module defines ``FAMILY``: a :class:`moe_onnx.exporter.family.Family` (spec from
config.json, checkpoint names). Adding a family is one file here plus one case in tests/models.py.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe_onnx.errors import UnsupportedFamilyError
from moe_onnx.exporter.family import Family


def supported() -> list[str]:
    """Every ``model_type`` with a module in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(model_type: str) -> Family:
    """The family of ``model_type``, or a clear error listing what is supported."""
    if model_type not in supported():
        raise UnsupportedFamilyError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported())}")
    return importlib.import_module(f"{__name__}.{model_type}").FAMILY
