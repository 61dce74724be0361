"""The generate loop as small steps: prefill, decode one token, sample, stop.

Legend: B prompts in the batch, S prompt length (after left padding), V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from moe_onnx.contract import positions_from_mask
from moe_onnx.errors import RuntimeInputError
from moe_onnx.runtime.inputs import check_ids
from moe_onnx.runtime.sampling import SamplingConfig
from moe_onnx.runtime.stops import StopStrings
from moe_onnx.runtime.tokenizer import StreamDecoder, no_tokenizer_message


@dataclass(frozen=True)
class Token:
    """One generated token of prompt ``row``, with its text delta when a tokenizer is present."""

    row: int
    id: int
    text: str = ""


@dataclass
class GenerationResult:
    """New token ids and text per prompt, and how long prefill and decode took."""

    ids: list[list[int]]
    texts: list[str] | None
    prompt_tokens: int
    prefill_seconds: float
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def text(self) -> str | None:
        return self.texts[0] if self.texts else None

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """Validated prompts (left-padded into ``ids_BS`` / ``mask_BS``) and generation options."""

    ids_BS: np.ndarray
    mask_BS: np.ndarray
    max_new_tokens: int
    sampling: SamplingConfig
    seed: int | None
    stop: tuple[str, ...] = field(default=())

    @classmethod
    def make(cls, session, prompt_or_ids, max_new_tokens, temperature, top_k, top_p, seed, stop):
        prompts = _as_batch(prompt_or_ids)
        rows = [_encode(session, p) for p in prompts]
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > session.info.max_positions:
            raise RuntimeInputError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"maximum context of {session.info.max_positions} positions"
            )
        if max_new_tokens < 1:
            raise RuntimeInputError("max_new_tokens must be at least 1")
        ids = np.full((len(rows), longest), session.info.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, row in enumerate(rows):
            ids[b, longest - len(row):], mask[b, longest - len(row):] = row, 1
        check_ids(ids, session.info.vocab_size)
        try:
            sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
        except ValueError as err:
            raise RuntimeInputError(str(err)) from None
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return cls(ids, mask, int(max_new_tokens), sampling, seed, stop)


def _as_batch(prompt_or_ids) -> list:
    if isinstance(prompt_or_ids, str):
        return [prompt_or_ids]
    if isinstance(prompt_or_ids, np.ndarray):
        prompt_or_ids = prompt_or_ids.tolist()
    if isinstance(prompt_or_ids, (list, tuple)) and prompt_or_ids and all(
        isinstance(x, (int, np.integer)) for x in prompt_or_ids
    ):
        return [list(prompt_or_ids)]
    if isinstance(prompt_or_ids, (list, tuple)) and prompt_or_ids:
        return list(prompt_or_ids)
    raise RuntimeInputError("the prompt is empty: give text, a list of token ids, or a batch of them")


def _encode(session, prompt) -> list[int]:
    if isinstance(prompt, str):
        if session.tokenizer is None:
            raise RuntimeInputError(no_tokenizer_message(session.path))
        ids = session.tokenizer.encode(prompt)
    elif (isinstance(prompt, (list, tuple, np.ndarray))
          and all(isinstance(x, (int, np.integer)) for x in prompt)):
        ids = [int(x) for x in prompt]
    else:
        raise RuntimeInputError(
            f"a prompt must be text or a list of int token ids, got {type(prompt).__name__}"
        )
    if not ids:
        raise RuntimeInputError("the prompt is empty: need at least one token")
    return ids


class Generation:
    """Iterates the tokens of one generate call; ``result`` is complete once iteration ends."""

    def __init__(self, session, request: GenerationRequest):
        self.session, self.request = session, request
        self.result: GenerationResult | None = None

    def __iter__(self):
        s, r = self.session, self.request
        B = r.ids_BS.shape[0]
        state = _RowState.start(B, s.tokenizer, r.stop)
        rng = np.random.default_rng(r.seed)

        start = time.perf_counter()
        mask_BT = r.mask_BS
        positions_BS = positions_from_mask(mask_BT, mask_BT.shape[1])
        cache = s.empty_cache(B, capacity=mask_BT.shape[1] + r.max_new_tokens)
        next_B, cache = s.next_tokens(r.ids_BS, mask_BT, positions_BS, cache, r.sampling, rng)
        positions_B1 = np.ascontiguousarray(positions_BS[:, -1:])
        self.result = result = GenerationResult(state.new_ids, state.texts if s.tokenizer else None,
                                                int(mask_BT.sum()), time.perf_counter() - start)
        decode_start = time.perf_counter()
        ones_B1 = np.ones((B, 1), np.int64)
        for step in range(r.max_new_tokens):
            next_B = np.where(state.done, s.info.pad_id, next_B)
            last = step == r.max_new_tokens - 1
            for b in np.flatnonzero(~state.done):
                yield self._emit(b, int(next_B[b]), state, last)
            if state.done.all() or last:
                break
            result.decode_tokens += int((~state.done).sum())
            mask_BT = np.concatenate([mask_BT, ones_B1], axis=1)
            positions_B1 = positions_B1 + 1
            next_B, cache = s.next_tokens(next_B[:, None], mask_BT, positions_B1, cache, r.sampling, rng)
        result.decode_seconds = time.perf_counter() - decode_start if result.decode_tokens else 0.0

    def _emit(self, b: int, token_id: int, state: _RowState, last: bool) -> Token:
        """Token ``token_id`` of row ``b``; on the row's ``last`` token (or EOS) its text delta
        also carries what the decoder and the stop strings held back, so that the streamed text
        adds up to the final text."""
        state.new_ids[b].append(token_id)
        if token_id in self.session.info.eos_ids:
            state.done[b] = True
            return Token(b, token_id, self._text(b, "", state, end=True))
        if not state.decoders:
            return Token(b, token_id)
        piece = state.decoders[b].push(token_id) + (state.decoders[b].flush() if last else "")
        return Token(b, token_id, self._text(b, piece, state, end=last))

    def _text(self, b: int, piece: str, state: _RowState, end: bool) -> str:
        stops = state.stops[b]
        delta = stops.push(piece)
        if stops.stopped:
            state.done[b] = True
        elif end:
            delta += stops.finish()
        state.texts[b] = stops.text
        return delta


@dataclass
class _RowState:
    """What one generate call tracks per prompt row."""

    new_ids: list[list[int]]
    texts: list[str]
    done: np.ndarray  # [B] bool: hit EOS or a stop string
    decoders: list[StreamDecoder] | None
    stops: list[StopStrings]

    @classmethod
    def start(cls, batch: int, tokenizer, stop: tuple[str, ...]) -> _RowState:
        decoders = [StreamDecoder(tokenizer) for _ in range(batch)] if tokenizer else None
        new_ids, texts = [[] for _ in range(batch)], ["" for _ in range(batch)]
        stops = [StopStrings(stop) for _ in range(batch)]
        return cls(new_ids, texts, np.zeros(batch, dtype=bool), decoders, stops)
