"""Small trained reference checkpoints (a MoE and its two dense twins) that ship with the repo."""

from pathlib import Path

MODEL_NAMES = ("moe", "dense-active", "dense-total")


def default_models_dir() -> Path:
    """The ``reference_models/`` folder of this checkout."""
    return Path(__file__).resolve().parents[2] / "reference_models"
