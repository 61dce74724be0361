"""llama.cpp as a peer: the same checkpoint converted to GGUF, timed by ``llama-bench``.

llama.cpp is built from source by ``scripts/build_llama_cpp.sh`` (the tree vendored in the
llama-cpp-python sdist); ``moe-onnx bench --llama-cpp DIR`` points here. Per weight format:

- ``f32``: ``convert_hf_to_gguf.py CHECKPOINT --outtype f32``;
- ``q8_0`` / ``q4_0``: ``llama-quantize`` of that f32 GGUF with its default rules for the type
  (what a llama.cpp user does; the tensors it keeps at other types are listed in the note).

A measurement is one ``llama-bench`` process (``-o json``) that loads the GGUF, runs its own
warm-up, then ``reps`` repetitions, each a sample:

- prefill of N tokens: ``-p N -n 0``, a sample is the whole N-token forward on an empty cache;
- decode at context C: ``-p 0 -n 1 -d C``, a sample is one generated token after C tokens of
  context (llama-bench builds the context once, untimed, and restores it before every repetition,
  so every sample sees exactly C tokens, as the bench's own decode steps do).

The tokens are llama-bench's random ones, not the bench's prompts (the time does not depend on
them). The checkpoint needs a tokenizer for the converter; the bench's random-weight models have
none, so :func:`write_stub_tokenizer` writes a byte-level BPE of the model's vocabulary size, and
the converter is told its pre-tokenizer is GPT-2's (it only recognises known tokenizers by hash).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from moe_onnx import dtypes
from moe_onnx.errors import MoeOnnxError

LLAMA_CPP = "llama.cpp"  # the impl label of the peer
SKIPPED = "llama.cpp peer skipped: run scripts/build_llama_cpp.sh and pass --llama-cpp DIR"
F32 = "f32"

# Runs convert_hf_to_gguf.py from the vendored tree with one change: the pre-tokenizer of the stub
# tokenizer (unknown to the converter's list of hashes) is declared to be GPT-2's, which it is.
_CONVERT = """
import runpy, sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [tree + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def gguf_type(weights: str) -> str:
    """The llama.cpp type for one of the bench's weight formats: fp32 -> f32, int8 -> q8_0, int4 -> q4_0."""
    row = dtypes.get(weights, "weight")
    if row.compute:
        if row.bits != 32:
            raise MoeOnnxError(f"no llama.cpp counterpart for {weights} weights in this bench "
                               "(f32, q8_0, q4_0)")
        return F32
    return f"q{row.bits}_0"


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp tree with its built tools."""

    tree: Path
    bench: Path
    quantize: Path

    @classmethod
    def locate(cls, path) -> LlamaCpp:
        """The tree in ``path``: the directory ``build_llama_cpp.sh`` printed, its ``build``
        or ``build/bin``, or the script's cache directory."""
        given = Path(path).expanduser().resolve()
        for tree in (given, given.parent, given.parent.parent, given / "src" / "vendor" / "llama.cpp"):
            bench, quantize = (tree / "build" / "bin" / name for name in ("llama-bench", "llama-quantize"))
            if bench.is_file() and quantize.is_file() and (tree / "convert_hf_to_gguf.py").is_file():
                return cls(tree, bench, quantize)
        raise MoeOnnxError(f"--llama-cpp {path}: no llama.cpp build there (build/bin/llama-bench, "
                           "build/bin/llama-quantize, convert_hf_to_gguf.py); run scripts/build_llama_cpp.sh "
                           "and pass the directory it prints")


def _peak_rss_mb(pid: int) -> float:
    """The process's peak RSS so far (``VmHWM``, reset by exec; 0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0)
    except (OSError, ValueError):
        return 0.0


def _run(cmd: list, what: str, watch_memory: bool = False) -> tuple[str, float]:
    """Run ``cmd``; ``(stdout, its peak RSS in MB)``, the RSS read every 10 ms while it runs when
    ``watch_memory`` (0 otherwise: the polling would take CPU from a timed run). A failure raises
    RuntimeError with the tail of its output.

    (The rusage of a child is no good here: its maximum RSS counts the parent's, inherited at fork.)
    """
    peak = 0.0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err)
        while watch_memory and proc.poll() is None:
            peak = max(peak, _peak_rss_mb(proc.pid))
            time.sleep(0.01)
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = (stderr.strip() or stdout.strip())[-600:]
        raise RuntimeError(f"{what} failed (exit status {proc.returncode}): {tail}")
    return stdout, peak


def write_stub_tokenizer(checkpoint: Path, vocab_size: int) -> None:
    """A byte-level BPE ``tokenizer.json`` of exactly ``vocab_size`` tokens (byte symbols, then
    synthesized merges of pairs of them), and a ``tokenizer_config.json`` without BOS/EOS.

    Enough for ``convert_hf_to_gguf.py`` to write a GPT-2 style vocabulary of the model's size.
    """
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())[:max(1, min(256, vocab_size // 2))]
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = []
    for a in symbols:
        for b in symbols:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
         "model_max_length": 1 << 20}))


def save_checkpoint(model, path: Path) -> Path:
    """``model.save_pretrained(path)`` (safetensors) plus the stub tokenizer."""
    model.save_pretrained(path)
    write_stub_tokenizer(path, model.config.vocab_size)
    return path


def convert(llama: LlamaCpp, checkpoint: Path, out_dir: Path, weights: str, source: str = F32) -> Path:
    """``out_dir/<checkpoint name>-<type>.gguf`` for one of the bench's weight formats (the
    ``source`` GGUF, f32 or a bf16 checkpoint's own bf16, is converted once and quantized from)."""
    kind = gguf_type(weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = out_dir / f"{checkpoint.name}-{source}.gguf"
    out = out_dir / f"{checkpoint.name}-{kind}.gguf"
    if out.is_file():  # converted before (the same checkpoint: the caller's folder says so)
        return out
    if not full.is_file():
        _run([sys.executable, "-c", _CONVERT, llama.tree, checkpoint, "--outtype", source, "--outfile", full],
             f"convert_hf_to_gguf.py {checkpoint.name}")
    if kind == source:
        return full
    _run([llama.quantize, full, out, kind.upper()], f"llama-quantize {full.name} {kind.upper()}")
    return out


def gguf_summary(path: Path, tree: Path, top_k: int | None = None) -> dict:
    """What the GGUF holds (read with the tree's gguf-py): tensor count, tensors per type, bytes,
    and the weight bytes a decode step reads (one embedding row, k/E of every expert tensor, the
    rest whole; the counterpart of the export manifest's ``bytes_per_token``)."""
    sys.path.insert(0, str(tree / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.remove(str(tree / "gguf-py"))
    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    total = per_token = 0.0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        nbytes = float(t.n_bytes)
        total += nbytes
        shape = [int(x) for x in t.shape]  # ggml order: innermost first
        if t.name == "token_embd.weight":
            per_token += nbytes / shape[-1]
        elif "_exps." in t.name and top_k:
            per_token += nbytes * top_k / shape[-1]
        else:
            per_token += nbytes
    return {"tensors": len(reader.tensors), "types": types, "bytes": total, "bytes_per_token": per_token,
            "shapes": {t.name: [int(x) for x in t.shape] for t in reader.tensors}}


def parse_bench_json(text: str) -> list[dict]:
    """llama-bench's ``-o json`` output: one dict per test, with ``samples_s`` (seconds) added."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as err:
        raise RuntimeError(f"llama-bench printed no JSON ({err}): {text[-300:]!r}") from None
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "samples_ns" in t for t in tests):
        raise RuntimeError(f"unexpected llama-bench JSON: {text[:300]!r}")
    return [{**t, "samples_s": [ns / 1e9 for ns in t["samples_ns"]]} for t in tests]


def bench_args(gguf_path: Path, threads: int, phase: str, length: int, reps: int,
               flash_attn: str | None = None) -> list[str]:
    """llama-bench's arguments for ``reps`` samples of one prefill of ``length`` tokens, or of one
    decode token at context ``length``; ``flash_attn`` (``0``, ``1``, ``0,1``) or its default
    (auto), and its defaults for the rest."""
    test = ["-p", str(length), "-n", "0"] if phase == "prefill" else ["-p", "0", "-n", "1", "-d", str(length)]
    fa = ["-fa", flash_attn] if flash_attn is not None else []
    return ["-m", str(gguf_path), "-t", str(threads), *test, *fa, "-r", str(reps), "-o", "json"]


PROBE_REPS = 5  # samples per flash-attention setting when choosing one


def faster_flash_attn(tests: list[dict]) -> str:
    """The ``flash_attn`` setting (``"0"``/``"1"``) whose samples have the lower median, from the
    parsed tests of one ``-fa 0,1`` run."""
    import numpy as np

    by_setting = {str(int(t["flash_attn"])): float(np.median(t["samples_s"])) for t in tests}
    if set(by_setting) != {"0", "1"}:
        raise RuntimeError(f"llama-bench -fa 0,1 reported settings {sorted(by_setting)}")
    return min(by_setting, key=by_setting.get)


class LlamaBenchRunner:
    """One GGUF timed by llama-bench; the Runner interface of the suite, plus :meth:`samples`.

    ``prefill``/``decode_step`` run one process for one sample (used while warming); the suite's
    timed units call :meth:`samples` once per round for all of that round's samples.

    llama.cpp in its best configuration: flash attention is set per phase and length to whichever
    of off and on a probe (``-fa 0,1``, :data:`PROBE_REPS` samples each) found faster, the first
    time that phase and length runs. Its default (auto) turns it on, which on a 2-core Sapphire
    Rapids (2026-12-04) made a Q4_0 decode step at context 2,000 2.3x slower than off.
    """

    def __init__(self, llama: LlamaCpp, gguf_path: Path, threads: int):
        self.llama, self.gguf, self.threads = llama, gguf_path, threads
        self.memory: dict[str, float] = {}  # peak RSS of the llama-bench process, MB
        self.settings: dict = {}  # what llama-bench reports it ran with (first run)
        self.flash_attn: dict[str, str] = {}  # "decode@2000" -> "0" | "1", as probed
        self.summary: dict | None = None  # the GGUF's gguf_summary, for the variant's note

    def _flash_attn(self, phase: str, length: int) -> str:
        key = f"{phase}@{length}"
        if key not in self.flash_attn:
            cmd = [self.llama.bench, *bench_args(self.gguf, self.threads, phase, length, PROBE_REPS, "0,1")]
            stdout, _ = _run(cmd, f"llama-bench {phase} {length} -fa 0,1")
            self.flash_attn[key] = faster_flash_attn(parse_bench_json(stdout))
        return self.flash_attn[key]

    def note(self) -> str:
        """The variant's note: what :func:`describe` says of this GGUF and run, and where its memory
        figure comes from."""
        return (describe(self.llama, self.summary, self.settings, self.flash_attn)
                + "; memory: llama-bench's peak RSS")

    def samples(self, phase: str, length: int, reps: int, watch_memory: bool = False) -> list[float]:
        """``reps`` samples in seconds, from one llama-bench process."""
        fa = self._flash_attn(phase, length)
        cmd = [self.llama.bench, *bench_args(self.gguf, self.threads, phase, length, reps, fa)]
        stdout, peak_mb = _run(cmd, f"llama-bench {phase} {length}", watch_memory)
        tests = parse_bench_json(stdout)
        self.memory["peak_rss_mb"] = max(self.memory.get("peak_rss_mb", 0.0), peak_mb)
        if not self.settings and tests:
            keys = ("build_commit", "build_number", "cpu_info", "backends", "n_threads", "n_batch",
                    "n_ubatch", "type_k", "type_v", "flash_attn", "repack", "load_mode", "model_type")
            self.settings = {k: tests[0].get(k) for k in keys}
        return [s for t in tests for s in t["samples_s"]]

    def prefill(self, ids) -> float:
        return self.samples("prefill", ids.shape[1], 1, watch_memory=True)[0]

    def prepare_decode(self, context_ids) -> None:
        self.samples("decode", context_ids.shape[1], 1, watch_memory=True)  # checks this context runs

    def decode_step(self, context: int, token) -> float:
        return self.samples("decode", context, 1)[0]


class RoundSamples:
    """A unit's ``run``: the first call of a round runs one llama-bench process for the round's
    untimed run and its ``reps`` timed ones (``reps + 1`` repetitions); later calls hand them out."""

    def __init__(self, runner: LlamaBenchRunner, phase: str, length: int, reps: int):
        self.runner, self.phase, self.length, self.reps = runner, phase, length, reps
        self.queue: list[float] = []

    def __call__(self) -> float:
        if not self.queue:
            self.queue = self.runner.samples(self.phase, self.length, self.reps + 1)
            if len(self.queue) != self.reps + 1:
                raise RuntimeError(f"llama-bench gave {len(self.queue)} samples, {self.reps + 1} asked for")
        return self.queue.pop(0)


def describe(llama: LlamaCpp, summary: dict, settings: dict | None = None,
             flash_attn: dict | None = None) -> str:
    """The variant's note: build, GGUF types, and what llama-bench ran with (``flash_attn``: the
    probed setting per phase and length)."""
    types = ", ".join(f"{n} {k.lower()}" for k, n in sorted(summary["types"].items(), key=lambda kv: -kv[1]))
    note = f"llama-bench, GGUF {summary['tensors']} tensors ({types}), {summary['bytes'] / 1e6:.0f} MB"
    if settings:
        note += (f"; build {settings.get('build_commit')} ({settings.get('build_number')}), "
                 f"{settings.get('backends')}, flash_attn "
                 f"{_choices(flash_attn) if flash_attn else settings.get('flash_attn')}, "
                 f"KV {settings.get('type_k')}/{settings.get('type_v')}, repack {settings.get('repack')}, "
                 f"n_ubatch {settings.get('n_ubatch')}; random tokens")
    return note


def _choices(flash_attn: dict) -> str:
    """``probed: decode@128 off, decode@2000 off, prefill@256 on``."""
    return "probed: " + ", ".join(f"{k} {'on' if v == '1' else 'off'}" for k, v in sorted(flash_attn.items()))


def format_ratios(ratios: list[dict]) -> str:
    """The report's llama.cpp block: its time over ours per phase and length (empty without it)."""
    if not ratios:
        return ""
    lines = ["llama.cpp vs ours: llama.cpp time / our time, same model and weight format; median over rounds "
             "of the per-round ratio [lowest .. highest round], ratio of minimums (> 1: ours is faster)"]
    for r in ratios:
        spread = f"[{r['low']:.2f} .. {r['high']:.2f}]"
        ours = r["ours"].split("/", 1)[1].rsplit("@", 1)[0]  # coarse-moe/dispatch/int4@cpu -> dispatch/int4
        what = f"{r['phase']}@{r['length']}: llama.cpp/{r['weights']} / {ours}"
        lines.append(f"  {r['model']:11s} {what:48s} {r['value']:6.2f} {spread:16s} min {r['at_min']:6.2f}")
    return "\n".join(lines)
