"""Next-token choice from the last position's logits: greedy, or temperature / top-k / top-p.

Legend: B rows, V vocabulary, C candidates kept after top-k / top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_FIRST_CANDIDATES = 64  # top-p looks at this many best tokens first, doubling until it has enough


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy (argmax); otherwise sample from the filtered softmax."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits_BV: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """One token id per row ``[B]`` (int64)."""
    if config.greedy:
        return logits_BV.argmax(-1).astype(np.int64)
    return np.array([_sample_row(row, config, rng) for row in logits_BV], dtype=np.int64)


def _sample_row(logits_V: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    scaled_V = logits_V.astype(np.float64) / config.temperature
    order_C, probs_C = _candidates(scaled_V, config)
    return int(order_C[rng.choice(len(order_C), p=probs_C)])


def _candidates(scaled_V: np.ndarray, config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Token ids best first and their renormalised probabilities after top-k and top-p.

    A full argsort of a 150k vocabulary costs milliseconds per token; argpartition finds the few
    tokens top-k / top-p can keep, and only those get sorted.
    """
    V = scaled_V.shape[0]
    probs_V = np.exp(scaled_V - scaled_V.max())
    probs_V /= probs_V.sum()
    limit = config.top_k or V
    if config.top_p >= 1.0 and limit == V:
        return np.arange(V), probs_V
    count = min(limit, _FIRST_CANDIDATES) if config.top_p < 1.0 else limit
    while True:
        order_C = _best(probs_V, count)
        cumulative_C = np.cumsum(probs_V[order_C])
        # enough once the nucleus closes inside the candidates, or nothing more may be added
        if count >= limit or cumulative_C[-1] >= config.top_p:
            break
        count = min(limit, count * 2)
    if config.top_p < 1.0:
        keep = int(np.searchsorted(cumulative_C, config.top_p)) + 1
        order_C = order_C[:keep]
    probs_C = probs_V[order_C]
    return order_C, probs_C / probs_C.sum()


def _best(probs_V: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest probabilities, largest first (ties by lower id)."""
    if count < probs_V.shape[0]:
        top = np.argpartition(-probs_V, count - 1)[:count]
    else:
        top = np.arange(probs_V.shape[0])
    return top[np.lexsort((top, -probs_V[top]))]
