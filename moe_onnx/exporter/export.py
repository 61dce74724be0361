"""``export``: checkpoint -> OUT/model.onnx (+ external data), manifest, tokenizer, genai config.

Everything is written into a temporary sibling directory and renamed into place only when the
graph is written, checked and (if asked) verified, so a failure never leaves a partial OUT.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx
import onnx_ir as ir

from moe_onnx import dtypes
from moe_onnx.errors import ExportError, MoeOnnxError
from moe_onnx.exporter import families, fp8, mxfp4, staging
from moe_onnx.exporter.checkpoint import Checkpoint, StateDictCheckpoint, open_checkpoint
from moe_onnx.exporter.config import Config
from moe_onnx.exporter.progress import enabled as progress_enabled
from moe_onnx.exporter.progress import weight_progress
from moe_onnx.exporter.side_files import write_side_files
from moe_onnx.exporter.weights import CheckpointWeights
from moe_onnx.graphs.decoder import KV_CACHES, build_decoder
from moe_onnx.graphs.moe import DEFAULT_MOE_IMPL, MOE_IMPLS
from moe_onnx.quantize import BLOCK_SIZES, QuantConfig
from moe_onnx.spec import ModelSpec

log = logging.getLogger("moe_onnx.export")


def export(
    src,
    out,
    *,
    dtype: str = "fp32",
    weights: str | None = None,
    block_size: int = 32,
    quant_method: str = "rtn",
    moe_impl: str = "auto",
    kv_cache: str = "concat",
    kv_dtype: str | None = None,
    verify: bool = False,
    verify_text=None,
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Export ``src`` to the directory ``out`` and return its path.

    ``src`` is a Hugging Face checkpoint directory (config.json + safetensors, sharded or not,
    or pytorch_model.bin) or an in-memory transformers model. ``moe_impl`` is ``auto`` (the
    default sparse dispatch) or one of :data:`moe_onnx.graphs.moe.MOE_IMPLS`. With ``verify``
    the source model runs in PyTorch beside the export in ONNX Runtime and the export fails if
    the logits differ beyond the dtype's tolerance.

    ``dtype`` is the compute dtype (activations, KV cache); ``weights`` the storage of the
    weights: the compute dtype (None, the default) or ``int8``/``int4``, block-wise symmetric
    with one scale per ``block_size`` values, scales by ``quant_method`` (``rtn`` or ``search``;
    see :mod:`moe_onnx.quantize`). ``kv_cache`` is ``concat`` (the default contract) or ``static``
    (a preallocated buffer updated in place; opset 24; see :mod:`moe_onnx.contract`). ``kv_dtype``
    stores that cache narrower than ``dtype`` (``fp16`` under ``fp32``: half its bytes and memory).

    ``progress`` shows the weights being written on stderr (tensors, bytes, rate, ETA); None (the
    default): only when stderr is a terminal. Temporary directories that killed exports into
    ``out`` left beside it are removed first (only marked ones whose process is gone; each
    removal is logged as a warning).
    """
    quant = _quant_config(dtype, weights, block_size, quant_method)
    impl = _moe_impl(moe_impl)
    if kv_cache not in KV_CACHES:
        raise ExportError(f"unknown kv cache {kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
    kv_dtype = _kv_dtype(dtype, kv_dtype)
    out = Path(out)
    _check_out(out, force)
    cfg, ckpt, src_dir = _open_source(src)
    ckpt = mxfp4.dequantizing(cfg, ckpt)  # MXFP4 experts (gpt-oss) read as float, one at a time
    ckpt = fp8.dequantizing(cfg, ckpt)  # FP8 block-scaled weights (DeepSeek-V3, GLM-4.5-FP8) alike
    family = families.get(str(cfg.require("model_type")))
    spec = family.spec(cfg)
    if quant and impl == "fused":
        _check_qmoe(spec, quant, weights)
    source = CheckpointWeights(ckpt, spec, family.names, dtype, quant)
    model = build_decoder(spec, source, dtype, impl, kv_cache, kv_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging.remove_stale(out)
    tmp = staging.make_temp(out)
    try:
        _save(model, tmp, progress_enabled(progress))
        write_side_files(tmp, spec=spec, cfg=cfg, ckpt=ckpt, src_dir=src_dir, dtype=dtype, impl=impl,
                         quant=quant, kv_cache=kv_cache, kv_dtype=kv_dtype)
        if verify or verify_text:
            from moe_onnx.exporter.verify import verify_export

            verify_export(src if src_dir is None else src_dir, tmp, spec, dtype, quant, family.names,
                          text=verify_text)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s, %s, moe impl %s) to %s", spec.model_type, dtype, _size(out), impl, out)
    return out


def _kv_dtype(dtype: str, kv_dtype: str | None) -> str | None:
    """None when the cache keeps the compute dtype; else a narrower compute dtype with CPU kernels."""
    if kv_dtype is None or kv_dtype == dtype:
        return None
    kv, compute = dtypes.get(kv_dtype), dtypes.get(dtype)
    if kv.bits >= compute.bits:
        raise ExportError(f"--kv-dtype {kv_dtype} with --dtype {dtype}: the cache's dtype must be narrower "
                          "than the compute dtype (fp16 under fp32)")
    if not kv.cpu:
        raise ExportError(f"--kv-dtype {kv_dtype} is not supported: ONNX Runtime's CPU provider has no "
                          f"{kv_dtype} kernels for the cache's ops; use fp16")
    return kv_dtype


def _moe_impl(moe_impl: str) -> str:
    impl = DEFAULT_MOE_IMPL if moe_impl == "auto" else moe_impl
    if impl not in MOE_IMPLS:
        raise ExportError(f"unknown moe impl {moe_impl!r}; choose auto or one of {', '.join(MOE_IMPLS)}")
    return impl


def _quant_config(dtype: str, weights: str | None, block_size: int, method: str) -> QuantConfig | None:
    """None when the weights stay in the compute ``dtype``; a clear error for anything unknown."""
    dtypes.get(dtype)
    if weights is None or weights == dtype:
        return None
    if weights not in dtypes.QUANTIZED_DTYPES:
        raise ExportError(f"--weights {weights}: choose {', '.join(dtypes.QUANTIZED_DTYPES)}, "
                          f"or the compute dtype ({dtype})")
    if dtype == "bf16":
        raise ExportError("--weights int8/int4 with --dtype bf16 is not supported: ONNX Runtime has no "
                          "bfloat16 MatMulNBits kernel; use --dtype fp32 (CPU) or fp16 (CUDA)")
    return QuantConfig(dtypes.DTYPES[weights].bits, block_size, method)


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


_EXTERNAL_THRESHOLD = 256  # bytes: larger initializers go to model.onnx.data (onnx_ir's default)


def _save(model: ir.Model, tmp: Path, progress: bool = False) -> None:
    path = tmp / "model.onnx"
    with weight_progress(model, progress, _EXTERNAL_THRESHOLD) as callback:
        # One tensor in flight at a time keeps peak memory near the largest tensor.
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=_EXTERNAL_THRESHOLD,
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


def load_spec(out: Path) -> ModelSpec:
    """The spec recorded in an export's manifest."""
    from moe_onnx import manifest

    return manifest.read(out).spec
