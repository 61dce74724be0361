"""The generate loop as small steps: prefill, decode one token, sample, stop.

Legend: B prompts in the batch, S prompt length (after left padding), V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from moe_onnx.runtime.sampling import SamplingConfig, sample
from moe_onnx.runtime.session import RuntimeInputError
from moe_onnx.runtime.tokenizer import StreamDecoder


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
        session._check_ids(ids)  # noqa: SLF001 - the one place that validates token ids
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
            raise RuntimeInputError(f"{session.path} has no tokenizer.json: give token ids, not text")
        ids = session.tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple, np.ndarray)) and all(isinstance(x, (int, np.integer)) for x in prompt):
        ids = [int(x) for x in prompt]
    else:
        raise RuntimeInputError(f"a prompt must be text or a list of int token ids, got {type(prompt).__name__}")
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
        rng = np.random.default_rng(r.seed)
        B = r.ids_BS.shape[0]
        decoders = [StreamDecoder(s.tokenizer) for _ in range(B)] if s.tokenizer else None
        new_ids: list[list[int]] = [[] for _ in range(B)]
        texts = ["" for _ in range(B)]
        done = np.zeros(B, dtype=bool)

        start = time.perf_counter()
        logits, cache = s.forward(r.ids_BS, r.mask_BS)
        mask = r.mask_BS
        positions = np.clip(mask.sum(1, keepdims=True) - 1, 0, None)
        result = GenerationResult(new_ids, texts if decoders else None, int(mask.sum()), time.perf_counter() - start)
        self.result = result
        decode_start = None
        for step in range(r.max_new_tokens):
            next_B = np.where(done, s.info.pad_id, sample(logits[:, -1], r.sampling, rng))
            for b in np.flatnonzero(~done):
                yield self._emit(b, int(next_B[b]), new_ids, texts, decoders, done)
            if done.all() or step == r.max_new_tokens - 1:
                break
            if decode_start is None:
                decode_start = time.perf_counter()
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
            positions = positions + 1
            logits, cache = s.forward(next_B[:, None], mask, positions, cache)
            result.decode_tokens += int((~done).sum())
        if decode_start is not None:
            result.decode_seconds = time.perf_counter() - decode_start
        for b in range(B):
            if decoders and not done[b]:
                texts[b] += decoders[b].flush()

    def _emit(self, b, token_id, new_ids, texts, decoders, done) -> Token:
        s, r = self.session, self.request
        new_ids[b].append(token_id)
        if token_id in s.info.eos_ids:
            done[b] = True
            return Token(b, token_id, "")
        delta = decoders[b].push(token_id) if decoders else ""
        texts[b] += delta
        for stop in r.stop:
            if stop and stop in texts[b]:
                cut = texts[b].index(stop)
                delta = delta[: max(0, len(delta) - (len(texts[b]) - cut))]
                texts[b] = texts[b][:cut]
                done[b] = True
        return Token(b, token_id, delta)
