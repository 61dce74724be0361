"""Peak memory of exporting a large checkpoint: streaming must never hold the model twice.

Writes a random Mixtral-shaped fp32 checkpoint of about ``--gb`` GB in hub layout (sharded
safetensors, per-expert tensors), then runs ``moe-onnx export`` on it in a child process under
``/usr/bin/time -v`` and compares the peak resident set with 0.5 x checkpoint size + 400 MB.

    python -m studies.export_memory [--gb 2.3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_checkpoint(path: Path, gb: float, seed: int = 0, tiny: bool = False) -> int:
    """A random Mixtral checkpoint of ~gb GB, one shard per layer; returns its size in bytes.
    ``tiny``: hidden 64, expert width 128, vocabulary 512 (a smoke test)."""
    from safetensors.numpy import save_file

    H, F, E, V = (64, 128, 8, 512) if tiny else (1024, 3584, 8, 8192)
    per_layer = 4 * (E * 3 * H * F + 4 * H * H + 2 * H + E * H)
    layers = max(1, round((gb * 1e9 - 8 * V * H) / per_layer))
    config = dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=V, hidden_size=H,
        intermediate_size=F, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
        num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=1e6, tie_word_embeddings=False,
    )
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    weight_map = {}
    embed = {
        "model.embed_tokens.weight": rand(V, H),
        "lm_head.weight": rand(V, H),
        "model.norm.weight": np.ones(H, np.float32),
    }
    shards = [("model-embed.safetensors", embed)]
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + f"self_attn.{x}_proj.weight": rand(H, H) for x in "qkvo"}
        t[p + "input_layernorm.weight"] = np.ones(H, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(H, np.float32)
        t[p + "block_sparse_moe.gate.weight"] = rand(E, H)
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "w1.weight"], t[q + "w3.weight"], t[q + "w2.weight"] = rand(F, H), rand(F, H), rand(H, F)
        shards.append((f"model-{i:05d}.safetensors", t))
    for name, tensors in shards:
        save_file(tensors, str(path / name))
        weight_map.update({k: name for k in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_one_token(out: Path) -> tuple:
    """Load the >2 GB export in the runtime and run one token (proves the external data works)."""
    import moe_onnx.runtime as rt

    logits = rt.load(out, provider="cpu").forward([[1]])[0]
    assert np.isfinite(logits).all()
    return logits.shape


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.3)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="hidden 64, expert width 128 (a smoke test)")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moe-onnx-mem-"))
    try:
        size = write_checkpoint(work / "src", args.gb, tiny=args.tiny)
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "moe_onnx.cli",
               "export", str(work / "src"), "-o", str(work / "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"export failed:\n{proc.stderr[-3000:]}")
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", proc.stderr).group(1)
        out_size = sum(f.stat().st_size for f in (work / "out").iterdir())
        budget = 0.5 * size + 400e6
        print(f"checkpoint {size / 1e9:.2f} GB (fp32 safetensors, sharded) -> "
              f"export {out_size / 1e9:.2f} GB in {wall}")
        print(f"peak RSS {peak_kb * 1024 / 1e6:.0f} MB; budget 0.5 x size + 400 MB = {budget / 1e6:.0f} MB; "
              f"{'within' if peak_kb * 1024 <= budget else 'OVER'} budget")
        print(f"onnxruntime runs the export: logits {run_one_token(work / 'out')}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
