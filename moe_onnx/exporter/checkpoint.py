"""Reading checkpoints one tensor at a time: safetensors (single or sharded), PyTorch .bin/.pt,
or an in-memory model's state dict.

Safetensors are read with positioned reads of just the tensor asked for, so the process never
holds more than one source tensor (plus its converted copy): exporting a checkpoint larger
than memory works. Headers are validated against the file size up front, so a truncated or
corrupt file is named before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import ml_dtypes
import numpy as np

from moe_onnx.errors import CheckpointError

_ST_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": "bf16",
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,  # FP8 checkpoints (moe_onnx.exporter.fp8)
}


class Checkpoint(Protocol):
    """Tensors by checkpoint name: shapes without loading, float32 arrays on demand."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def load(self, name: str) -> np.ndarray: ...

    def load_index(self, name: str, index: int) -> np.ndarray:
        """``tensor[index]`` along the first axis, reading only that slice where possible."""
        ...

    def files(self) -> list[Path]: ...


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_safetensors_header(path: Path) -> dict[str, _Entry]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, 100_000_000):
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt safetensors file {path}: {err}") from None
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt safetensors file {path}: bad entry for {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if data_start + end > size:
            raise CheckpointError(
                f"truncated safetensors file {path}: tensor {name!r} ends at byte "
                f"{data_start + end} but the file has {size} bytes"
            )
        entries[name] = _Entry(path, dtype, shape, data_start + begin, end - begin)
    return entries


def _to_array(raw: bytes, entry: _Entry) -> np.ndarray:
    if entry.dtype == "BF16":
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32)
        bits <<= 16  # in place: one float32-sized array, not two
        return bits.view(np.float32).reshape(entry.shape)
    return np.frombuffer(raw, dtype=_ST_DTYPES[entry.dtype]).reshape(entry.shape)


class SafetensorsCheckpoint:
    """One ``model.safetensors`` or the shards listed by ``model.safetensors.index.json``."""

    def __init__(self, paths: list[Path]):
        self._paths = paths
        self._entries: dict[str, _Entry] = {}
        for path in paths:
            self._entries.update(_read_safetensors_header(path))

    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def load(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        with open(entry.path, "rb") as f:
            raw = os.pread(f.fileno(), entry.nbytes, entry.start)
        if len(raw) != entry.nbytes:
            raise CheckpointError(f"truncated safetensors file {entry.path} reading {name!r}")
        return _to_array(raw, entry)

    def load_index(self, name: str, index: int) -> np.ndarray:
        entry = self._entries[name]
        row_bytes = entry.nbytes // entry.shape[0]
        row = _Entry(entry.path, entry.dtype, entry.shape[1:], entry.start + index * row_bytes, row_bytes)
        with open(row.path, "rb") as f:
            raw = os.pread(f.fileno(), row.nbytes, row.start)
        return _to_array(raw, row)

    def files(self) -> list[Path]:
        return list(self._paths)


class StateDictCheckpoint:
    """An in-memory model (e.g. just fine-tuned): reads its parameters without copying them."""

    def __init__(self, state_dict: dict):
        self._tensors = dict(state_dict)
        self._paths: list[Path] = []

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def load(self, name: str) -> np.ndarray:
        return _torch_to_numpy(self._tensors[name])

    def load_index(self, name: str, index: int) -> np.ndarray:
        return _torch_to_numpy(self._tensors[name][index])

    def files(self) -> list[Path]:
        return list(self._paths)

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._tensors):
            h.update(name.encode())
            h.update(_torch_to_numpy(self._tensors[name]).tobytes())
        return h.hexdigest()


class TorchCheckpoint(StateDictCheckpoint):
    """PyTorch ``pytorch_model.bin`` (or sharded, or a ``.pt`` file), loaded with
    ``weights_only=True`` and memory-mapped where the file format allows."""

    def __init__(self, paths: list[Path]):
        super().__init__({})
        self._paths = paths
        for path in paths:
            self._tensors.update(_torch_state(path))


def _torch_state(path: Path) -> dict:
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not parse before refusing a file itself.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():  # e.g. a truncated pickle
            raise CheckpointError(f"cannot read PyTorch checkpoint {path}: {_first_line(err)}") from None
        # weights_only=True refused something that is not a tensor: unpickling it could run code.
        # torch's own message suggests weights_only=False; this tool never does that.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it references {found.group(1)}" if found else "it holds more than tensors"
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint ({what}) and will not be unpickled, since that "
            "could run arbitrary code; if you trust it, convert it to safetensors first"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"cannot read PyTorch checkpoint {path}: {_first_line(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _first_line(err: Exception) -> str:
    """torch's message for a bad file, on one line (a bare KeyError says nothing: then 'not a
    PyTorch checkpoint')."""
    if isinstance(err, KeyError):
        return "not a PyTorch checkpoint"
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    elif t.dtype == torch.float8_e4m3fn:  # numpy has no such type: its bits, as ml_dtypes reads them
        return t.view(torch.uint8).cpu().numpy().view(ml_dtypes.float8_e4m3fn)
    return t.cpu().numpy()


def open_checkpoint(src: Path) -> Checkpoint:
    """The checkpoint in a Hugging Face directory (or a single .safetensors/.bin/.pt file)."""
    if src.is_file():
        return _open_file(src)
    for index_name, cls in (
        ("model.safetensors.index.json", SafetensorsCheckpoint),
        ("pytorch_model.bin.index.json", TorchCheckpoint),
    ):
        index = src / index_name
        if index.exists():
            return cls(_shards(index))
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt"):
        if (src / name).exists():
            return _open_file(src / name)
    raise CheckpointError(
        f"no weights in {src}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def _open_file(path: Path) -> Checkpoint:
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint([path])
    return TorchCheckpoint([path])


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"corrupt index file {index}: no weight_map") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).exists()]
    if missing:
        raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
    return [index.parent / s for s in shards]


def sha256_files(paths: list[Path], chunk: int = 16 << 20) -> str:
    """A hash of the source weight files (positioned reads: no memory held)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            offset = 0
            while block := os.pread(f.fileno(), chunk, offset):
                h.update(block)
                offset += len(block)
    return h.hexdigest()
