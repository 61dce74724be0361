"""Stop strings: the streamed text equals the final text, and no part of a cut stop string is ever
streamed; the one implementation (runtime/stops.py) is checked alone, then through generate."""

import pytest
from models import byte_level_tokenizer, make_model

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx.runtime.stops import StopStrings

PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stops")
    tok = byte_level_tokenizer()
    model = make_model("qwen3_moe", vocab_size=tok.get_vocab_size(), eos_token_id=None, pad_token_id=None)
    model.save_pretrained(tmp / "src")
    tok.save(str(tmp / "src" / "tokenizer.json"))
    return rt.load(moe_onnx.export(tmp / "src", tmp / "out"), provider="cpu")


def stops_of(text: str) -> list[str]:
    """Every substring of 1 to 6 characters of ``text``, first occurrences first."""
    found = []
    for length in range(1, 7):
        for start in range(len(text) - length + 1):
            piece = text[start:start + length]
            if piece not in found:
                found.append(piece)
    return found


def test_stop_strings_cut_the_stream_where_they_cut_the_text(session):
    full = session.generate(PROMPT, max_new_tokens=40).text
    candidates = stops_of(full)
    assert len(candidates) > 90  # enough multi-token stops to catch a leak
    for stop in candidates:
        stream = session.generate(PROMPT, max_new_tokens=40, stop=[stop, "\x00never"], stream=True)
        deltas = [token.text for token in stream]
        expected = full[: full.index(stop)]
        assert stream.result.text == expected, stop
        assert "".join(deltas) == expected, (stop, deltas)


def test_stream_without_stop_ends_with_the_whole_text(session):
    stream = session.generate(PROMPT, max_new_tokens=40, stream=True)
    assert "".join(token.text for token in stream) == stream.result.text
    assert stream.result.text == session.generate(PROMPT, max_new_tokens=40).text


@pytest.mark.parametrize("pieces, stops, sent, text", [
    (["ab", "c", "d"], ["cd"], "ab", "ab"),  # the stop spans two deltas: "c" held back
    (["abcd"], ["bc", "cd"], "a", "a"),  # two stops in one delta: the earlier cut wins
    (["x", "y", "z"], ["yzq"], "xyz", "xyz"),  # a prefix that never completes is released at the end
    (["hello"], [], "hello", "hello"),  # no stops: nothing held back
    (["ab", "", "c"], ["", "abc"], "", ""),  # empty stops are ignored, empty deltas are harmless
])
def test_stop_strings_alone(pieces, stops, sent, text):
    scanner = StopStrings(stops)
    out = "".join(scanner.push(p) for p in pieces)
    out += "" if scanner.stopped else scanner.finish()
    assert (out, scanner.text) == (sent, text)
    assert scanner.stopped == (text != "".join(pieces))


def test_server_rows_cut_where_the_runtime_cuts(session):
    """The server's batch rows (server/batching.py) use the same StopStrings: fed the same tokens,
    a row streams exactly the runtime's text and finishes with reason "stop"."""
    from moe_onnx.server.batching import Delta, Finish, Job, Row, Sampling

    ids = session.generate(PROMPT, max_new_tokens=40).ids[0]
    full = session.generate(PROMPT, max_new_tokens=40).text
    for stop in stops_of(full)[::3]:
        events = []
        row = Row(Job([1], 40, Sampling(), (stop,), events.append), session.tokenizer, ())
        for token_id in ids:
            if row.done:
                break
            row.push(token_id)
        sent = "".join(e.text for e in events if isinstance(e, Delta))
        assert sent == session.generate(PROMPT, max_new_tokens=40, stop=[stop]).text, stop
        assert [e.reason for e in events if isinstance(e, Finish)] == ["stop"], stop
