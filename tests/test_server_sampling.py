"""Sampling through the server: the first tokens of many seeded one-token completions follow
softmax(logits / T) of the runtime's own logits for the prompt (not only "seeded equals seeded")."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")

from test_server_support import LiveServer, tiny_export  # noqa: E402

import moe_onnx.runtime as rt  # noqa: E402
from moe_onnx.server.app import build_app  # noqa: E402
from moe_onnx.server.engine import ServedModel  # noqa: E402

PROMPT_IDS = [5, 17, 33, 2]
REQUESTS = 400
BEST = 4  # frequencies compared on the 4 likeliest tokens and "any other"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    session = rt.load(tiny_export(tmp_path_factory.mktemp("sampling") / "tiny"), provider="cpu", threads=1)
    with LiveServer(build_app([ServedModel("tiny", session, max_batch=4, max_queue=16)])) as live:
        yield live, session


def first_token(url: str, seed: int, **sampling) -> int:
    body = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 1, "seed": seed, "return_token_ids": True,
            **sampling}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["choices"][0]["token_ids"][0]


def target(session, temperature: float, top_k: int) -> np.ndarray:
    """softmax(logits / T) over the prompt's next token, kept to the ``top_k`` best when set."""
    logits_V = session.forward(np.array([PROMPT_IDS]))[0][0, -1].astype(np.float64) / temperature
    probs_V = np.exp(logits_V - logits_V.max())
    if top_k:
        probs_V[np.argsort(-probs_V)[top_k:]] = 0.0
    return probs_V / probs_V.sum()


def buckets(probs_V: np.ndarray, best: np.ndarray) -> np.ndarray:
    """The probabilities of the ``best`` tokens, then of all the others together."""
    return np.append(probs_V[best], 1.0 - probs_V[best].sum())


@pytest.mark.parametrize("temperature, top_k", [(0.3, 0), (0.3, 3)])
def test_first_tokens_follow_softmax_over_temperature(served, temperature, top_k):
    live, session = served
    want_V = target(session, temperature, top_k)
    best = np.argsort(-want_V)[:BEST]
    # A server that ignored the temperature would draw from softmax(logits): far from the target.
    ignored = buckets(target(session, 1.0, top_k), best)
    assert 0.5 * np.abs(ignored - buckets(want_V, best)).sum() > 0.25
    ids = [first_token(live.url, seed, temperature=temperature, top_k=top_k) for seed in range(REQUESTS)]
    got_V = np.bincount(ids, minlength=want_V.shape[0]) / REQUESTS
    if top_k:
        assert set(np.flatnonzero(got_V)) <= set(best[:top_k].tolist())
    assert 0.5 * np.abs(buckets(got_V, best) - buckets(want_V, best)).sum() < 0.08
