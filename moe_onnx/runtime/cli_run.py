"""``moe-onnx run``: stream a completion to stdout, speeds to stderr; or ids as JSON."""

from __future__ import annotations

import json
import sys

from moe_onnx.runtime.session import RuntimeInputError, load


def _parse_ids(ids: str) -> list[int]:
    try:
        return [int(x) for x in ids.split(",") if x.strip()]
    except ValueError:
        raise RuntimeInputError(f"--ids must be comma-separated integers, got {ids!r}") from None


def run_generation(out, *, prompt, ids, as_json: bool, provider: str, threads, load_options=None,
                   **options) -> None:
    """Load ``out`` (with :class:`Session`'s ``load_options``), generate from ``prompt`` or ``ids``,
    print as the CLI promises."""
    if (prompt is None) == (ids is None):
        raise RuntimeInputError("give exactly one of --prompt or --ids")
    source = prompt if prompt is not None else _parse_ids(ids)
    session = load(out, provider=provider, threads=threads, **(load_options or {}))
    if as_json:
        result = session.generate(source, **options)
        print(json.dumps({"ids": result.ids[0], "text": result.text}))
    else:
        stream = session.generate(source, stream=True, **options)
        for token in stream:
            sys.stdout.write(token.text if session.tokenizer else f"{token.id} ")
            sys.stdout.flush()
        sys.stdout.write("\n")
        result = stream.result
    print(
        f"[{session.provider}] prefill {result.prompt_tokens} tokens in "
        f"{result.prefill_seconds * 1e3:.1f} ms "
        f"({result.prefill_tokens_per_second:.1f} tok/s); decode {result.decode_tokens} tokens in "
        f"{result.decode_seconds * 1e3:.1f} ms ({result.decode_tokens_per_second:.1f} tok/s)",
        file=sys.stderr,
    )
