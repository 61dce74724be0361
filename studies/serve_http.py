"""The HTTP side of the serving studies: OpenAI-style requests to a server and what a client saw
(:class:`Outcome`: status, first token and chunk times, tokens, the answer's ids and text), and a
server process on a free loopback port until it answers (:func:`serving`). Stdlib HTTP, no retries.
Used by :mod:`studies.serve_load`, :mod:`studies.serve_side_by_side` and :mod:`studies.serve_peers`.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Outcome:
    status: int  # HTTP status; 0: the connection failed
    stream: bool
    kind: str  # ok, rejected (429/503), bad
    seconds: float
    first_token_s: float | None = None
    tokens: int = 0
    answer_id: str = ""
    ids: list[int] = field(default_factory=list)  # empty where the server sends no token ids
    problem: str = ""
    text: str = ""
    sent_at: float = 0.0  # time.perf_counter() when the request was sent
    chunk_s: list[float] = field(default_factory=list)  # each streamed chunk with text, from sent_at


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def request(url: str, prompt: str | list[int], *, stream: bool, max_tokens: int, model: str | None = None,
            api_key: str | None = None, timeout: float = 120.0) -> Outcome:
    """One greedy completion (``prompt``: text or token ids); the answer's shape is checked,
    whatever its status. A server that sends no ``token_ids`` (llama-server) is counted by its
    usage and checked by its text."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "return_token_ids": True, **({"model": model} if model else {}),
            **({"stream_options": {"include_usage": True}} if stream else {})}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    conn = _connection(url, timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        response = conn.getresponse()
        if response.status != 200:
            return _refusal(response.status, response.read(), stream, start)
        outcome = (_read_stream(response, start, max_tokens) if stream
                   else _read_whole(json.loads(response.read()), start, max_tokens))
        outcome.sent_at = start
        return outcome
    except (OSError, ValueError, KeyError, http.client.HTTPException) as err:
        problem = f"{type(err).__name__}: {err}"
        return Outcome(0, stream, "bad", time.perf_counter() - start, problem=problem)
    finally:
        conn.close()


def _refusal(status: int, raw: bytes, stream: bool, start: float) -> Outcome:
    seconds = time.perf_counter() - start
    try:
        well_formed = bool(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        well_formed = False
    kind = "rejected" if status in (429, 503) and well_formed else "bad"
    problem = "" if kind == "rejected" else f"{status}: {raw[:200]!r}"
    return Outcome(status, stream, kind, seconds, problem=problem)


def _read_whole(answer: dict, start: float, max_tokens: int) -> Outcome:
    seconds = time.perf_counter() - start
    choice, usage = answer["choices"][0], answer["usage"]
    ids = choice.get("token_ids") or []
    tokens = len(ids) if "token_ids" in choice else (usage or {}).get("completion_tokens", 0)
    problem = _check_end(choice["finish_reason"], tokens, usage, max_tokens)
    if not isinstance(choice["text"], str):
        problem = "text is not a string"
    kind = "bad" if problem else "ok"
    return Outcome(200, False, kind, seconds, None, tokens, answer["id"], ids, problem, choice["text"])


def _read_stream(response, start: float, max_tokens: int) -> Outcome:
    first, ids, finishes, usage, answer_ids, done = None, None, [], None, set(), False
    text, chunk_s = [], []
    for raw in response:
        line = raw.decode().strip()
        if not line:
            continue
        if done or not line.startswith("data: "):
            problem = f"after [DONE] or not SSE: {line[:80]}"
            return Outcome(200, True, "bad", time.perf_counter() - start, problem=problem)
        if line == "data: [DONE]":
            done = True
            continue
        chunk = json.loads(line[6:])
        answer_ids.add(chunk["id"])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            if choice["text"]:
                chunk_s.append(time.perf_counter() - start)
                text.append(choice["text"])
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
                ids = choice.get("token_ids")
    seconds = time.perf_counter() - start
    first = chunk_s[0] if chunk_s else None
    tokens = len(ids) if ids is not None else (usage or {}).get("completion_tokens", 0)
    problem = "" if done else "no [DONE]"
    if len(finishes) != 1 or len(answer_ids) != 1:
        problem = problem or f"{len(finishes)} finish chunks, {len(answer_ids)} ids"
    problem = problem or _check_end(finishes[0], tokens, usage, max_tokens)
    return Outcome(200, True, "bad" if problem else "ok", seconds, first, tokens,
                   next(iter(answer_ids), ""), ids or [], problem, "".join(text), chunk_s=chunk_s)


def _check_end(finish: str, tokens: int, usage: dict | None, max_tokens: int) -> str:
    if finish not in ("stop", "length"):
        return f"finish_reason {finish!r}"
    if not usage or usage["completion_tokens"] != tokens:
        return f"usage {usage} disagrees with {tokens} token ids"
    if usage["total_tokens"] != usage["prompt_tokens"] + tokens:
        return f"usage totals wrong: {usage}"
    if finish == "length" and tokens != max_tokens:
        return f"finish_reason length after {tokens} of {max_tokens} tokens"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, path: str) -> dict:
    conn = _connection(url, 5)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@contextmanager
def serving(command: list[str], port: int, name: str, log=None, wait_s: float = 180):
    """A server process on 127.0.0.1:``port``, once ``/health`` says ok and ``/v1/models`` lists a
    model (``log``: a file for its output); yields ``(url, process)`` and ends it after."""
    proc = subprocess.Popen([str(c) for c in command], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + wait_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}")
            try:
                if get(url, "/health").get("status") == "ok" and _models_ready(url):
                    break
            except (OSError, ValueError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{name} did not answer /health in {wait_s:.0f} s")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _models_ready(url: str) -> bool:
    try:
        return bool(get(url, "/v1/models").get("data"))
    except (OSError, ValueError):
        return False
