"""``export``: checkpoint -> OUT/model.onnx (+ external data), manifest, tokenizer, genai config.

Everything is written into a temporary sibling directory and renamed into place only when the
graph is written, checked and (if asked) verified, so a failure never leaves a partial OUT.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import onnx
import onnx_ir as ir

from moe_onnx import manifest
from moe_onnx.errors import ExportError, MoeOnnxError
from moe_onnx.exporter import families, fp8, mxfp4, staging
from moe_onnx.exporter.checkpoint import Checkpoint, StateDictCheckpoint, open_checkpoint
from moe_onnx.exporter.config import Config
from moe_onnx.exporter.options import ExportOptions
from moe_onnx.exporter.progress import enabled as progress_enabled
from moe_onnx.exporter.progress import weight_progress
from moe_onnx.exporter.side_files import write_side_files
from moe_onnx.exporter.weights import CheckpointWeights
from moe_onnx.graphs.decoder import build_decoder
from moe_onnx.quantize import BLOCK_SIZES, QuantConfig
from moe_onnx.spec import ModelSpec

log = logging.getLogger("moe_onnx.export")


def export(src, out, options: ExportOptions | None = None, **kwargs) -> Path:
    """Export ``src`` to the directory ``out`` and return its path.

    ``src`` is a Hugging Face checkpoint directory (config.json + safetensors, sharded or not,
    or pytorch_model.bin) or an in-memory transformers model. The options are an
    :class:`ExportOptions` or its fields as keywords (``export(src, out, weights="int4")``);
    keywords given beside ``options`` replace its fields.

    Temporary directories that killed exports into ``out`` left beside it are removed first
    (only marked ones whose process is gone; each removal is logged as a warning).
    """
    opts = dataclasses.replace(options or ExportOptions(), **kwargs)
    quant, graph = opts.quant(), opts.decoder()
    out = Path(out)
    _check_out(out, opts.force)
    cfg, ckpt, src_dir = _open_source(src)
    ckpt = mxfp4.dequantizing(cfg, ckpt)  # MXFP4 experts (gpt-oss) read as float, one at a time
    ckpt = fp8.dequantizing(cfg, ckpt)  # FP8 block-scaled weights (DeepSeek-V3, GLM-4.5-FP8) alike
    family = families.get(str(cfg.require("model_type")))
    spec = family.spec(cfg)
    if quant and graph.moe_impl == "fused":
        _check_qmoe(spec, quant, opts.weights)
    model = build_decoder(spec, CheckpointWeights(ckpt, spec, family.names, opts.dtype, quant), graph)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging.remove_stale(out)
    tmp = staging.make_temp(out)
    try:
        _save(model, tmp, progress_enabled(opts.progress))
        write_side_files(tmp, spec=spec, cfg=cfg, ckpt=ckpt, src_dir=src_dir, dtype=opts.dtype,
                         impl=graph.moe_impl, quant=quant, kv_cache=graph.kv_cache, kv_dtype=graph.kv_dtype)
        if opts.verify or opts.verify_text:
            from moe_onnx.exporter.verify import verify_export

            verify_export(src if src_dir is None else src_dir, tmp, spec, opts.dtype, quant, family.names,
                          text=opts.verify_text)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s, %s, moe impl %s) to %s", spec.model_type, opts.dtype, _size(out),
             graph.moe_impl, out)
    return out


def _check_qmoe(spec: ModelSpec, quant: QuantConfig, weights: str) -> None:
    """Quantized ``fused`` experts are com.microsoft.QMoE, whose block-wise weights need the
    hidden size and the expert width to be multiples of the block (its schema; onnxruntime 1.31's
    CPU kernel takes block sizes that are powers of two from 16, which every --block-size is)."""
    if spec.moe is None:
        return
    sizes = {"hidden size": spec.hidden_size, "expert width": spec.moe.expert_size}
    bad = [f"{what} {n}" for what, n in sizes.items() if n % quant.block_size]
    if bad:
        fits = [b for b in BLOCK_SIZES if all(n % b == 0 for n in sizes.values())]
        hint = f"--block-size {' or '.join(map(str, fits))}, or " if fits else ""
        raise ExportError(f"--moe-impl fused --weights {weights} --block-size {quant.block_size}: "
                          f"com.microsoft.QMoE needs the {' and the '.join(bad)} to be multiples of "
                          f"the block size; use {hint}--moe-impl dispatch")


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


_EXTERNAL_THRESHOLD = 256  # bytes: larger initializers go to model.onnx_data (onnx_ir's default)


def _save(model: ir.Model, tmp: Path, progress: bool = False) -> None:
    path = tmp / "model.onnx"
    with weight_progress(model, progress, _EXTERNAL_THRESHOLD) as callback:
        # One tensor in flight at a time keeps peak memory near the largest tensor.
        ir.save(model, path, external_data=manifest.DATA_FILENAME, size_threshold_bytes=_EXTERNAL_THRESHOLD,
                callback=callback, max_workers=1, max_in_flight_bytes=1)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the written graph fails onnx.checker: {err}") from None


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = staging.old_name(out, tmp)
        out.rename(old)
        try:  # so that a later export removes it should this process die before it does
            staging.mark(old)
        except OSError:
            pass
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    staging.unmark(out)


def _size(out: Path) -> str:
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return f"{total / 1e6:.1f} MB"

