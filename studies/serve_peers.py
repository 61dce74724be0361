"""The servers that ``python -m studies.serve_load --checkpoint`` runs side by side, the
checkpoint of its table, and a watch on the machine's other work.

- :func:`our_server`: ``moe-onnx serve`` of an export, ``--max-batch`` slots, its defaults otherwise;
- :func:`llama_server`: llama.cpp's ``llama-server`` of a GGUF, ``-np`` slots of the model's
  context each, continuous batching and its prompt cache at their defaults, :class:`LlamaConfig`;
- :func:`write_checkpoint`: the random-weight Mixtral of BENCHMARKS.md's serving table;
- :class:`CpuWatch`: CPU time the machine spent outside this process and its servers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from studies import serve_http

REFERENCE = Path(__file__).resolve().parents[1] / "reference_models" / "moe"
# BENCHMARKS.md's serving model: Mixtral-shaped, 331 M parameters (int4 export 210 MB, Q4_0 GGUF
# 190 MB), random weights (torch seed 0), the shipped reference MoE's tokenizer (vocabulary 4096)
SERVE_MODEL = dict(vocab_size=4096, hidden_size=1024, intermediate_size=1536, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                   max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                   pad_token_id=0)


def write_checkpoint(out: Path) -> Path:
    """:data:`SERVE_MODEL` as a transformers checkpoint in ``out`` with the reference tokenizer."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**SERVE_MODEL)).eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(REFERENCE / name, out / name)
    return out


@dataclass(frozen=True)
class LlamaConfig:
    """What llama-server is started with beside the model, slots and context."""

    flash_attn: str = "off"
    threads: int = 2
    threads_batch: int = 2
    batch: int = 2048
    ubatch: int = 512

    def args(self) -> list[str]:
        return ["-fa", self.flash_attn, "-t", str(self.threads), "-tb", str(self.threads_batch),
                "-b", str(self.batch), "-ub", str(self.ubatch)]

    def label(self) -> str:
        return " ".join(self.args())


# tried by --llama-tune: flash attention off and on at the default batch sizes, smaller logical and
# physical batches (how many prompt tokens one step may take beside the decoding slots), and one
# generation thread (the HTTP threads and the clients share the same cores)
CANDIDATES = (LlamaConfig("off"), LlamaConfig("on"), LlamaConfig("off", batch=256, ubatch=256),
              LlamaConfig("on", batch=256, ubatch=256), LlamaConfig("off", ubatch=128),
              LlamaConfig("off", threads=1))


def llama_server_binary(tree: str | Path) -> Path:
    from moe_onnx.benchmarks.llama_cpp import LlamaCpp

    binary = LlamaCpp.locate(tree).tree / "build" / "bin" / "llama-server"
    if not binary.is_file():
        raise SystemExit(f"{binary}: not built (LLAMA_CPP_EXTRA_TARGETS=llama-server "
                         "scripts/build_llama_cpp.sh builds it)")
    return binary


def llama_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True).stderr
    found = re.search(r"version: (.*)", out)
    return found.group(1).strip() if found else out.strip()[-200:]


@contextmanager
def llama_server(binary: Path, gguf: Path, slots: int, context: int, config: LlamaConfig, log: Path):
    """llama-server on a free loopback port: ``slots`` parallel slots of ``context`` positions
    each (continuous batching and the prompt cache at their defaults); yields its url."""
    port = serve_http.free_port()
    command = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
               "-c", str(slots * context), *config.args()]
    with open(log, "a") as f, serve_http.serving(command, port, "llama-server", log=f) as (url, _):
        yield url


@contextmanager
def our_server(export: Path, slots: int, threads: int, log: Path):
    """``moe-onnx serve`` of ``export`` with ``--max-batch slots`` (its defaults otherwise: continuous
    batching, 256-token prefill chunks, the prefix cache); yields its url."""
    port = serve_http.free_port()
    command = [sys.executable, "-m", "moe_onnx.cli", "serve", export, "--port", str(port),
               "--provider", "cpu", "--threads", str(threads), "--max-batch", str(slots),
               "--max-queue", "256"]
    with open(log, "a") as f, serve_http.serving(command, port, "moe-onnx serve", log=f) as (url, _):
        yield url


class CpuWatch:
    """CPU seconds the whole machine was busy (``/proc/stat``) minus those of this process and
    the servers it started (their process trees): other work that shared the cores during a run."""

    def __init__(self):
        self.start = self._busy(), self._ours()

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks[:3] + ticks[5:7]) / os.sysconf("SC_CLK_TCK")  # user to softirq, no idle/iowait

    @staticmethod
    def _ours() -> float:
        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    def other(self) -> float:
        return round((self._busy() - self.start[0]) - (self._ours() - self.start[1]), 1)
