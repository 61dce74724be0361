"""What ``moe-onnx serve`` was asked for, and the app it makes: the same in one process and in
each Ray Serve replica."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_onnx.errors import MoeOnnxError
from moe_onnx.server.batching import BATCHING


@dataclass(frozen=True)
class ServeConfig:
    """What ``moe-onnx serve`` was asked for; a Ray replica builds its app from it too."""

    outs: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "auto"
    threads: int | None = None
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    batching: str = "continuous"  # one of BATCHING
    prefill_chunk: int = 256  # prompt tokens prefilled between two decode steps
    prefix_cache_mb: float = 256  # continuous batching's prompt cache, MiB; 0: off

    def __post_init__(self) -> None:
        if not self.outs:
            raise MoeOnnxError("give at least one export to serve")
        if self.max_batch < 1 or self.max_queue < 0:
            raise MoeOnnxError("--max-batch must be at least 1 and --max-queue at least 0")
        if self.batching not in BATCHING or self.prefill_chunk < 1:
            raise MoeOnnxError("--batching is continuous or whole, and --prefill-chunk at least 1")
        if self.prefix_cache_mb < 0:
            raise MoeOnnxError("--prefix-cache-mb is at least 0 (0 turns the prefix cache off)")
        if self.api_key is not None and not self.api_key.strip():
            # an empty key would let in exactly the requests that send none ("$KEY" unset, say)
            raise MoeOnnxError("--api-key (or $MOE_ONNX_API_KEY) is empty: give a key, or neither "
                               "to serve without one")
        names = [Path(out).resolve().name for out in self.outs]
        if len(set(names)) != len(names):
            raise MoeOnnxError(f"two exports have the same folder name (the model's name): {names}")


def load_models(config: ServeConfig) -> list:
    """One :class:`~moe_onnx.server.engine.ServedModel` per export."""
    from moe_onnx.runtime import threads
    from moe_onnx.server.engine import ServedModel

    if len(config.outs) > 1 and config.threads:  # one pool, so no model's threads spin beside another's
        threads.share_threads(config.threads)
    return [ServedModel.load(out, provider=config.provider, threads=config.threads,
                             max_batch=config.max_batch, max_queue=config.max_queue,
                             batching=config.batching, prefill_chunk=config.prefill_chunk,
                             prefix_cache_mb=config.prefix_cache_mb)
            for out in config.outs]


def build(config: ServeConfig):
    """The Starlette app of ``config``, models loaded."""
    from moe_onnx.server.app import build_app

    return build_app(load_models(config), config.api_key)
