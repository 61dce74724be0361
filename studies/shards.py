"""Sharded safetensors written one tensor at a time, for the studies' random real-size checkpoints.

The safetensors library writes a whole shard from memory (and its numpy API has no bfloat16), so a
13 GB checkpoint is written here instead: per shard an 8-byte header length, the JSON header, then
each tensor's raw bytes from a caller's writer; beside them ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

ITEMSIZE = {"BF16": 2, "U8": 1}


def write_shards(out: Path, items: Iterable[tuple[str, str, tuple]], shard_bytes: int,
                 write: Callable, keep_with_next: Callable[[str], bool] = lambda name: False) -> int:
    """Write ``items`` (name, safetensors dtype, shape) into shards of about ``shard_bytes``;
    ``write(f, name, dtype, shape, shard, k)`` writes the k-th tensor of shard ``shard``'s bytes;
    a tensor for which ``keep_with_next`` is true never ends a shard (a pair stays together).
    Returns the bytes of tensor data."""
    shards, current, size = [], [], 0
    for item in items:
        current.append(item)
        size += ITEMSIZE[item[1]] * int(np.prod(item[2]))
        if size >= shard_bytes and not keep_with_next(item[0]):
            shards.append(current)
            current, size = [], 0
    shards += [current] if current else []
    weight_map, total = {}, 0
    for n, tensors in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor, dtype, shape in tensors:
            nbytes = ITEMSIZE[dtype] * int(np.prod(shape))
            header[tensor] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for k, (tensor, dtype, shape) in enumerate(tensors):
                write(f, tensor, dtype, shape, n, k)
                weight_map[tensor] = name
        total += offset
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    return total


def random_bf16(std: float = 0.02, size: int = 1 << 24, seed: int = 0) -> np.ndarray:
    """A pool of ``size`` normal(0, ``std``) values as bfloat16 bit patterns (uint16: the float32's
    top half; numpy has no bfloat16), from which studies slice their random tensors."""
    pool = (np.random.default_rng(seed).standard_normal(size, dtype=np.float32) * std).view(np.uint32)
    return (pool >> 16).astype(np.uint16)


def write_pool_slice(f, pool: np.ndarray, n: int, k: int, count: int) -> None:
    """``count`` values of ``pool`` from an offset that differs by tensor (``n``) and part (``k``),
    cycling: fast, and neighbouring tensors differ."""
    start = (n * 1_000_003 + k * 7919) % (pool.size - 1)
    f.write(np.resize(np.roll(pool, -start), count).tobytes())


def write_random_checkpoint(out: Path, cfg: dict, tensors: Iterable[tuple[str, tuple]], shard_bytes: int,
                            zero_suffixes: tuple[str, ...] = ()) -> int:
    """``config.json`` and sharded bf16 safetensors of random weights: every matrix a slice of one
    random pool (:func:`random_bf16`, std 0.02) at an offset that differs by tensor, every vector
    1.0 (norms) or 0.0 where its name ends with one of ``zero_suffixes`` (biases). The bytes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    pool_bf16 = random_bf16()

    def write(f, tensor, dtype, shape, n, k):
        count = int(np.prod(shape))
        if len(shape) == 1:
            fill = 0 if tensor.endswith(zero_suffixes) else 0x3F80  # 0.0, 1.0 in bfloat16
            f.write(np.full(count, fill, np.uint16).tobytes())
        else:
            write_pool_slice(f, pool_bf16, n, k, count)

    return write_shards(out, ((name, "BF16", shape) for name, shape in tensors), shard_bytes, write)
