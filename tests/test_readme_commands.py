"""README's ``moe-onnx`` commands parse with the real CLI, and the ``--text-files`` syntax they use.

Also: every ``python -m MODULE`` that README or BENCHMARKS.md names can be found (the study scripts
live in the top-level ``studies`` package, run from a checkout), and every link to a section of
either file points at a heading that exists.

Commands are read from README's fenced code blocks: a line starting ``moe-onnx`` (or ``$ moe-onnx``),
or a ``&&`` chain holding one, with ``\\`` continuations joined and ``# comments`` dropped. A
synopsis marks optional parts ``[--flag VALUE]`` and alternatives ``a|b``: it is checked without
its optional parts, with all of them, and once per alternative (an optional positional such as
``[OUT ...]`` is left out). ``$(...)`` stands for one file. Only parsing runs (``make_context``), so
paths such as out/demo/moe need not exist; a command the CLI would reject fails here.
"""

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from moe_onnx.cli import main
from moe_onnx.reference import default_models_dir
from moe_onnx.reference.corpus import files_digest, stdlib_files

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = (README, ROOT / "BENCHMARKS.md")


def _substitutions(line: str) -> list[tuple[int, int]]:
    """Spans of the ``$(...)`` command substitutions in ``line`` (nested parentheses counted)."""
    spans, start = [], line.find("$(")
    while start >= 0:
        depth, end = 0, start + 1
        for end in range(start + 1, len(line)):
            depth += {"(": 1, ")": -1}.get(line[end], 0)
            if depth == 0:
                break
        spans.append((start, end + 1))
        start = line.find("$(", end + 1)
    return spans


def readme_commands(text: str) -> list[str]:
    """Every ``moe-onnx ...`` command line in the fenced code blocks of ``text``."""
    lines, in_block, pending = [], False, ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        # split `a && b ; c | d` into commands, leaving the inside of each $(...) alone
        subs, masked = [line[a:b] for a, b in _substitutions(line)], line
        for i, sub in enumerate(subs):
            masked = masked.replace(sub, f"\0{i}\0", 1)
        for segment in re.split(r"\s(?:&&|;|\|)\s", masked.removeprefix("$ ")):
            segment = re.sub(r"\0(\d+)\0", lambda m, subs=subs: subs[int(m.group(1))], segment).strip()
            if segment.startswith("moe-onnx "):
                lines.append(segment)
    return lines


def variants(command: str) -> list[list[str]]:
    """The argument lists (after ``moe-onnx``) that one README command or synopsis stands for."""
    for start, end in reversed(_substitutions(command)):
        command = command[:start] + "held_out.py" + command[end:]
    tokens = shlex.split(command, comments=True)[1:]
    parts: list[tuple[bool, list[str]]] = []  # (optional, tokens)
    group = None
    for tok in tokens:
        if group is None and tok.startswith("["):
            group, tok = [], tok[1:]
        if group is None:
            parts.append((False, [tok]))
            continue
        closed = tok.endswith("]")
        group.append(tok.removesuffix("]"))
        if closed:
            if group[0].startswith("-"):  # an optional positional ([OUT ...]) is left out
                parts.append((True, group))
            group = None
    assert group is None, f"unclosed [ in {command!r}"
    choices = max([len(t.split("|")) for _, g in parts for t in g if not t.startswith("-")] + [1])

    def pick(tok: str, i: int) -> str:
        alternatives = tok.split("|") if not tok.startswith("-") else [tok]
        return alternatives[min(i, len(alternatives) - 1)]

    out = [[pick(t, 0) for optional, g in parts if not optional for t in g]]
    out += [[pick(t, i) for _, g in parts for t in g] for i in range(choices)]
    return [list(v) for v in dict.fromkeys(tuple(v) for v in out)]


def parse(args: list[str]) -> click.Context:
    """Parse ``moe-onnx ARGS`` down to the subcommand, as the CLI would, without running it."""
    parent = click.Context(main, info_name="moe-onnx")
    name, cmd, rest = main.resolve_command(parent, list(args))
    assert cmd is not None, f"unknown command {args[0]!r}"
    return cmd.make_context(name, rest, parent=parent)


COMMANDS = readme_commands(README.read_text())


def test_readme_commands_are_found():
    assert {c.split()[1] for c in COMMANDS} >= {"demo", "export", "inspect", "eval", "run", "bench"}
    assert any(len(variants(c)) > 2 for c in COMMANDS)  # the export synopsis: fp32|fp16|bf16 ...


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    for args in variants(command):
        try:
            parse(args)
        except click.ClickException as err:
            pytest.fail(f"README: `{command}`\n  as `moe-onnx {shlex.join(args)}`: {err.format_message()}")


def test_the_checker_rejects_what_the_cli_rejects():
    with pytest.raises(click.UsageError, match="No such option"):
        parse(["eval", "out", "--text-files", "a.py", "--no-such-flag"])
    with pytest.raises(click.BadParameter):
        parse(["export", "src", "-o", "out", "--dtype", "fp64"])
    with pytest.raises(click.MissingParameter):
        parse(["eval", "out"])
    assert variants("moe-onnx export SRC -o OUT [--dtype fp32|fp16] [--force]") == [
        ["export", "SRC", "-o", "OUT"],
        ["export", "SRC", "-o", "OUT", "--dtype", "fp32", "--force"],
        ["export", "SRC", "-o", "OUT", "--dtype", "fp16", "--force"],
    ]
    assert variants("moe-onnx bench [OUT ...] [--batch 1]") == [["bench"], ["bench", "--batch", "1"]]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_modules_exist(doc, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # studies/ is run from a checkout, not installed
    # a placeholder such as studies.NAME is not a module
    modules = set(re.findall(r"python -m\s+([a-z_][a-z0-9_.]*)\b(?!\.?[A-Z])", doc.read_text()))
    assert modules, f"{doc.name} names no `python -m` module"
    missing = sorted(m for m in modules if m != "pytest" and importlib.util.find_spec(m) is None)
    assert not missing, f"{doc.name} names modules that do not exist: {missing}"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    anchors, in_block = set(), False
    for line in doc.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block and re.match(r"#{1,6} ", line):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_section_links_resolve(doc):
    targets = {None: _anchors(doc)} | {d.name: _anchors(d) for d in DOCS}
    links = re.finditer(r"\]\(([\w.]+\.md)?#([^)]+)\)", doc.read_text())
    broken = [m.group(0) for m in links if m.group(2) not in targets[m.group(1)]]
    assert not broken, f"{doc.name}: links to no heading: {broken}"


def test_readme_held_out_list_is_the_recorded_one():
    """README's routing command lists the held-out files with a ``$(python -c ...)``: run it."""
    snippets = [c[s + 2 : e - 1] for c in COMMANDS for s, e in _substitutions(c)]
    assert snippets, "README's routing command should list the held-out files with $(python -c ...)"
    record = json.loads((default_models_dir() / "moe" / "training.json").read_text())
    held_out = stdlib_files()[1]
    if files_digest(held_out) != record["heldout_files_digest"]:
        pytest.skip(f"the held-out text is the running Python's standard library "
                    f"({sys.version.split()[0]} here, {record['versions']['python']} when recorded): "
                    f"its files differ, the recorded hashes tell")
    for snippet in snippets:
        argv = shlex.split(snippet)
        assert argv[:2] == ["python", "-c"], snippet
        done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, check=True)
        listed = done.stdout.split()
        assert [Path(f).name for f in listed] == record["heldout_files"]


# ---- the --text-files syntax of `eval` and `inspect --routing` ----


@pytest.fixture
def captured(monkeypatch):
    """The files `eval` / `inspect --routing` would score, without running a model."""
    import moe_onnx.evaluation as evaluation

    seen = []
    monkeypatch.setattr(evaluation, "evaluate", lambda out, files, **kw: seen.append(list(files)) or "report")
    monkeypatch.setattr(evaluation, "format_report", lambda report: "formatted")
    return seen


@pytest.fixture
def texts(tmp_path):
    for name in ("a.py", "b.py", "c.txt", "sub/d.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    return tmp_path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_several_text_files_after_one_flag(captured, texts):
    a, b, c = texts / "a.py", texts / "b.py", texts / "c.txt"
    for args in (["--text-files", a, b, c],
                 ["--text-files", a, "--text-files", b, "--text-files", c],
                 ["--text-files", a, "--text-files", b, c],
                 ["--window", 8, "--text-files", a, b, c, "--routing"]):
        result = run("eval", "out", *args)
        assert result.exit_code == 0, result.output
        assert captured.pop() == [str(a), str(b), str(c)], args


def test_text_file_globs_are_expanded_sorted(captured, texts):
    result = run("eval", "out", "--text-files", texts / "*.py", texts / "c.txt")
    assert result.exit_code == 0, result.output
    assert captured.pop() == [str(texts / "a.py"), str(texts / "b.py"), str(texts / "c.txt")]
    result = run("eval", "out", "--text-files", texts / "**" / "*.py")
    assert result.exit_code == 0, result.output
    assert captured.pop() == [str(texts / n) for n in ("a.py", "b.py", "sub/d.py")]


def test_bad_text_files_are_clear_errors(captured, texts):
    result = run("eval", "out", "--text-files", texts / "a.py", texts / "*.rs")
    assert result.exit_code == 2 and "matches no file" in result.output and "*.rs" in result.output
    result = run("eval", "out", "--text-files", texts / "missing.py")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = run("eval", "out", "--text-files", texts / "sub")
    assert result.exit_code == 2 and "is not a file" in result.output
    result = run("eval", "out", "--text-files")
    assert result.exit_code == 2 and "requires an argument" in result.output
    result = run("eval", "out", texts, "--text-files", texts / "a.py")  # a second export is no text file
    assert result.exit_code == 2 and "is not a file" in result.output
    assert captured == []


def test_inspect_routing_takes_several_text_files(captured, texts, monkeypatch):
    import moe_onnx.exporter.describe as describe

    monkeypatch.setattr(describe, "describe", lambda out: "description")
    result = run("inspect", "out", "--routing", "--text-files", texts / "a.py", texts / "b.py")
    assert result.exit_code == 0, result.output
    assert captured.pop() == [str(texts / "a.py"), str(texts / "b.py")]
    result = run("inspect", "out", "--routing")
    assert result.exit_code == 2 and "--routing needs --text-files" in result.output
    result = run("inspect", "out", texts / "a.py")
    assert result.exit_code == 2 and "text files go after --text-files" in result.output
