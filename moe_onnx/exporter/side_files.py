"""The files written beside model.onnx: manifest, tokenizer and generation config, genai config."""

from __future__ import annotations

import json
import logging
import math
import platform
import shutil
from importlib import metadata
from pathlib import Path

from moe_onnx import contract as io
from moe_onnx import dtypes
from moe_onnx.exporter.checkpoint import Checkpoint, StateDictCheckpoint, sha256_files
from moe_onnx.exporter.config import Config
from moe_onnx.exporter.tokenizer_files import convert_sentencepiece
from moe_onnx.graphs.decoder import OPSET, STATIC_OPSET
from moe_onnx.manifest import Manifest
from moe_onnx.manifest import write as write_manifest
from moe_onnx.quantize import QuantConfig
from moe_onnx.spec import ModelSpec

log = logging.getLogger("moe_onnx.export")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def write_side_files(
    out: Path, *, spec: ModelSpec, cfg: Config, ckpt: Checkpoint, src_dir: Path | None, dtype: str, impl: str,
    quant: QuantConfig | None = None, kv_cache: str = "concat", kv_dtype: str | None = None,
) -> None:
    """Manifest, copied tokenizer/generation files, config.json and genai_config.json."""
    copied = []
    if src_dir is not None:
        for name in TOKENIZER_FILES:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, out / name)
                copied.append(name)
        if convert_sentencepiece(src_dir, out):
            copied.append("tokenizer.json")
    (out / "config.json").write_text(json.dumps(_json_safe(cfg.data), indent=2, default=str, allow_nan=False))
    if "generation_config.json" not in copied:
        token_ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        gen = {k: cfg.data[k] for k in token_ids if cfg.data.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    # genai's shared buffer is GroupQueryAttention's, not the static contract; its past has the model's dtype
    if spec.mla is not None:
        (key_heads, key_dim), (value_heads, value_dim) = spec.kv_dims()
        log.warning("genai_config.json not written: onnxruntime-genai allocates every layer's key and value "
                    "cache alike, [batch, num_key_value_heads, positions, head_size], which cannot describe "
                    "this multi-head latent attention cache (key [batch, %d, positions, %d], value "
                    "[batch, %d, positions, %d])", key_heads, key_dim, value_heads, value_dim)
    elif spec.layer_types and spec.model_type not in GENAI_HYBRIDS:
        log.warning("genai_config.json not written: of the hybrid families, onnxruntime-genai runs the "
                    "recurrent states of %s only, not %s's", ", ".join(sorted(GENAI_HYBRIDS)),
                    spec.model_type)
    elif kv_cache == "concat" and kv_dtype is None:
        (out / "genai_config.json").write_text(json.dumps(genai_config(spec, out), indent=2))
    manifest = Manifest(
        spec=spec,
        dtype=dtype,
        weights=dtypes.integer(quant.bits).name if quant else dtype,
        block_size=quant.block_size if quant else None,
        quant_method=quant.method if quant else None,
        moe_impl=impl if spec.moe is not None else None,
        opset=STATIC_OPSET if kv_cache == "static" else OPSET,
        params=spec.parameter_counts(),
        source=_source(ckpt, src_dir),
        tokenizer_files=tuple(copied),
        versions=_versions(),
        files={f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()},
        kv_cache=kv_cache,
        kv_dtype=kv_dtype,
    )
    write_manifest(out, manifest)


def _json_safe(value):
    """``value`` with each infinite or NaN float spelled as transformers saves it
    (``{"__float__": "Infinity"}``): JSON has no such numbers, and JavaScript's parser (transformers.js)
    refuses Python's ``Infinity``."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")}
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _source(ckpt: Checkpoint, src_dir: Path | None) -> dict:
    if isinstance(ckpt, StateDictCheckpoint) and not ckpt.files():
        return {"path": None, "kind": "in-memory model", "sha256": ckpt.digest()}
    files = ckpt.files()
    return {
        "path": str(src_dir.resolve()) if src_dir else None,
        "files": [f.name for f in files],
        "sha256": sha256_files(files),
    }


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in ("moe-onnx", "onnx", "onnxscript", "onnx-ir", "torch", "transformers", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


# Hybrid families onnxruntime-genai (0.18) runs: its model type for ours; it reads the recurrent
# states by the names the config gives and each layer's kind from ``layer_types`` (Qwen3-Next's
# decoder is Qwen3.5's text decoder as far as its states go: genai runs it as that).
GENAI_HYBRIDS = {"lfm2_moe": "lfm2_moe", "granitemoehybrid": "granitemoehybrid",
                 "qwen3_next": "qwen3_5_moe_text", "qwen3_5_moe": "qwen3_5_moe_text",
                 "qwen3_5_moe_text": "qwen3_5_moe_text"}
_GENAI_LAYER_TYPES = {"attention": "full_attention"}  # the other kinds are spelled alike


def genai_config(spec: ModelSpec, out: Path) -> dict:
    """A config with which onnxruntime-genai runs the export (decoder-only, no shared buffer)."""
    gen = {}
    gen_path = out / "generation_config.json"
    if gen_path.is_file():
        gen = json.loads(gen_path.read_text())
    eos = gen.get("eos_token_id", 0)
    eos = eos if eos is not None else 0
    config = {
        "model": {
            "bos_token_id": gen.get("bos_token_id", 0) or 0,
            "context_length": spec.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": io.INPUT_IDS,
                    "attention_mask": io.ATTENTION_MASK,
                    "position_ids": io.POSITION_IDS,
                    "past_key_names": io.PAST_KEY,
                    "past_value_names": io.PAST_VALUE,
                },
                "outputs": {
                    "logits": io.LOGITS,
                    "present_key_names": io.PRESENT_KEY,
                    "present_value_names": io.PRESENT_VALUE,
                },
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": gen.get("pad_token_id", eos if isinstance(eos, int) else eos[0]) or 0,
            "type": "llama",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "do_sample": False,
            "max_length": spec.max_position_embeddings,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    if spec.layer_types:  # a hybrid: the recurrent states' names and each layer's kind
        decoder = config["model"]["decoder"]
        config["model"]["type"] = GENAI_HYBRIDS[spec.model_type]
        decoder["inputs"]["past_conv_names"] = io.PAST_CONV
        decoder["outputs"]["present_conv_names"] = io.present(io.PAST_CONV)
        recurrent = io.PAST_SSM if "mamba" in spec.layer_types else io.PAST_RECURRENT  # genai: one kind
        if "linear_attention" in spec.layer_types or "mamba" in spec.layer_types:
            decoder["inputs"]["past_recurrent_names"] = recurrent
            decoder["outputs"]["present_recurrent_names"] = io.present(recurrent)
        decoder["layer_types"] = [_GENAI_LAYER_TYPES.get(kind, kind) for kind in spec.layer_types]
    return config
