"""Parity of an export against its source model: PyTorch (transformers) beside ONNX Runtime.

The same random batch goes through both: a prefill with left padding, then decode steps through
the KV cache. Logits are compared at every non-padded position.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_onnx import contract as io
from moe_onnx import dtypes, manifest
from moe_onnx.contract import past_names, positions_from_mask
from moe_onnx.errors import ExportError
from moe_onnx.quantize import float32_kernels
from moe_onnx.runtime.threads import session_options
from moe_onnx.spec import ModelSpec

log = logging.getLogger("moe_onnx.verify")
# Relative error: max |onnx - torch| / max |torch| over the compared logits.
TOLERANCE = {name: row.tolerance for name, row in dtypes.DTYPES.items() if row.compute}


@dataclass(frozen=True)
class ParityReport:
    max_abs: float
    max_rel: float
    argmax_agree: float  # fraction of compared positions whose argmax matches
    positions: int

    def __str__(self) -> str:
        return (
            f"max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g}, "
            f"argmax agree {self.argmax_agree:.1%} over {self.positions} positions"
        )


def left_padded_batch(lengths: list[int], vocab: int, rng: np.random.Generator):
    """Random ids ``[B, max_len]`` left-padded per ``lengths``, with mask and position ids."""
    total = max(lengths)
    ids = rng.integers(0, vocab, size=(len(lengths), total), dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, total - n :] = 1
        ids[b, : total - n] = 0
    positions = positions_from_mask(mask, total)
    return ids, mask, positions


def run_both(model, onnx_dir: Path, spec: ModelSpec, lengths=(9, 5), decode_steps=3, seed=0, exact=False):
    """Yield (torch_logits, onnx_logits, valid_mask) for the prefill then each decode step.

    ``exact`` makes ONNX Runtime's fused quantized MatMul (MatMulNBits) compute in float32; by
    default it quantizes activations to int8 per block, as llama.cpp does, for speed.
    """
    import onnxruntime as ort
    import torch

    options = session_options()
    with float32_kernels(options) if exact else contextlib.nullcontext():
        session = ort.InferenceSession(
            str(Path(onnx_dir) / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
    np_kv = dtypes.by_ort(session.get_inputs()[3].type).numpy
    np_state = dtypes.get(manifest.read(onnx_dir).dtype).numpy
    rng = np.random.default_rng(seed)
    ids, mask, pos = left_padded_batch(list(lengths), spec.vocab_size, rng)
    feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: pos, **io.keep_all()}
    capacity = max(lengths) + decode_steps if io.is_static(session.get_inputs()[3].shape) else 0
    kv_dims = manifest.read(onnx_dir).kv_dims  # MLA: the latent and the roped key differ
    feeds.update(io.empty_pasts(len(lengths), spec.num_layers, kv_dims, np_kv, capacity, spec.layer_types))
    feeds.update(io.empty_states(len(lengths), spec.state_shapes(), np_state))
    names = [o.name for o in session.get_outputs()]
    past = None
    valid = mask.astype(bool)
    with torch.no_grad():
        for step in range(decode_steps + 1):
            ref = model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos),
                past_key_values=past,
                use_cache=True,
            )
            past = ref.past_key_values
            outputs = dict(zip(names, session.run(None, feeds), strict=True))
            yield ref.logits.float().numpy(), outputs[io.LOGITS].astype(np.float32), valid
            ids = rng.integers(0, spec.vocab_size, size=(len(lengths), 1), dtype=np.int64)
            mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
            pos = pos[:, -1:] + 1
            valid = np.ones_like(ids, dtype=bool)
            feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: mask, io.POSITION_IDS: pos, **io.keep_all()}
            for name in [*past_names(spec.num_layers, spec.layer_types), *spec.state_shapes()]:
                feeds[name] = outputs[io.present(name)]
            del step


def compare(model, onnx_dir: Path, spec: ModelSpec, **kwargs) -> ParityReport:
    """Max absolute/relative logits error and argmax agreement over prefill + decode steps."""
    max_abs = scale = 0.0
    agree = total = 0
    for ref, got, valid in run_both(model, onnx_dir, spec, **kwargs):
        ref_v, got_v = ref[valid], got[valid]
        max_abs = max(max_abs, float(np.abs(ref_v - got_v).max()))
        scale = max(scale, float(np.abs(ref_v).max()))
        agree += int((ref_v.argmax(-1) == got_v.argmax(-1)).sum())
        total += ref_v.shape[0]
    return ParityReport(max_abs, max_abs / max(scale, 1e-12), agree / total, total)


def _perplexity_delta(model, onnx_dir: Path, spec: ModelSpec, text: Path) -> None:
    from moe_onnx.errors import MoeOnnxError
    from moe_onnx.evaluation import onnx_quality, token_windows, torch_quality

    if not text.is_file():
        raise ExportError(f"--verify-text {text}: no such file")
    window = min(256, spec.max_position_embeddings)
    try:
        windows = token_windows(onnx_dir / "tokenizer.json", [text], window)[:64]
    except MoeOnnxError as err:
        raise ExportError(f"--verify-text: {err}") from None
    ref, got = torch_quality(model, windows).perplexity, onnx_quality(onnx_dir, windows).perplexity
    print(f"perplexity on {text.name} ({len(windows)} windows of {window}): PyTorch {ref:.4f}, "
          f"ONNX {got:.4f} ({100 * (got / ref - 1):+.2f}%)")


def fake_quantized(model, quant, names):
    """``model`` with every weight the export quantizes replaced by its dequantization.

    The export quantizes along each matrix's input axis, which is the last axis of every torch
    weight it reads (Linear ``[out, in]``, stacked experts ``[E, out, in]``, embeddings ``[V, H]``)
    but for stacked experts held ``[E, in, out]`` (``names.stacked_in_out``), so blocks match one
    for one. Routers, their selection bias, the shared-expert gate, biases and convolutions stay
    as they are.
    """
    import torch

    from moe_onnx.quantize import dequantize, quantize

    keep = ("." + names.router, "." + names.router_bias, "." + names.shared_gate,
            "." + names.stacked_gate_up_bias, "." + names.stacked_down_bias)  # [E, 2F] / [E, H] biases
    keep += (".conv.weight", ".conv1d.weight")  # recurrent mixers' depthwise convolutions (no MatMul)
    embed = "." + names.embed  # a gathered table, quantized as such (a tied lm_head shares it)
    stacked = ("." + names.stacked_gate_up, "." + names.stacked_down)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim < 2 or name.endswith(keep):
                continue
            w = param.detach().float().numpy()
            cfg = quant.for_gathered_table() if name.endswith(embed) else quant
            axis = -2 if names.stacked_in_out and name.endswith(stacked) else -1
            q, scale = quantize(w, cfg, axis=axis)
            param.copy_(torch.from_numpy(dequantize(q, scale, quant.block_size, axis=axis)))
    return model


def load_reference(src):
    """The source model in PyTorch, float32, eager attention."""
    if hasattr(src, "state_dict"):
        return src.eval()
    import torch
    from transformers import AutoModelForCausalLM

    from moe_onnx.exporter.config import Config
    from moe_onnx.exporter.fp8 import is_fp8
    from moe_onnx.exporter.mxfp4 import is_mxfp4

    cfg = Config.load(Path(src))
    if is_mxfp4(cfg) or is_fp8(cfg):  # transformers' loaders need accelerate or GPU kernels here
        return _dequantized_reference(Path(src))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _dequantized_reference(src: Path):
    """The model of an MXFP4 or FP8 checkpoint in float32 with its weights dequantized, as
    transformers' own loaders dequantize them on a machine without the kernels: the dequantized
    tensors are written under their stored names beside the config (without its
    quantization_config) and loaded by transformers, whose name mapping then applies as usual."""
    import tempfile

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_onnx.exporter import fp8, mxfp4
    from moe_onnx.exporter.checkpoint import open_checkpoint
    from moe_onnx.exporter.config import Config

    cfg = Config.load(src)
    ckpt = fp8.dequantizing(cfg, mxfp4.dequantizing(cfg, open_checkpoint(src)))
    config = AutoConfig.from_pretrained(src)
    del config.quantization_config
    with tempfile.TemporaryDirectory(prefix="moe-onnx-reference-") as tmp:
        config.save_pretrained(tmp)
        state = {n: torch.from_numpy(np.array(ckpt.load(n), np.float32, order="C")) for n in ckpt.names()}
        save_file(state, str(Path(tmp) / "model.safetensors"))
        del state
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def verify_export(src, onnx_dir: Path, spec: ModelSpec, dtype: str, quant=None, names=None,
                  text=None) -> ParityReport:
    """Compare and raise :class:`ExportError` beyond the dtype's tolerance.

    A quantized export is compared twice: against the source model (the quantization error,
    reported but not checked), and against the source model with the same
    quantized-then-dequantized weights (the graph's plumbing, held to the compute dtype's
    tolerance, MatMulNBits in float32). The last line printed is that check's verdict.
    With ``text`` (a file), the perplexity of the source model in PyTorch and of the export
    through ONNX Runtime on that text are printed side by side (``moe-onnx eval``'s method).
    """
    try:
        import transformers
    except ImportError:
        raise ExportError("--verify needs transformers: pip install 'moe-onnx[verify]'") from None
    if dtype == "bf16":
        raise ExportError(
            "--verify cannot run a bf16 export here: ONNX Runtime's CPU provider has no bfloat16 "
            "kernels (bf16 exports are for the CUDA provider); verify with --dtype fp16 or fp32"
        )
    transformers.utils.logging.disable_progress_bar()
    model = load_reference(src)
    if text is not None:
        _perplexity_delta(model, onnx_dir, spec, Path(text))
    if quant is not None:
        report = compare(model, onnx_dir, spec)
        print(f"quantization error vs source (int{quant.bits}, block {quant.block_size}; "
              f"reported, not checked): {report}")
        model = fake_quantized(copy.deepcopy(model) if hasattr(src, "state_dict") else model, quant, names)
        checked = f"{dtype} against the same dequantized weights"
        report = compare(model, onnx_dir, spec, exact=True)
    else:
        report, checked = compare(model, onnx_dir, spec), dtype
    kv = manifest.read(onnx_dir).kv_dtype  # a narrower cache is held to its own dtype's tolerance
    held = kv if kv and TOLERANCE[kv] > TOLERANCE[dtype] else dtype
    if report.max_rel > TOLERANCE[held]:
        raise ExportError(
            f"verification failed: relative logits error {report.max_rel:.3g} exceeds the {held} "
            f"tolerance {TOLERANCE[held]:g} ({report})"
        )
    print(f"verify ({checked}): {report}: passed ({held} tolerance {TOLERANCE[held]:g})")
    return report
