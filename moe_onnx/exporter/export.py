"""``export``: checkpoint -> OUT/model.onnx (+ external data), manifest, tokenizer, genai config.

Everything is written into a temporary sibling directory and renamed into place only when the
graph is written, checked and (if asked) verified, so a failure never leaves a partial OUT.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from moe_onnx import dtypes
from moe_onnx.errors import ExportError, MoeOnnxError
from moe_onnx.exporter import families
from moe_onnx.exporter.checkpoint import Checkpoint, StateDictCheckpoint, open_checkpoint
from moe_onnx.exporter.config import Config
from moe_onnx.exporter.manifest import write_side_files
from moe_onnx.exporter.weights import CheckpointWeights
from moe_onnx.graphs.decoder import build_decoder
from moe_onnx.graphs.moe import DEFAULT_MOE_IMPL, MOE_IMPLS
from moe_onnx.spec import ModelSpec

log = logging.getLogger("moe_onnx.export")


def export(
    src,
    out,
    *,
    dtype: str = "fp32",
    moe_impl: str = "auto",
    verify: bool = False,
    force: bool = False,
) -> Path:
    """Export ``src`` to the directory ``out`` and return its path.

    ``src`` is a Hugging Face checkpoint directory (config.json + safetensors, sharded or not,
    or pytorch_model.bin) or an in-memory transformers model. ``moe_impl`` is ``auto`` (the
    default sparse dispatch) or one of :data:`moe_onnx.graphs.moe.MOE_IMPLS`. With ``verify``
    the source model runs in PyTorch beside the export in ONNX Runtime and the export fails if
    the logits differ beyond the dtype's tolerance.
    """
    dtypes.get(dtype)  # a clear error for an unknown dtype
    impl = DEFAULT_MOE_IMPL if moe_impl == "auto" else moe_impl
    if impl not in MOE_IMPLS:
        raise ExportError(f"unknown moe impl {moe_impl!r}; choose auto or one of {', '.join(MOE_IMPLS)}")
    out = Path(out)
    _check_out(out, force)
    cfg, ckpt, src_dir = _open_source(src)
    family = families.get(str(cfg.require("model_type")))
    spec = family.spec(cfg)
    model = build_decoder(spec, CheckpointWeights(ckpt, spec, family.names, dtype), dtype, impl)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _save(model, tmp)
        write_side_files(tmp, spec=spec, cfg=cfg, ckpt=ckpt, src_dir=src_dir, dtype=dtype, impl=impl)
        if verify:
            from moe_onnx.exporter.verify import verify_export

            verify_export(src if src_dir is None else src_dir, tmp, spec, dtype)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s, %s, moe impl %s) to %s", spec.model_type, dtype, _size(out), impl, out)
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"output directory {out} exists and is not empty (use --force to replace it)")


def _open_source(src) -> tuple[Config, Checkpoint, Path | None]:
    if hasattr(src, "state_dict") and hasattr(src, "config"):
        cfg = Config(src.config.to_dict(), source=f"{type(src).__name__}.config")
        return cfg, StateDictCheckpoint(src.state_dict()), None
    path = Path(src)
    if not path.exists():
        raise MoeOnnxError(f"source {path} does not exist")
    return Config.load(path), open_checkpoint(path), path if path.is_dir() else path.parent


def _save(model: ir.Model, tmp: Path) -> None:
    path = tmp / "model.onnx"
    # One tensor in flight at a time keeps peak memory near the largest tensor.
    ir.save(model, path, external_data="model.onnx.data", max_workers=1, max_in_flight_bytes=1)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the written graph fails onnx.checker: {err}") from None


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _size(out: Path) -> str:
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return f"{total / 1e6:.1f} MB"


def load_spec(out: Path) -> ModelSpec:
    """The spec recorded in an export's manifest."""
    from moe_onnx import manifest

    return manifest.read(out).spec
