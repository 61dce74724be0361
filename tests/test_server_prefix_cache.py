"""The prefix cache of continuous batching: a prompt that shares a prefix with an earlier one
starts from that prefix's KV cache and prefills only the rest. Answers equal those of a cold run
(the cache off) and of ``Session.generate``; the scheduler counts what it reused; an LRU under a
byte budget stays within it. Equality and counts, never timings."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")

from test_server_support import StepLog, tiny_export  # noqa: E402

import moe_onnx.runtime as rt  # noqa: E402
from moe_onnx.server.batching import Delta, Finish, Job, Sampling  # noqa: E402
from moe_onnx.server.engine import ServedModel  # noqa: E402
from moe_onnx.server.prefix_cache import PrefixCache  # noqa: E402

SYSTEM = list(range(60, 108))  # a long shared prefix: a chat's system prompt, say
GREEDY, SEEDED = Sampling(), Sampling(1.1, 20, 0.9, seed=5)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("prefix") / "tiny")


@pytest.fixture(scope="module")
def session(export):
    return rt.load(export, provider="cpu", threads=1)


def in_rounds(model: ServedModel, rounds: list[list[tuple[list[int], int, Sampling]]]) -> list[list[int]]:
    """Each request's token ids; a round's requests are sent together, after the last round's end."""
    scheduler, answers = model.scheduler, []
    scheduler.start()
    try:
        for requests in rounds:
            ends = [threading.Event() for _ in requests]
            events: list[list] = [[] for _ in requests]
            for (prompt, most, sampling), got, end in zip(requests, events, ends, strict=True):
                def sink(event, got=got, end=end):
                    got.append(event)
                    if not isinstance(event, Delta):
                        end.set()

                scheduler.submit(Job(prompt, most, sampling, (), sink))
            assert all(end.wait(60) for end in ends)
            assert all(isinstance(got[-1], Finish) for got in events), [got[-1] for got in events]
            answers += [got[-1].ids for got in events]
    finally:
        scheduler.close()
    return answers


def one_by_one(model: ServedModel, requests: list[tuple[list[int], int, Sampling]]) -> list[list[int]]:
    """Each request's token ids, sent one after the other's end (so each may reuse the last)."""
    return in_rounds(model, [[r] for r in requests])


def served(session, mb: float, **limits) -> ServedModel:
    return ServedModel("tiny", session, batching="continuous", prefix_cache_mb=mb, **limits)


def expected(session, requests) -> list[list[int]]:
    return [session.generate(prompt, max_new_tokens=most, temperature=s.temperature, top_k=s.top_k,
                             top_p=s.top_p, seed=s.seed).ids[0] for prompt, most, s in requests]


@pytest.mark.parametrize("bound", [False, True], ids=["numpy-cache", "ortvalue-cache"])
def test_a_shared_prefix_is_reused_and_answers_equal_a_cold_run(export, session, bound):
    engine = rt.load(export, provider="cpu", threads=1, io_binding=True) if bound else session
    second = SYSTEM + [9, 8]
    answer = session.generate(second, max_new_tokens=8).ids[0]
    requests = [(SYSTEM + [1, 2, 3], 8, GREEDY),
                (second, 8, GREEDY),  # shares SYSTEM with the first: its cache sliced to it
                (second + answer + [7, 6], 6, SEEDED),  # the next turn: the second and its answer
                ([5] + SYSTEM, 5, GREEDY)]  # shares nothing
    logged = StepLog(engine)
    warm = served(logged, 16, prefill_chunk=16)
    cold = served(engine, 0, prefill_chunk=16)
    assert one_by_one(warm, requests) == one_by_one(cold, requests) == expected(session, requests)
    stats = warm.scheduler.stats
    assert stats["prefix_hits"] == 2
    # the second's answer is in the cache but its last token: it was picked, never fed
    assert stats["prefix_tokens_reused"] == len(SYSTEM) + len(second) + len(answer) - 1
    prefills = [s for s in logged.steps if s[0] == 1 and s[1] > 1]
    # 51 tokens in 16-token chunks; then 2 tokens after SYSTEM; 3 after the second turn; then the
    # unshared 49 again in chunks (its last chunk of one token looks like a decode step)
    assert prefills == [(1, 16), (1, 16), (1, 16), (1, 3), (1, 2), (1, 3), (1, 16), (1, 16), (1, 16)]


def test_a_prompt_entirely_cached_reruns_its_last_token(session):
    prompt = SYSTEM + [4, 4, 2]
    requests = [(prompt, 6, GREEDY), (prompt, 6, GREEDY), (prompt, 7, SEEDED)]
    logged = StepLog(session)
    model = served(logged, 16, prefill_chunk=64)
    assert one_by_one(model, requests) == expected(session, requests)
    stats = model.scheduler.stats
    assert stats["prefix_hits"] == 2 and stats["prefix_tokens_reused"] == 2 * (len(prompt) - 1)
    first_steps = [s for s in logged.steps if s[0] == 1 and s[1] > 1]
    assert first_steps == [(1, len(prompt))]  # the repeats ran their last token only: (1, 1)


def prompt_bytes(session, length: int) -> int:
    """The bytes of one prompt's KV cache of ``length`` positions."""
    _, cache = session.forward(np.zeros((1, length), np.int64))
    return sum(key.nbytes + value.nbytes for key, value in cache.layers)


def test_lru_eviction_keeps_the_cache_within_its_budget(session):
    budget = int(prompt_bytes(session, len(SYSTEM) + 2) * 2.5)  # room for two such prompts, not three
    model = served(session, budget / 2**20, prefill_chunk=64)
    cache = model.scheduler.prefix_cache
    assert cache.max_bytes <= budget
    prompts = [[k] + SYSTEM + [k] for k in (1, 2, 3, 1, 4, 2)]  # none shares a first token
    requests = [(p, 4, GREEDY) for p in prompts]
    seen = []
    real_store = cache.store

    def store(ids, layers):
        real_store(ids, layers)
        seen.append((len(cache), cache.bytes))

    cache.store = store
    assert one_by_one(model, requests) == expected(session, requests)
    assert len(seen) == 12  # each prompt at its prefill, then with its answer at its end
    assert all(entries <= 2 and used <= budget for entries, used in seen)
    assert cache.evictions == 4
    # 1, 2, 3 (evicts 1), 1 again (a miss: evicts 2), 4 (evicts 3), 2 (a miss: evicts 1); each
    # prompt's entry is replaced by its answer's, which holds it (no eviction)
    assert model.scheduler.stats["prefix_hits"] == 0
    assert model.scheduler.stats["prefix_cache_bytes"] == cache.bytes <= budget


def test_lru_evicts_the_least_recently_used(session):
    model = served(session, int(prompt_bytes(session, len(SYSTEM) + 2) * 2.5) / 2**20, prefill_chunk=64)
    a, b, c = ([k] + SYSTEM + [k] for k in (1, 2, 3))
    # a used again after b: c evicts b, not a; a hits again, b misses
    requests = [(p, 3, GREEDY) for p in (a, b, a, c, a, b)]
    assert one_by_one(model, requests) == expected(session, requests)
    assert model.scheduler.stats["prefix_hits"] == 2
    assert model.scheduler.stats["prefix_tokens_reused"] == 2 * (len(a) - 1)


def test_answers_kept_from_a_shared_batch_are_reused(session):
    """Rows of different lengths decode together (the shorter left-padded); each one's prompt and
    answer are kept as it ends, and a next turn of each reuses them."""
    short, long = [7, 7, 3], SYSTEM
    first = [(long, 12, GREEDY), (short, 4, SEEDED)]
    (long_answer, short_answer) = expected(session, first)
    second = [(short + short_answer + [1, 2], 5, GREEDY), (long + long_answer + [3], 5, SEEDED)]
    model = served(session, 16, prefill_chunk=64, max_batch=2)
    assert in_rounds(model, [first, second]) == expected(session, first + second)
    assert (1, 2) in model.scheduler.compositions  # the first two shared decode steps
    stats = model.scheduler.stats
    assert stats["prefix_hits"] == 2
    assert stats["prefix_tokens_reused"] == len(short) + 3 + len(long) + 11


def test_the_cache_off_reuses_nothing(session):
    requests = [(SYSTEM + [1], 4, GREEDY), (SYSTEM + [1], 4, GREEDY), (SYSTEM + [2], 4, GREEDY)]
    model = served(session, 0, prefill_chunk=64)
    assert model.scheduler.prefix_cache is None
    assert one_by_one(model, requests) == expected(session, requests)
    assert model.scheduler.stats["prefix_hits"] == model.scheduler.stats["prefix_tokens_reused"] == 0


def test_a_longer_prompt_replaces_the_entries_inside_it():
    def layers(P):
        return [(np.zeros((1, 2, P, 4), np.float32), np.zeros((1, 2, P, 4), np.float32))]

    cache = PrefixCache(1 << 20)
    cache.store([1, 2, 3], layers(3))
    cache.store([1, 2, 3, 4, 5], layers(5))  # the conversation went on: the first is inside it
    cache.store([1, 2], layers(2))  # inside the second: nothing new to keep
    assert len(cache) == 1 and cache.bytes == 2 * 5 * 2 * 4 * 4
    L, found = cache.longest([1, 2, 3, 9])
    assert L == 3 and found[0][0].shape == (1, 2, 3, 4)
    assert cache.longest([7, 1, 2]) == (0, None)


def test_serve_config_sets_the_budget_and_health_reports_reuse(export):
    from test_server_support import LiveServer, request

    from moe_onnx.errors import MoeOnnxError
    from moe_onnx.server.app import build_app
    from moe_onnx.server.config import ServeConfig, load_models

    with pytest.raises(MoeOnnxError, match="prefix-cache-mb"):
        ServeConfig((str(export),), prefix_cache_mb=-1)
    (off,) = load_models(ServeConfig((str(export),), threads=1, prefix_cache_mb=0))
    assert off.scheduler.prefix_cache is None
    (model,) = load_models(ServeConfig((str(export),), threads=1, prefix_cache_mb=0.5))
    assert model.scheduler.prefix_cache.max_bytes == 2**19
    body = {"prompt": SYSTEM + [1], "max_tokens": 2, "temperature": 0}
    with LiveServer(build_app([model])) as live:
        assert request(live.url, "POST", "/v1/completions", body)[0] == 200
        assert request(live.url, "POST", "/v1/completions", body)[0] == 200
        _, _, health = request(live.url, "GET", "/health")
    counts = health["models"]["tiny"]
    assert counts["prefix_hits"] == 1 and counts["prefix_tokens_reused"] == len(SYSTEM)
    assert 0 < counts["prefix_cache_bytes"] <= 2**19
