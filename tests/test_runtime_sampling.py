"""The sampler against the distribution it must draw from: many seeded draws against
softmax(logits / T), after top-k and top-p truncation (a fixed seed keeps each test deterministic;
the bounds sit well above the sampling noise and well below the gap a wrong sampler leaves)."""

import numpy as np
import pytest

from moe_onnx.runtime.sampling import SamplingConfig, sample

DRAWS = 20_000
LOGITS_V = np.array([2.0, 1.4, 1.1, 0.7, 0.5, 0.2, -0.3, -0.8, -1.5, -2.0])


def softmax(logits_V: np.ndarray, temperature: float) -> np.ndarray:
    scaled_V = logits_V.astype(np.float64) / temperature
    probs_V = np.exp(scaled_V - scaled_V.max())
    return probs_V / probs_V.sum()


def draw(logits_V: np.ndarray, config: SamplingConfig, n: int = DRAWS, seed: int = 0) -> np.ndarray:
    """Frequencies ``[V]`` of ``n`` seeded draws."""
    ids = sample(np.tile(logits_V, (n, 1)), config, np.random.default_rng(seed))
    return np.bincount(ids, minlength=logits_V.shape[0]) / n


def total_variation(p_V: np.ndarray, q_V: np.ndarray) -> float:
    return 0.5 * float(np.abs(p_V - q_V).sum())


def renormalised(probs_V: np.ndarray, keep: list[int]) -> np.ndarray:
    kept_V = np.zeros_like(probs_V)
    kept_V[keep] = probs_V[keep]
    return kept_V / kept_V.sum()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    want_V = softmax(LOGITS_V, temperature)
    # A sampler that ignored the temperature would draw from softmax(logits): far from the target.
    assert total_variation(softmax(LOGITS_V, 1.0), want_V) > 0.15
    assert total_variation(draw(LOGITS_V, SamplingConfig(temperature)), want_V) < 0.02


def test_top_k_draws_only_the_k_best_in_proportion():
    config = SamplingConfig(temperature=1.5, top_k=3)
    got_V = draw(LOGITS_V, config)
    assert set(np.flatnonzero(got_V)) == {0, 1, 2}
    assert total_variation(got_V, renormalised(softmax(LOGITS_V, 1.5), [0, 1, 2])) < 0.02


# probabilities in id order 0.1, 0.4, 0.2, 0.3: best first 1 (0.4), 3 (0.7), 2 (0.9), 0 (1.0)
NUCLEUS_LOGITS_V = np.log(np.array([0.1, 0.4, 0.2, 0.3]))


@pytest.mark.parametrize("top_p, nucleus", [
    (0.39, [1]),  # the best token alone passes top_p
    (0.41, [1, 3]),  # the boundary token, which takes the sum past top_p, is kept
    (0.69, [1, 3]),
    (0.71, [1, 3, 2]),
    (0.95, [1, 3, 2, 0]),
])
def test_top_p_keeps_exactly_the_nucleus(top_p, nucleus):
    got_V = draw(NUCLEUS_LOGITS_V, SamplingConfig(temperature=1.0, top_p=top_p))
    assert sorted(np.flatnonzero(got_V)) == sorted(nucleus)
    assert total_variation(got_V, renormalised(softmax(NUCLEUS_LOGITS_V, 1.0), nucleus)) < 0.02


def test_top_p_nucleus_larger_than_the_first_candidates():
    """A flat 1000-token vocabulary: the nucleus holds hundreds of tokens, more than the sampler
    looks at first, and it must still be exactly the smallest best-first set reaching top_p."""
    logits_V = np.random.default_rng(1).standard_normal(1000) * 0.5
    probs_V = softmax(logits_V, 0.8)
    order_V = np.argsort(-probs_V, kind="stable")
    size = int(np.searchsorted(np.cumsum(probs_V[order_V]), 0.5)) + 1
    assert size > 200
    got_V = draw(logits_V, SamplingConfig(temperature=0.8, top_p=0.5), n=8000)
    assert set(np.flatnonzero(got_V)) == set(order_V[:size].tolist())


def test_top_k_and_top_p_together_keep_the_smaller_set():
    config = SamplingConfig(temperature=1.0, top_k=2, top_p=0.95)
    assert sorted(np.flatnonzero(draw(NUCLEUS_LOGITS_V, config, n=2000))) == [1, 3]
    config = SamplingConfig(temperature=1.0, top_k=3, top_p=0.39)
    assert sorted(np.flatnonzero(draw(NUCLEUS_LOGITS_V, config, n=2000))) == [1]


def test_greedy_takes_the_argmax_per_row():
    logits_BV = np.stack([LOGITS_V, LOGITS_V[::-1]])
    for config in (SamplingConfig(0.0), SamplingConfig(1.0, top_k=1)):
        assert sample(logits_BV, config, np.random.default_rng(0)).tolist() == [0, 9]
