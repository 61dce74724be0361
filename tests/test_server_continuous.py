"""Continuous batching: requests join a running batch between decode steps and leave it when they
finish or are cancelled. A short request ends while a long one still streams; every answer equals
``Session.generate`` for its request alone, however the arrivals interleave; a cancelled row
leaves the batch and its slot goes to the next request. Ordering and equality, never timings."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")

from test_server_support import LiveServer, StepLog, request, tiny_export  # noqa: E402

import moe_onnx.runtime as rt  # noqa: E402
from moe_onnx.server.app import build_app  # noqa: E402
from moe_onnx.server.batching import Delta, Failure, Finish, Job, Sampling  # noqa: E402
from moe_onnx.server.engine import ServedModel  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("continuous") / "tiny")


@pytest.fixture(scope="module")
def session(export):
    return rt.load(export, provider="cpu", threads=1)


class SlowSteps:
    """The session, each forward step a little slower, so that a long completion outlasts a
    short request's round trip by far (nothing is timed)."""

    def __init__(self, session, delay: float):
        self._session, self.delay = session, delay

    def __getattr__(self, name):
        return getattr(self._session, name)

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self._session.forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        for token in self._session.generate(*args, **kwargs):
            time.sleep(self.delay)
            yield token


def continuous(session, **limits) -> ServedModel:
    return ServedModel("tiny", session, batching="continuous", **limits)


class Recorder:
    """Every job's events in the order the decode thread sent them: ``(job name, event)``."""

    def __init__(self):
        self.events: list[tuple[str, object]] = []
        self.done = threading.Event()
        self.hooks: dict[tuple[str, int], object] = {}  # (name, n-th delta) -> called then

    def sink(self, name: str):
        def receive(event):
            self.events.append((name, event))
            if isinstance(event, Delta):
                hook = self.hooks.pop((name, self.deltas(name)), None)
                if hook:
                    hook()
        return receive

    def deltas(self, name: str) -> int:
        return sum(1 for n, e in self.events if n == name and isinstance(e, Delta))

    def end(self, name: str):
        return next((e for n, e in self.events if n == name and not isinstance(e, Delta)), None)

    def index_of_end(self, name: str) -> int:
        return next(i for i, (n, e) in enumerate(self.events) if n == name and not isinstance(e, Delta))


def _until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_a_short_request_ends_while_a_long_one_streams(session):
    model = continuous(SlowSteps(session, 0.01), max_batch=4, max_queue=4)
    with LiveServer(build_app([model])) as live:
        host, port = live.url.removeprefix("http://").split(":")
        long_conn = http.client.HTTPConnection(host, int(port), timeout=60)
        long_conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": [1, 2], "max_tokens": 200, "temperature": 0, "stream": True}),
            {"Content-Type": "application/json"})
        stream = long_conn.getresponse()
        chunks = [stream.readline() for _ in range(6)]  # a few streamed chunks: it is decoding
        assert sum(c.startswith(b"data:") for c in chunks) >= 2

        short = http.client.HTTPConnection(host, int(port), timeout=60)
        short.request("POST", "/v1/completions", json.dumps(
            {"prompt": [5, 17, 33], "max_tokens": 4, "temperature": 0, "return_token_ids": True}),
            {"Content-Type": "application/json"})
        answer = json.loads(short.getresponse().read())
        # The answer leaves when the short row takes its last token; the row retires (and running
        # drops to 1) after that step: wait for the retire, a few ms, before reading the count.
        _until(lambda: model.scheduler.running < 2, timeout=5.0)
        long_still_running = model.scheduler.running == 1
        rest = stream.read()  # the long stream, to its end
        long_conn.close()
        short.close()
    assert answer["choices"][0]["token_ids"] == session.generate([5, 17, 33], max_new_tokens=4).ids[0]
    assert long_still_running, "the short request waited for the long one"
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert b'"finish_reason":"length"' in rest


# prompt, max_tokens, sampling, stop, and which job's n-th token it arrives after
ARRIVALS = [
    ("a", [1, 2, 3], 40, Sampling(), (), None),
    ("b", [5, 17, 33, 2, 9, 11, 40, 3, 99, 7, 7], 12, Sampling(1.3, 40, 0.9, seed=7), (), ("a", 2)),
    ("c", [12], 20, Sampling(), (), ("a", 3)),
    ("d", list(range(30, 52)), 9, Sampling(0.8, 0, 1.0, seed=11), (), ("b", 4)),
    ("e", [9, 8, 7, 6], 16, Sampling(1.0, 5, 1.0, seed=3), (), ("c", 5)),
    ("f", [40, 41], 24, Sampling(), ("e",), ("a", 20)),
    ("g", [100, 101, 102, 103, 104, 105], 6, Sampling(0.7, 0, 0.8, seed=2**40), (), ("d", 1)),
    ("h", [3], 1, Sampling(), (), ("a", 5)),  # ends at its prefill: never joins
]


@pytest.mark.parametrize("bound", [False, True], ids=["numpy-cache", "ortvalue-cache"])
def test_answers_equal_session_generate_under_interleaved_arrivals(export, session, bound):
    """Greedy and seeded rows of several prompt lengths (some prefilled in several chunks) join at
    set tokens of others; each answer is the runtime's for its request alone. ``bound``: the
    cache is OrtValues (I/O binding, as on CUDA), joined and sliced through the host."""
    served = rt.load(export, provider="cpu", threads=1, io_binding=True) if bound else session
    assert_interleaved_arrivals_equal_generate(continuous(served, max_batch=4, max_queue=8, prefill_chunk=4),
                                               session)


def assert_interleaved_arrivals_equal_generate(model: ServedModel, session) -> None:
    """:data:`ARRIVALS` through ``model``'s scheduler, each job submitted at its set token of
    another: every answer (ids and streamed text) is ``session.generate``'s for it alone, and rows
    really shared steps."""
    scheduler, record = model.scheduler, Recorder()
    jobs = {name: Job(prompt, most, sampling, stop, record.sink(name))
            for name, prompt, most, sampling, stop, _ in ARRIVALS}
    for name, *_, after in ARRIVALS:
        if after is not None:
            record.hooks[after] = lambda name=name: scheduler.submit(jobs[name])
    scheduler.start()
    try:
        scheduler.submit(jobs["a"])
        assert _until(lambda: all(record.end(name) for name in jobs)), record.events[-3:]
    finally:
        scheduler.close()
    for name, prompt, most, s, stop, _ in ARRIVALS:
        expected = session.generate(prompt, max_new_tokens=most, temperature=s.temperature, top_k=s.top_k,
                                    top_p=s.top_p, seed=s.seed, stop=stop)
        end = record.end(name)
        assert isinstance(end, Finish), (name, end)
        assert end.ids == expected.ids[0], name
        text = "".join(e.text for n, e in record.events if n == name and isinstance(e, Delta))
        assert text == expected.text, name
    assert max(len(c) for c in scheduler.compositions) > 2  # rows really shared steps


def test_a_cancelled_row_leaves_the_batch_and_its_slot_is_reused(session):
    model = continuous(session, max_batch=2, max_queue=4)
    scheduler, record = model.scheduler, Recorder()
    jobs = {name: Job([3, 1, 4, 1, 5], most, Sampling(), (), record.sink(name))
            for name, most in (("a", 200), ("b", 60), ("c", 5))}

    def cancel_a_and_send_c():
        scheduler.cancel(jobs["a"])
        scheduler.submit(jobs["c"])

    record.hooks[("a", 4)] = cancel_a_and_send_c
    scheduler.start()
    try:
        scheduler.submit(jobs["a"])
        scheduler.submit(jobs["b"])
        assert _until(lambda: record.end("b") and record.end("c"))
    finally:
        scheduler.close()
    a, b, c = (jobs[n].number for n in "abc")
    assert record.deltas("a") == 4 and record.end("a") is None  # nothing after the cancel
    assert record.index_of_end("c") < record.index_of_end("b")  # c did not wait for b
    compositions = list(scheduler.compositions)
    assert compositions[0] == (a, b)
    after = compositions[compositions.index((a, b)) + 1:]
    assert after and all(a not in rows for rows in after)
    assert (b, c) in after and max(len(rows) for rows in after) == 2
    assert compositions[-1] == (b,)
    assert scheduler.running == 0


def test_a_client_that_leaves_is_retired_and_a_full_queue_is_429(session):
    model = continuous(SlowSteps(session, 0.01), max_batch=1, max_queue=1)
    with LiveServer(build_app([model])) as live:
        host, port = live.url.removeprefix("http://").split(":")
        leaving = http.client.HTTPConnection(host, int(port), timeout=60)
        leaving.request("POST", "/v1/completions", json.dumps(
            {"prompt": [1, 2], "max_tokens": 200, "temperature": 0, "stream": True}),
            {"Content-Type": "application/json"})
        stream = leaving.getresponse()
        while not stream.readline().startswith(b"data:"):
            pass
        waiting = {}
        second = threading.Thread(target=lambda: waiting.update(answer=request(
            live.url, "POST", "/v1/completions", {"prompt": [7, 8], "max_tokens": 3, "temperature": 0})))
        second.start()
        assert _until(lambda: model.scheduler.waiting == 1)
        status, headers, body = request(live.url, "POST", "/v1/completions", {"prompt": "x"})
        assert status == 429 and body["error"]["code"] == "queue_full" and int(headers["Retry-After"]) >= 1
        leaving.close()  # the streaming client goes away: its row is retired, the waiting one runs
        second.join(30)
        assert _until(lambda: model.scheduler.running == 0 and model.scheduler.waiting == 0)
    assert waiting["answer"][0] == 200 and waiting["answer"][2]["usage"]["completion_tokens"] == 3
    assert list(model.scheduler.compositions) == [(1,), (2,)]
    assert model.scheduler.stats["tokens"] < 100


def test_close_fails_the_rows_in_flight(session):
    model = continuous(SlowSteps(session, 0.01), max_batch=2, max_queue=2)
    scheduler, record, started = model.scheduler, Recorder(), threading.Event()
    long = Job([1, 2, 3], 200, Sampling(), (), record.sink("long"))
    record.hooks[("long", 2)] = started.set
    scheduler.start()
    scheduler.submit(long)
    assert started.wait(30)
    scheduler.close()
    end = record.end("long")
    assert isinstance(end, Failure) and end.status == 503 and scheduler.running == 0


class FailingOnce:
    """The session; its first decode step over two rows raises."""

    def __init__(self, session):
        self._session, self.failed = session, False

    def __getattr__(self, name):
        return getattr(self._session, name)

    def forward(self, ids, *args, **kwargs):
        if not self.failed and ids.shape == (2, 1):
            self.failed = True
            raise RuntimeError("a broken step")
        return self._session.forward(ids, *args, **kwargs)


def test_a_failed_step_fails_its_rows_and_the_next_job_runs(session):
    model = continuous(FailingOnce(session), max_batch=2, max_queue=2)
    scheduler, record = model.scheduler, Recorder()
    jobs = [Job([4, 5, 6], 8, Sampling(), (), record.sink(name)) for name in ("a", "b")]
    for job in jobs:
        scheduler.submit(job)  # before the thread starts: they prefill together, then fail together
    scheduler.start()
    try:
        assert _until(lambda: record.end("a") and record.end("b"))
        after = Job([9, 9], 5, Sampling(), (), record.sink("after"))
        scheduler.submit(after)
        assert _until(lambda: record.end("after"))
    finally:
        scheduler.close()
    assert all(isinstance(record.end(n), Failure) and "a broken step" in record.end(n).message for n in "ab")
    assert record.end("after").ids == session.generate([9, 9], max_new_tokens=5).ids[0]


def test_a_static_cache_export_batches_whole(tmp_path):
    from models import make_model

    import moe_onnx
    from moe_onnx.server.batching import Scheduler

    out = moe_onnx.export(make_model("qwen3_moe", eos_token_id=None), tmp_path / "static", kv_cache="static")
    static = rt.load(out, provider="cpu", threads=1)
    model = continuous(static, max_batch=2)
    assert type(model.scheduler) is Scheduler
    with LiveServer(build_app([model])) as live:
        status, _, body = request(live.url, "POST", "/v1/completions", {
            "prompt": [3, 4, 5], "max_tokens": 6, "temperature": 0, "return_token_ids": True})
    expected = static.generate([3, 4, 5], max_new_tokens=6).ids[0]
    assert status == 200 and body["choices"][0]["token_ids"] == expected


def test_load_under_continuous_batching_answers_every_request_once(session):
    from studies.serve_load import run_load

    model = continuous(session, max_batch=4, max_queue=4, prefill_chunk=8)
    with LiveServer(build_app([model])) as live:
        report = run_load(live.url, clients=10, requests=40, max_tokens=12)
        assert report.ok + report.rejected == 40, report.problems
        assert (report.bad, report.mismatched, report.duplicate_ids) == (0, 0, 0), report.problems
        assert report.ok >= 10 and model.scheduler.stats["largest_batch"] > 1
        assert _until(lambda: model.scheduler.running == 0 and model.scheduler.waiting == 0)


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(session):
    logged = StepLog(session)
    model = continuous(logged, max_batch=2, max_queue=2, prefill_chunk=8)
    scheduler, record = model.scheduler, Recorder()
    running = Job([1, 2], 30, Sampling(), (), record.sink("running"))
    long_prompt = list(range(40, 80))
    joining = Job(long_prompt, 4, Sampling(), (), record.sink("joining"))
    record.hooks[("running", 2)] = lambda: scheduler.submit(joining)
    scheduler.start()
    try:
        scheduler.submit(running)
        assert _until(lambda: record.end("running") and record.end("joining"))
    finally:
        scheduler.close()
    chunks = [i for i, shape in enumerate(logged.steps) if shape == (1, 8)]
    assert len(chunks) == 5  # 40 prompt tokens, 8 a step
    assert all(logged.steps[i + 1] == (1, 1) for i in chunks[:-1])  # the running row's step between
    assert logged.steps[chunks[-1] + 1] == (2, 1)  # then the joined row decodes beside it
    assert record.end("joining").ids == session.generate(long_prompt, max_new_tokens=4).ids[0]
