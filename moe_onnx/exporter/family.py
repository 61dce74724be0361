"""How an architecture family is described: its spec from config.json and its tensor names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moe_onnx.exporter.config import Config
from moe_onnx.spec import ModelSpec


@dataclass(frozen=True)
class Naming:
    """Where a family keeps its tensors in a Hugging Face checkpoint (llama names by default)."""

    moe_prefix: str = "mlp"  # model.layers.{i}.<moe_prefix>.gate / .experts ...
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_prefix: str = "shared_expert"
    shared_gate: str = "shared_expert_gate"
    # In-memory transformers 5 models use "mlp" with fused experts whatever the hub layout.
    moe_prefix_aliases: tuple[str, ...] = field(default=("mlp",))


@dataclass(frozen=True)
class Architecture:
    """One supported ``model_type``: a spec builder and the checkpoint naming."""

    model_type: str
    spec: Callable[[Config], ModelSpec]
    naming: Naming = Naming()
