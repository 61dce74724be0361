"""The OpenAI-compatible server on 127.0.0.1 with the real ``openai`` client: greedy answers equal
``Session.generate`` token for token, streaming, chat templates as transformers renders them, one
4xx per kind of bad request, the API key, batching, a full queue, clients that go away."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

openai = pytest.importorskip("openai", reason="the server tests need the openai client (the test extra)")
pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")

from test_server_support import CHAT_TEMPLATE, LiveServer, WatchedSession, tiny_export  # noqa: E402

import moe_onnx.runtime as rt  # noqa: E402
from moe_onnx.server.app import build_app  # noqa: E402
from moe_onnx.server.chat import ChatTemplate  # noqa: E402
from moe_onnx.server.engine import ServedModel  # noqa: E402

PROMPT = "def f(x):"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo wörld"}]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def session(export):
    return rt.load(export, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def server(session):
    model = ServedModel("tiny", session, max_batch=4, max_queue=16)
    with LiveServer(build_app([model])) as live:
        live.model = model
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(url: str, path: str, body, headers=None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data) if data.strip() else {}


def get(url: str, path: str, headers=None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


# -- answers ------------------------------------------------------------------------------------
def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == 256


def test_greedy_completion_equals_session_generate(client, session):
    expected = session.generate(PROMPT, max_new_tokens=12)
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                       extra_body={"return_token_ids": True})
    choice = answer.choices[0]
    assert choice.token_ids == expected.ids[0] and choice.text == expected.text
    assert choice.finish_reason == "length"
    prompt_tokens = len(session.tokenizer.encode(PROMPT))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 12)
    by_ids = client.completions.create(model="tiny", prompt=[5, 17, 33, 2], max_tokens=8, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert by_ids.choices[0].token_ids == session.generate([5, 17, 33, 2], max_new_tokens=8).ids[0]


def test_streamed_completion_is_the_same_text(client, session):
    expected = session.generate(PROMPT, max_new_tokens=16)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] and chunks[-1].usage.completion_tokens == 16
    assert len({c.id for c in chunks}) == 1


def test_chat_uses_the_template_as_transformers_does(client, session, export):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(export / "tokenizer.json"), bos_token="<eos>",
                                 eos_token="<eos>", chat_template=CHAT_TEMPLATE)
    ids = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = session.generate(list(ids), max_new_tokens=10)
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                            extra_body={"return_token_ids": True})
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].token_ids == expected.ids[0]
    assert answer.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_template_kwargs_reach_the_template(client, session, export):
    """``chat_template_kwargs`` are the template's variables, ``add_generation_prompt`` among
    them (as vLLM merges them), overriding the request's own field."""
    template = ChatTemplate.find(export)
    without = session.tokenizer.encode(template.render(MESSAGES, add_generation_prompt=False),
                                       add_special_tokens=False)
    answer = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, temperature=0,
        extra_body={"chat_template_kwargs": {"add_generation_prompt": False}, "return_token_ids": True})
    assert answer.usage.prompt_tokens == len(without)
    assert answer.choices[0].token_ids == session.generate(without, max_new_tokens=3).ids[0]


def test_template_rendering_matches_transformers(tmp_path):
    from test_server_support import byte_level_tokenizer
    from transformers import PreTrainedTokenizerFast

    template = (
        "{%- set ns = namespace(n=0) -%}{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{{ m.role }}:{{ m.content | tojson }}{% generation %}!"
        "{% endgeneration %}\n{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}"
        "{% if add_generation_prompt %}{{ eos_token }}>{% endif %}")
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "unused",
                                                                "eos_token": {"content": "<eos>"}}))
    (tmp_path / "chat_template.jinja").write_text(template)  # the file wins, as in transformers
    ours = ChatTemplate.find(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<eos>",
                                 chat_template=template)
    messages = [*MESSAGES, {"role": "assistant", "content": 'a "<b>"'}]
    for prompt in (True, False):
        assert ours.render(messages, prompt) == hf.apply_chat_template(
            messages, add_generation_prompt=prompt, tokenize=False)


def test_stop_strings_cut_streamed_and_whole_alike(client, session):
    full = session.generate(PROMPT, max_new_tokens=24).text
    stop = full[len(full) // 3:][:3]
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert whole.choices[0].text == full[: full.index(stop)]
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens < 24
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_sampling_with_a_seed_is_the_runtimes(client, session):
    expected = session.generate(PROMPT, max_new_tokens=12, temperature=1.3, top_p=0.9, top_k=40, seed=7)
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.3,
                                       top_p=0.9, seed=7, extra_body={"top_k": 40, "return_token_ids": True})
    assert answer.choices[0].token_ids == expected.ids[0]


def test_requests_sent_together_decode_together(session):
    """Four requests that arrive while a batch runs are the next batch, all four together."""
    slow = WatchedSession(session, delay=0.02)
    model = ServedModel("tiny", slow, max_batch=4, max_queue=16, batching="whole")  # the whole-batch rule
    prompts = [[5, 17, 33, 2, 9], [40, 3, 99], [7, 7, 7, 7, 7, 7, 7], [12]]
    answers = [None] * 4
    with LiveServer(build_app([model])) as live:
        sock, reader = _stream_request(live.url, {"prompt": [1, 2], "max_tokens": 200, "temperature": 0})

        def ask(i):
            answers[i] = post(live.url, "/v1/completions", {"prompt": prompts[i], "max_tokens": 10 + i,
                                                            "temperature": 0, "return_token_ids": True})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert _until(lambda: model.scheduler.waiting == 4)
        reader.close()
        sock.close()  # the running batch ends; the four waiting ones are the next
        for t in threads:
            t.join(30)
    for i, (status, body) in enumerate(answers):
        assert status == 200
        assert body["choices"][0]["token_ids"] == session.generate(prompts[i], max_new_tokens=10 + i).ids[0]
        assert body["usage"]["completion_tokens"] == 10 + i
    assert slow.batches[0] == [[1, 2]] and sorted(slow.batches[1]) == sorted(prompts)
    assert len(slow.batches) == 2


# -- bad requests --------------------------------------------------------------------------------
DEEP = json.loads("[" * 40 + "]" * 40)
BAD = [
    ("/v1/completions", b'{"prompt": "x", ', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("/v1/completions", {"prompt": 12}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "4"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": [1] * 250, "max_tokens": 10}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1] * 300}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, -1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 0}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 0}, 400, "top_logprobs"),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "messages.0.content"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "prompt"),
    ("/v1/chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"x": DEEP}}, 400,
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"messages": []}}, 400,
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"tools": [{"type": "x"}]}}, 400,
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_requests_are_openai_errors_naming_the_field(server, path, body, status, param):
    got, answer = post(server.url, path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert not re.search(r"[A-Z]\w*Error\b|\w\(\)|Traceback", error["message"]), error["message"]
    ok, _ = post(server.url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert ok == 200


def test_openai_client_raises_its_own_errors(client, server):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    status, body = get(server.url, "/v2/nothing")
    assert status == 404 and body["error"]["message"]


def test_chat_without_a_template_is_a_clear_400(tmp_path):
    session = rt.load(tiny_export(tmp_path / "plain", chat_template=None), provider="cpu", threads=1)
    with LiveServer(build_app([ServedModel("plain", session)])) as live:
        status, body = post(live.url, "/v1/chat/completions", {"messages": MESSAGES})
        assert status == 400 and "no chat template" in body["error"]["message"]
        assert post(live.url, "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_api_key_on_every_route_but_health(session):
    with LiveServer(build_app([ServedModel("tiny", session)], api_key="s3cret")) as live:
        assert get(live.url, "/health")[0] == 200
        assert get(live.url, "/v1/models")[0] == 401
        status, body = post(live.url, "/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer nope"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        answer = good.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
        assert answer.choices[0].text == session.generate(PROMPT, max_new_tokens=4).text
        assert answer.usage.completion_tokens == 4
        assert get(live.url, "/v1/models", {"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="bad", max_retries=0).models.list()


# -- a full queue, clients that leave ------------------------------------------------------------
def _stream_request(url: str, body: dict) -> tuple[socket.socket, object]:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    raw = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    reader = sock.makefile("rb")
    while b"data:" not in reader.readline():  # headers, then the first chunk
        pass
    return sock, reader


def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(session):
    slow = WatchedSession(session, delay=0.02)
    model = ServedModel("tiny", slow, max_batch=1, max_queue=1, batching="whole")  # counts generate calls
    with LiveServer(build_app([model])) as live:
        sock, reader = _stream_request(live.url, {"prompt": PROMPT, "max_tokens": 200, "temperature": 0})
        waiting = {}
        second = threading.Thread(target=lambda: waiting.update(answer=post(
            live.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})))
        second.start()
        assert _until(lambda: model.scheduler.waiting == 1)
        status, body = post(live.url, "/v1/completions", {"prompt": "x"})
        assert status == 429 and body["error"]["code"] == "queue_full"
        reader.close()
        sock.close()  # the streaming client goes away: its generation stops, the waiting one runs
        second.join(10)
        assert waiting["answer"][0] == 200 and waiting["answer"][1]["usage"]["completion_tokens"] == 3
        assert slow.closed_early >= 1 and slow.tokens < 100
        assert _until(lambda: model.scheduler.running == 0 and model.scheduler.waiting == 0)


def test_a_whole_answer_client_that_leaves_frees_the_slot(session):
    slow = WatchedSession(session, delay=0.02)
    model = ServedModel("tiny", slow, max_batch=1, max_queue=1, batching="whole")  # counts generate calls
    with LiveServer(build_app([model])) as live:
        impatient = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=0.3)
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0)
        assert _until(lambda: model.scheduler.running == 0)
        assert slow.closed_early == 1 and slow.tokens < 100
        status, _ = post(live.url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 200


# -- the process -----------------------------------------------------------------------------------
def test_server_imports_no_torch():
    code = ("import sys, moe_onnx.server.app, moe_onnx.server.run, moe_onnx.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cli_serves_on_loopback_without_torch(export):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moe_onnx.cli", "serve", str(export), "--port", str(port),
                             "--threads", "1", "--provider", "cpu"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return get(url, "/health")[0] == 200
            except OSError:
                return False

        assert _until(up, 30), proc.stderr.read() if proc.poll() is not None else "no answer"
        status, body = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
        assert status == 200 and body["model"] == "tiny"
        maps = Path(f"/proc/{proc.pid}/maps")
        if maps.exists():
            assert "torch" not in maps.read_text()
        listening = [c for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"]
        assert [c.laddr.ip for c in listening] == ["127.0.0.1"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_tokenizer_encode_can_leave_out_special_tokens(tmp_path):
    """Runtime change for chat: a rendered template holds its own BOS, so it is tokenized
    without the post-processor's (transformers' apply_chat_template does the same)."""
    from test_server_support import byte_level_tokenizer
    from tokenizers.processors import TemplateProcessing

    from moe_onnx.runtime.tokenizer import TextTokenizer

    tok = byte_level_tokenizer()
    tok.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    text = TextTokenizer(tmp_path / "tokenizer.json")
    assert text.encode("def f") == [0, *text.encode("def f", add_special_tokens=False)]
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    no_bos = TextTokenizer(tmp_path / "tokenizer.json")
    assert no_bos.encode("def f") == no_bos.encode("def f", add_special_tokens=False)
    assert no_bos.encode("def f", add_special_tokens=True)[0] == 0


def test_queue_counts_decoding_and_waiting_requests(session):
    from moe_onnx.server.batching import Finish, Job, QueueFull, Sampling, Scheduler

    slow = WatchedSession(session, delay=0.02)
    scheduler, events = Scheduler(slow, max_batch=2, max_queue=0), []
    jobs = [Job([5, 6], 50, Sampling(), (), events.append) for _ in range(3)]
    scheduler.submit(jobs[0])
    scheduler.submit(jobs[1])  # idle: both wait for the first batch
    with pytest.raises(QueueFull):
        scheduler.submit(jobs[2])
    scheduler.start()
    try:
        assert _until(lambda: scheduler.running == 2)
        with pytest.raises(QueueFull):
            scheduler.submit(jobs[2])
        for job in jobs[:2]:
            scheduler.cancel(job)  # every row of the batch gone: decoding stops
        assert _until(lambda: scheduler.running == 0) and slow.closed_early == 1 and slow.tokens < 40
        jobs[2].max_tokens = 3
        scheduler.submit(jobs[2])
        assert _until(lambda: any(isinstance(e, Finish) for e in events))
        assert [e.completion_tokens for e in events if isinstance(e, Finish)] == [3]
    finally:
        scheduler.close()
