"""Train the reference MoE and its two dense twins on the same tokens with the same budget.

    python -m moe_onnx.reference.train [--out reference_models] [--steps 400] [--seed 0]

- ``moe``: Mixtral, 8 experts, top-2, expert width F.
- ``dense-active``: Llama with the same active parameters per token (FFN width 2F).
- ``dense-total``: Llama with the same total parameters (FFN width 8F).
Same hidden size, layers, heads, tokenizer, data order, steps, batch, schedule and seed. Weights
are saved in fp16 (the exporter reads them into fp32) to keep all three small enough for git.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moe_onnx.reference import MODEL_NAMES, default_models_dir
from moe_onnx.reference.corpus import files_digest, stdlib_files, token_stream, train_tokenizer


@dataclass(frozen=True)
class Budget:
    vocab_size: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    expert_width: int = 160
    experts: int = 8
    top_k: int = 2
    context: int = 256
    batch: int = 16
    steps: int = 400
    lr: float = 2e-3
    warmup: int = 40
    seed: int = 0
    eval_windows: int = 64


def build(name: str, b: Budget):
    """A fresh model of the named kind."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=b.vocab_size, hidden_size=b.hidden, num_hidden_layers=b.layers,
                  num_attention_heads=b.heads, num_key_value_heads=b.kv_heads, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, rope_theta=10000.0)
    torch.manual_seed(b.seed)
    if name == "moe":
        config = MixtralConfig(intermediate_size=b.expert_width, num_local_experts=b.experts,
                               num_experts_per_tok=b.top_k, router_aux_loss_coef=0.02, **common)
        return MixtralForCausalLM(config)
    width = {"dense-active": b.top_k, "dense-total": b.experts}[name] * b.expert_width
    return LlamaForCausalLM(LlamaConfig(intermediate_size=width, **common))


def batches(stream: np.ndarray, b: Budget):
    """The same ``steps`` batches of random windows for every model (fixed seed)."""
    rng = np.random.default_rng(b.seed)
    for _ in range(b.steps):
        starts = rng.integers(0, len(stream) - b.context, size=b.batch)
        yield torch.from_numpy(np.stack([stream[s : s + b.context] for s in starts]))


def lr_at(step: int, b: Budget) -> float:
    if step < b.warmup:
        return b.lr * (step + 1) / b.warmup
    progress = (step - b.warmup) / max(1, b.steps - b.warmup)
    return b.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_one(name: str, stream: np.ndarray, b: Budget, log_every: int = 50) -> tuple:
    model = build(name, b).train()
    opt = torch.optim.AdamW(model.parameters(), lr=b.lr, weight_decay=0.1, betas=(0.9, 0.95))
    start, losses = time.time(), []
    for step, x in enumerate(batches(stream, b)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, b)
        out = model(input_ids=x, labels=x, output_router_logits=(name == "moe"))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        if step % log_every == 0 or step == b.steps - 1:
            print(f"{name:12s} step {step:4d} loss {losses[-1]:.3f} lr {lr_at(step, b):.2e} {time.time() - start:6.0f}s", flush=True)
    return model.eval(), time.time() - start, float(np.mean(losses[-20:]))


def save(model, name: str, out: Path, tokenizer_dir: Path) -> Path:
    """fp16 safetensors + tokenizer files; returns the checkpoint directory."""
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(target, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def reload(target: Path):
    """The saved checkpoint as users get it (fp16 weights in float32, RoPE computed fresh)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()


def evaluate_heldout(model, tokenizer_json: Path, held_out: list[Path], b: Budget) -> dict:
    """Held-out perplexity in PyTorch by the method of :mod:`moe_onnx.benchmarks.quality`."""
    from moe_onnx.benchmarks.quality import token_windows, torch_quality

    windows = token_windows(tokenizer_json, held_out, b.context)[: b.eval_windows]
    report = torch_quality(model, windows)
    return {"heldout_nll": report.nll, "heldout_ppl": report.perplexity, "heldout_tokens": report.tokens,
            "method": f"first {len(windows)} non-overlapping {b.context}-token windows of the held-out "
                      "files concatenated (moe_onnx.benchmarks.quality)"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=default_models_dir())
    p.add_argument("--steps", type=int, default=Budget.steps)
    p.add_argument("--seed", type=int, default=Budget.seed)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default=",".join(MODEL_NAMES))
    p.add_argument("--tiny", action="store_true", help="Tiny sizes for a smoke test.")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    b = Budget(steps=args.steps, seed=args.seed)
    if args.tiny:
        b = Budget(vocab_size=300, hidden=32, layers=2, heads=2, kv_heads=1, expert_width=16, context=32,
                   batch=2, steps=args.steps, warmup=1, seed=args.seed, eval_windows=2)
    train_files, held_out = stdlib_files()
    if args.tiny:  # a smoke test: a few files are enough
        train_files, held_out = train_files[:10], held_out[:2]
    tok_dir = args.out / ".tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(train_files, b.vocab_size)
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "eos_token": "<|endoftext|>"}))
    stream = token_stream(tokenizer, train_files)
    print(f"{len(train_files)} training files, {len(stream)} tokens; {len(held_out)} held-out files", flush=True)
    for name in args.models.split(","):
        model, seconds, loss = train_one(name, stream, b)
        target = save(model, name, args.out, tok_dir)
        record = {"model": name, "budget": asdict(b), "seconds": round(seconds, 1), "final_train_loss": loss,
                  "tokens_seen": b.steps * b.batch * b.context, "train_files": len(train_files),
                  "train_files_digest": files_digest(train_files), "heldout_files": [f.name for f in held_out],
                  "heldout_files_digest": files_digest(held_out),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  **evaluate_heldout(reload(target), tok_dir / "tokenizer.json", held_out, b)}
        (target / "training.json").write_text(json.dumps(record, indent=2))
        print(f"{name}: {seconds:.0f}s, held-out ppl {record['heldout_ppl']:.2f}", flush=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()


if __name__ == "__main__":
    main()
