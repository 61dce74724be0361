"""``moe_onnx.json``: what an export is, as one typed object, read and written here only.

torch-free (the runtime reads it). ``read`` validates the whole file and names what is wrong;
every consumer (runtime, bench, eval, inspect, demo) goes through it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from moe_onnx import dtypes
from moe_onnx.errors import MoeOnnxError
from moe_onnx.spec import ModelSpec

FILENAME = "moe_onnx.json"
# The weights beside model.onnx (ONNX external data): the name Optimum and transformers.js use;
# exports before 2026-12-05 wrote model.onnx.data, which every reader still finds.
DATA_FILENAME = "model.onnx_data"
LEGACY_DATA_FILENAME = "model.onnx.data"
FORMAT = "moe-onnx/1"


class ManifestError(MoeOnnxError):
    """A folder that is not a moe-onnx export, or whose manifest is damaged."""


@dataclass(frozen=True)
class Manifest:
    """An export's description: the model spec, how it was exported, and where it came from."""

    spec: ModelSpec
    dtype: str  # compute dtype (activations, KV cache): a row of moe_onnx.dtypes
    weights: str  # weight storage format: a row of moe_onnx.dtypes (== dtype unless quantized)
    moe_impl: str | None  # None for dense models
    opset: int
    params: dict[str, int]  # {"total", "active_per_token"}
    source: dict = field(default_factory=dict)  # path, files, sha256 of the source weights
    tokenizer_files: tuple[str, ...] = ()
    versions: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # name -> bytes, the export's files when written
    block_size: int | None = None  # quantized weights: values per scale
    quant_method: str | None = None  # quantized weights: how scales were chosen (rtn, search)
    kv_cache: str = "concat"  # "concat" (the cache grows by copy) | "static" (a buffer updated in place)
    kv_dtype: str | None = None  # the KV cache's storage dtype when narrower than ``dtype``; None = dtype
    # Per layer, the (heads, dim) of the cached key and of the cached value (MLA: latent and roped key);
    # () = the spec's (exports before the field: (num_kv_heads, head_dim) both).
    kv_dims: tuple[tuple[int, int], tuple[int, int]] = ()

    def __post_init__(self) -> None:
        if not self.kv_dims:
            object.__setattr__(self, "kv_dims", self.spec.kv_dims())

    @property
    def model_type(self) -> str:
        return self.spec.model_type

    @property
    def compute(self) -> dtypes.DType:
        return dtypes.DTYPES[self.dtype]

    @property
    def kv(self) -> dtypes.DType:
        """The KV cache's storage dtype."""
        return dtypes.DTYPES[self.kv_dtype or self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one position holds, every attention layer's K and V (MLA: latent and
        roped key; a hybrid's recurrent layers hold none)."""
        per_layer = sum(heads * dim for heads, dim in self.kv_dims)
        return len(self.spec.attention_layers) * per_layer * self.kv.bytes

    @property
    def state_bytes(self) -> int:
        """A hybrid's recurrent states, bytes per sequence whatever its length (0 for others)."""
        return sum(math.prod(shape) for shape in self.spec.state_shapes().values()) * self.compute.bytes

    @property
    def bytes_per_token(self) -> float:
        """Weight bytes one decode step reads: the active parameters in their stored format
        (quantized matrices at their bits plus one compute-dtype scale per block; the rest, and
        unquantized exports, in the compute dtype)."""
        active, compute = self.params["active_per_token"], self.compute.bytes
        if not self.block_size:
            return active * compute
        floats = self.spec.float_parameters_per_token()
        per_value = dtypes.DTYPES[self.weights].bytes + compute / self.block_size
        return (active - floats) * per_value + floats * compute

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "model_type": self.spec.model_type,
            "spec": self.spec.to_dict(),
            "params": dict(self.params),
            "dtype": self.dtype,
            "weights": self.weights,
            "moe_impl": self.moe_impl,
            "opset": self.opset,
            "source": self.source,
            "tokenizer_files": list(self.tokenizer_files),
            "versions": self.versions,
            "files": self.files,
            "block_size": self.block_size,
            "quant_method": self.quant_method,
            "kv_cache": self.kv_cache,
            "kv_dtype": self.kv_dtype,
            "kv_dims": {"key": list(self.kv_dims[0]), "value": list(self.kv_dims[1])},
        }

    @classmethod
    def from_json(cls, data: dict, where: str = FILENAME) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"{where} does not hold a JSON object")
        if data.get("format") != FORMAT:
            raise ManifestError(f"{where}: unknown format {data.get('format')!r} (expected {FORMAT!r})")
        try:
            spec = ModelSpec.from_dict(data["spec"])
            params = {k: int(data["params"][k]) for k in ("total", "active_per_token")}
            dtype, opset = str(data["dtype"]), int(data["opset"])
            weights = str(data.get("weights", dtype))  # exports before the weights field: same as dtype
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(
                f"{where} is not a valid moe-onnx manifest ({type(err).__name__}: {err})"
            ) from None
        kv_cache = str(data.get("kv_cache", "concat"))  # exports before the field: concat
        if kv_cache not in ("concat", "static"):
            raise ManifestError(f"{where}: unknown kv_cache {kv_cache!r} (concat or static)")
        kv_dtype = data.get("kv_dtype")
        if kv_dtype is not None and kv_dtype not in dtypes.COMPUTE_DTYPES:
            raise ManifestError(f"{where}: unknown kv_dtype {kv_dtype!r}")
        for role, name in (("compute", dtype), ("weight", weights)):
            if name not in (dtypes.COMPUTE_DTYPES if role == "compute" else dtypes.WEIGHT_DTYPES):
                raise ManifestError(f"{where}: unknown {role} dtype {name!r}")
        return cls(spec, dtype, weights, data.get("moe_impl"), opset, params, data.get("source") or {},
                   tuple(data.get("tokenizer_files") or ()), data.get("versions") or {},
                   data.get("files") or {}, data.get("block_size"), data.get("quant_method"), kv_cache,
                   kv_dtype, _kv_dims(data.get("kv_dims"), spec, where))


def _kv_dims(data, spec: ModelSpec, where: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``{"key": [G, D], "value": [G, D]}`` as a pair of pairs; absent: () for the spec's (older
    exports; :class:`Manifest` fills it in)."""
    if data is None:
        return ()
    try:
        dims = tuple((int(data[k][0]), int(data[k][1])) for k in ("key", "value")
                     if len(data[k]) == 2 and all(isinstance(x, int) and x > 0 for x in data[k]))
    except (KeyError, TypeError):
        dims = ()
    if len(dims) != 2:
        raise ManifestError(f"{where}: kv_dims must be {{'key': [heads, dim], 'value': [heads, dim]}} of "
                            f"positive integers, got {data!r}")
    if dims != spec.kv_dims():
        raise ManifestError(f"{where}: kv_dims {data!r} disagree with the spec's cache "
                            f"{[list(d) for d in spec.kv_dims()]}")
    return dims


def read(out) -> Manifest:
    """The manifest of the export folder ``out``, or a clear error if ``out`` is not one."""
    out = Path(out)
    path = out / FILENAME
    if not out.is_dir():
        raise ManifestError(f"{out} is not a directory (expected a moe-onnx export folder)")
    if not path.is_file():
        raise ManifestError(f"{out} is not a moe-onnx export (no {FILENAME})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not a valid moe-onnx manifest (not JSON: {err})") from None
    return Manifest.from_json(data, str(path))


def write(out, manifest: Manifest) -> Path:
    path = Path(out) / FILENAME
    path.write_text(json.dumps(manifest.to_json(), indent=2))
    return path


def data_file(out: Path) -> Path:
    """The export's external weights file (this name, else the one exports before 2026-12-05 wrote;
    it may not exist: a small model keeps its weights in model.onnx)."""
    out = Path(out)
    legacy = out / LEGACY_DATA_FILENAME
    return legacy if legacy.is_file() and not (out / DATA_FILENAME).is_file() else out / DATA_FILENAME
