"""Train the reference MoE and its two dense twins on the same tokens with the same budget.

    python -m moe_onnx.reference.train [--out reference_models] [--steps N | --minutes M] [--seed S]

- ``moe``: Mixtral, 8 experts, top-2, expert width F, a load-balancing loss on every layer.
- ``dense-active``: Llama with the same active parameters per token (FFN width 2F).
- ``dense-total``: Llama with the same total parameters (FFN width 8F).
Same hidden size, layers, heads, tokenizer, batches (the same windows in the same order), steps,
schedule and seed; fp32 on CPU; saved as fp32 safetensors. ``--minutes M`` times a few steps of
each model first and picks the step count at which the slowest one takes M minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from moe_onnx.reference import MODEL_NAMES, default_models_dir
from moe_onnx.reference.corpus import (
    save_tokenizer,
    split_record,
    stdlib_files,
    token_stream,
    train_tokenizer,
)

BALANCE_METHOD = (
    "train.balance_loss: per layer E * sum_i(share of top-k slots to expert i * mean router probability "
    "of i), averaged over layers (1.0 = balanced), weighted by budget.aux_coef; transformers' pooled "
    "Mixtral aux loss is not used"
)
HELDOUT_METHOD = (
    "held-out files' tokens (tokenizer.json, no special tokens) concatenated in sorted file order, cut "
    "into non-overlapping windows of `context` tokens (tail dropped; the first `eval_windows` windows, "
    "all when null); each window is an independent sequence; every position but the first predicts "
    "its next token; heldout_nll = mean NLL in nats over those predictions, heldout_ppl = exp(nll) "
    "(moe_onnx.evaluation.torch_quality, the method of `moe-onnx eval`)"
)


@dataclass(frozen=True)
class Budget:
    """Sizes, data and optimisation settings shared by the three models."""

    vocab_size: int = 4096
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    expert_width: int = 176
    experts: int = 8
    top_k: int = 2
    max_positions: int = 1024
    context: int = 256
    batch: int = 16
    steps: int = 500
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    aux_coef: float = 0.05  # on balance_loss, the mean over layers
    seed: int = 0
    eval_windows: int | None = None


TINY = Budget(vocab_size=300, hidden=32, layers=2, heads=2, kv_heads=1, expert_width=16,
              context=32, batch=2, steps=2, warmup=1, eval_windows=2)


def build(name: str, b: Budget):
    """A freshly initialised model of the named kind (seeded by ``b.seed``)."""
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
    )

    common = dict(vocab_size=b.vocab_size, hidden_size=b.hidden, num_hidden_layers=b.layers,
                  num_attention_heads=b.heads, num_key_value_heads=b.kv_heads,
                  max_position_embeddings=b.max_positions, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0, rope_theta=10000.0)
    torch.manual_seed(b.seed)
    if name == "moe":
        model = MixtralForCausalLM(MixtralConfig(
            intermediate_size=b.expert_width, num_local_experts=b.experts, num_experts_per_tok=b.top_k,
            router_aux_loss_coef=b.aux_coef, **common))
    else:
        width = {"dense-active": b.top_k, "dense-total": b.experts}[name] * b.expert_width
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=width, **common))
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return model


def parameter_counts(model) -> dict[str, int]:
    """Total parameters (the tied embedding once) and those one token uses (k of E experts)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    cfg = model.config
    unused = 0
    if experts:
        unused = experts * (cfg.num_local_experts - cfg.num_experts_per_tok) // cfg.num_local_experts
    return {"total": total, "active_per_token": total - unused}


def batches(stream: np.ndarray, b: Budget):
    """The same ``b.steps`` batches of random windows for every model (seeded by ``b.seed``)."""
    rng = np.random.default_rng(b.seed)
    for _ in range(b.steps):
        starts = rng.integers(0, len(stream) - b.context, size=b.batch)
        yield torch.from_numpy(np.stack([stream[s : s + b.context] for s in starts]))


def lr_at(step: int, b: Budget) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < b.warmup:
        return b.lr * (step + 1) / b.warmup
    progress = (step - b.warmup) / max(1, b.steps - b.warmup)
    return b.lr * (b.min_lr_ratio + (1 - b.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model, b: Budget):
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; norms are not decayed
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": b.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=b.lr, betas=(0.9, 0.95))


def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of each layer, averaged over layers; 1.0 when balanced.

    transformers' own Mixtral aux loss pools the layers' counts before it multiplies, so one layer
    can starve an expert that another overloads; this one balances every layer.
    """
    losses = []
    for logits_TE in router_logits:
        probs_TE = logits_TE.float().softmax(-1)
        chosen_TK = probs_TE.topk(top_k, dim=-1).indices
        num_experts = probs_TE.shape[-1]
        share_E = torch.bincount(chosen_TK.reshape(-1), minlength=num_experts).float() / chosen_TK.numel()
        losses.append(num_experts * (share_E * probs_TE.mean(0)).sum())
    return torch.stack(losses).mean()


def _step(model, opt, x: torch.Tensor, lr: float, b: Budget, moe: bool) -> tuple[float, float]:
    """One optimizer step; (language-model loss, balance loss) of the batch."""
    for group in opt.param_groups:
        group["lr"] = lr
    out = model(input_ids=x, output_router_logits=True) if moe else model(input_ids=x)
    # The loss transformers computes for labels=x, without its pooled router term.
    lm = model.loss_function(out.logits, x, vocab_size=model.config.vocab_size)
    aux = balance_loss(out.router_logits, b.top_k) if moe else torch.zeros(())
    (lm + b.aux_coef * aux if moe else lm).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(lm.detach()), float(aux.detach())


def train_one(name: str, stream: np.ndarray, b: Budget, log_every: int = 50) -> tuple:
    """(trained model in eval mode, seconds, mean LM loss of the last 20 steps, mean aux loss)."""
    model = build(name, b).train()
    opt = _optimizer(model, b)
    start, losses, auxes = time.perf_counter(), [], []
    for step, x in enumerate(batches(stream, b)):
        loss, aux = _step(model, opt, x, lr_at(step, b), b, name == "moe")
        losses.append(loss)
        auxes.append(aux)
        if step % log_every == 0 or step == b.steps - 1:
            elapsed = time.perf_counter() - start
            tps = (step + 1) * b.batch * b.context / elapsed
            print(f"{name:12s} step {step:5d} loss {loss:.3f} aux {aux:.3f} lr {lr_at(step, b):.2e} "
                  f"{elapsed:6.0f}s {tps:6.0f} tok/s", flush=True)
    seconds = time.perf_counter() - start
    return model.eval(), seconds, float(np.mean(losses[-20:])), float(np.mean(auxes[-20:]))


def steps_for(minutes: float, stream: np.ndarray, b: Budget, names: list[str]) -> int:
    """The step count at which the slowest of ``names`` trains for ``minutes`` (timed here)."""
    probe = replace(b, steps=4)
    slowest = 0.0
    for name in names:
        model = build(name, probe).train()
        opt = _optimizer(model, probe)
        times = []
        for x in batches(stream, probe):
            t = time.perf_counter()
            _step(model, opt, x, probe.lr, probe, name == "moe")
            times.append(time.perf_counter() - t)
        slowest = max(slowest, float(np.median(times[1:])))
    return max(1, int(minutes * 60 / slowest))


def expert_load(model, windows: np.ndarray, top_k: int, batch: int = 4) -> dict:
    """Routing slots per expert per layer on ``windows`` (each token takes ``top_k`` slots)."""
    counts = None
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            out = model(input_ids=torch.from_numpy(windows[start : start + batch]), output_router_logits=True)
            num_experts = out.router_logits[0].shape[-1]
            chosen = [logits.topk(top_k, dim=-1).indices.reshape(-1) for logits in out.router_logits]
            c = torch.stack([torch.bincount(ids, minlength=num_experts) for ids in chosen])
            counts = c if counts is None else counts + c
    share = counts.double() / counts.sum(-1, keepdim=True)
    return {"tokens_per_expert": counts.tolist(),
            "max_over_mean": [round(x, 3) for x in (share.max(-1).values * counts.shape[-1]).tolist()],
            "min_over_mean": [round(x, 3) for x in (share.min(-1).values * counts.shape[-1]).tolist()],
            "method": f"top-{top_k} of each layer's router logits over every position of the held-out "
                      "windows (PyTorch); a layer's counts sum to positions x top_k; "
                      "max/mean 1.0 is perfect balance"}


def evaluate(target: Path, windows: np.ndarray, b: Budget, moe: bool) -> dict:
    """Held-out loss (and the MoE's expert load) of the checkpoint as saved in ``target``."""
    from transformers import AutoModelForCausalLM

    from moe_onnx.evaluation import torch_quality

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    report = torch_quality(model, windows)
    record = {"heldout_nll": report.nll, "heldout_ppl": report.perplexity, "heldout_tokens": report.tokens,
              "heldout_windows": report.windows, "heldout_method": HELDOUT_METHOD}
    if moe:
        record["expert_load"] = expert_load(model, windows, b.top_k)
    return record


def save(model, name: str, out: Path, tokenizer_dir: Path) -> Path:
    """fp32 safetensors, config, generation config and tokenizer files; returns the directory."""
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    for f in sorted(tokenizer_dir.iterdir()):
        (target / f.name).write_bytes(f.read_bytes())
    return target


def run_model(name: str, stream: np.ndarray, windows: np.ndarray, b: Budget, out: Path,
              tokenizer_dir: Path, context: dict) -> dict:
    """Train, save and evaluate one model; writes and returns its training.json record."""
    model, seconds, loss, aux = train_one(name, stream, b)
    target = save(model, name, out, tokenizer_dir)
    tokens = b.steps * b.batch * b.context
    record = {"model": name, "model_type": model.config.model_type, "steps": b.steps, "tokens_seen": tokens,
              "seconds": round(seconds, 1), "tokens_per_second": round(tokens / seconds),
              "final_train_loss": loss,
              "final_train_loss_method": "mean LM loss (balance loss excluded) of the last 20 steps",
              **({"final_balance_loss": aux, "balance_loss_method": BALANCE_METHOD} if name == "moe" else {}),
              "parameters": parameter_counts(model), "seed": b.seed, "budget": asdict(b),
              **context, **evaluate(target, windows, b, name == "moe")}
    (target / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{name}: {seconds:.0f}s, final train loss {loss:.3f}, "
          f"held-out ppl {record['heldout_ppl']:.2f}", flush=True)
    return record


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=default_models_dir())
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help=f"Optimizer steps (default {Budget.steps}).")
    budget.add_argument("--minutes", type=float, default=None,
                        help="Size the step count so the slowest model takes this long.")
    p.add_argument("--seed", type=int, default=Budget.seed)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default=",".join(MODEL_NAMES))
    p.add_argument("--tiny", action="store_true", help="Tiny sizes and a few files: a smoke test.")
    return p.parse_args(argv)


def main(argv=None) -> None:
    """The command line: see the module docstring."""
    from moe_onnx.evaluation import token_windows

    args = _parse(argv)
    torch.set_num_threads(args.threads)
    b = replace(TINY if args.tiny else Budget(), seed=args.seed)
    b = replace(b, steps=args.steps) if args.steps else b
    train_files, held_out = stdlib_files()
    if args.tiny:
        train_files, held_out = train_files[:10], held_out[:2]
    names = args.models.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp)
        tokenizer = train_tokenizer(train_files, b.vocab_size)
        save_tokenizer(tokenizer, tokenizer_dir, b.max_positions)
        stream = token_stream(tokenizer, train_files)
        windows = token_windows(tokenizer_dir / "tokenizer.json", held_out, b.context)[: b.eval_windows]
        if args.minutes:
            b = replace(b, steps=steps_for(args.minutes, stream, b, names))
        print(f"{len(train_files)} training files, {len(stream)} tokens; {len(held_out)} held-out files, "
              f"{len(windows)} windows; {b.steps} steps of {b.batch}x{b.context} tokens", flush=True)
        args_given = argv if argv is not None else sys.argv[1:]
        context = {"command": " ".join(["python -m moe_onnx.reference.train", *args_given]),
                   "threads": args.threads, "versions": _versions(), **split_record(train_files, held_out)}
        for name in names:
            run_model(name, stream, windows, b, args.out, tokenizer_dir, context)


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


if __name__ == "__main__":
    main()
