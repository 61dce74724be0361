"""Next-token choice from the last position's logits: greedy, or temperature / top-k / top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy (argmax); otherwise sample from the filtered softmax."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")


def sample(logits_BV: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """One token id per row ``[B]`` (int64)."""
    if config.temperature == 0:
        return logits_BV.argmax(-1).astype(np.int64)
    return np.array([_sample_row(row, config, rng) for row in logits_BV], dtype=np.int64)


def _sample_row(logits_V: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    scaled = logits_V.astype(np.float64) / config.temperature
    order = np.argsort(-scaled, kind="stable")
    if config.top_k:
        order = order[: config.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if config.top_p < 1.0:
        keep = np.searchsorted(np.cumsum(probs), config.top_p) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
