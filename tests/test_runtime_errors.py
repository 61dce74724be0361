"""Bad exports, bad inputs and the ``run`` command: clear errors, never a crash or a traceback."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from models import make_model

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx.cli import main
from moe_onnx.errors import MoeOnnxError


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = make_model("llama", num_hidden_layers=2, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return moe_onnx.export(model, tmp_path_factory.mktemp("errors") / "llama")


@pytest.fixture()
def copy(llama, tmp_path):
    def make():
        return shutil.copytree(llama, tmp_path / "copy")
    return make


def _edit_manifest(out, **changes):
    manifest = json.loads((out / "moe_onnx.json").read_text())
    manifest.update(changes)
    (out / "moe_onnx.json").write_text(json.dumps(manifest))


def test_damaged_exports(copy, tmp_path):
    out = copy()
    (out / "model.onnx_data").write_bytes((out / "model.onnx_data").read_bytes()[:1000])
    with pytest.raises(MoeOnnxError, match="cannot load .*re-export"):
        rt.load(out, provider="cpu")
    (out / "model.onnx").unlink()
    with pytest.raises(MoeOnnxError, match="model.onnx is missing"):
        rt.load(out, provider="cpu")
    (out / "moe_onnx.json").write_text("{not json")
    with pytest.raises(MoeOnnxError, match="not a valid moe-onnx manifest"):
        rt.load(out, provider="cpu")
    with pytest.raises(MoeOnnxError, match="not a directory"):
        rt.load(out / "config.json", provider="cpu")


def test_manifest_that_disagrees_with_the_graph(copy):
    out = copy()
    manifest = json.loads((out / "moe_onnx.json").read_text())
    _edit_manifest(out, spec={**manifest["spec"], "num_layers": 5})
    with pytest.raises(MoeOnnxError, match="does not follow the moe-onnx decoder contract"):
        rt.load(out, provider="cpu")


def test_bf16_export_on_cpu_is_a_clear_error(copy):
    out = copy()
    _edit_manifest(out, dtype="bf16")
    if rt.providers.cuda_usable():
        pytest.skip("CUDA would run a bf16 export")
    with pytest.raises(MoeOnnxError, match="bf16 export, which needs the CUDA provider"):
        rt.load(out, provider="auto")


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=[[1, -2]]), "outside the vocabulary"),
    (dict(input_ids=[[1, 2]], attention_mask=[[1, 1, 1]]), "attention_mask must be integer"),
    (dict(input_ids=[[1, 2]], position_ids=[[0]]), "position_ids must be integer"),
    (dict(input_ids=[[1, 2]], position_ids=[[0, 256]]), "outside the model's 256 positions"),
    (dict(input_ids=np.zeros((1, 0), np.int64)), "empty"),
])
def test_bad_forward_inputs(llama, kwargs, message):
    with pytest.raises(MoeOnnxError, match=message):
        rt.load(llama, provider="cpu").forward(**kwargs)


def test_cache_of_another_batch(llama):
    session = rt.load(llama, provider="cpu")
    _, cache = session.forward([[1, 2, 3]])
    with pytest.raises(MoeOnnxError, match="the cache holds 1 rows"):
        session.forward([[4], [5]], cache=cache)


@pytest.mark.parametrize("prompt, kwargs, message", [
    ("hello", {}, "no tokenizer.json"),
    ([[1, 2], []], {}, "empty"),
    ([1, 2], dict(max_new_tokens=0), "at least 1"),
    ([1, 2], dict(temperature=-1.0), "temperature >= 0"),
    ([1.5, 2], {}, "list of int token ids"),
])
def test_bad_generate_arguments(llama, prompt, kwargs, message):
    with pytest.raises(MoeOnnxError, match=message):
        rt.load(llama, provider="cpu").generate(prompt, **kwargs)


def test_auto_provider_logs_one_line_and_nothing_else(llama):
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
            "import moe_onnx.runtime as rt; rt.load(sys.argv[1], provider='auto')")
    done = subprocess.run([sys.executable, "-c", code, str(llama)],
                          capture_output=True, text=True, check=True)
    assert done.stderr.strip() in ("moe-onnx runtime: using CPU", "moe-onnx runtime: using CUDA"), done.stderr
    assert done.stdout == ""


def test_cli_ids_as_json(llama):
    cli = CliRunner().invoke(main, ["run", str(llama), "--ids", "5,17,33", "--max-new-tokens", "6",
                                    "--provider", "cpu", "--json"])
    assert cli.exit_code == 0, cli.output
    expected = rt.load(llama, provider="cpu").generate([5, 17, 33], max_new_tokens=6).ids[0]
    assert json.loads(cli.stdout)["ids"] == expected
    assert "prefill 3 tokens" in cli.stderr and "tok/s" in cli.stderr


def test_cli_streams_ids_without_a_tokenizer(llama):
    cli = CliRunner().invoke(main, ["run", str(llama), "--ids", "5,17,33", "--max-new-tokens", "4"])
    assert cli.exit_code == 0, cli.output
    assert len(cli.stdout.split()) == 4


@pytest.mark.parametrize("args, message", [
    (["--ids", "1,x"], "--ids must be comma-separated integers"),
    (["--ids", "1", "--prompt", "a"], "exactly one of --prompt or --ids"),
    (["--ids", "100000"], "outside the vocabulary"),
    (["--prompt", "hi"], "no tokenizer.json"),
])
def test_cli_errors_are_one_line(llama, args, message):
    cli = CliRunner().invoke(main, ["run", str(llama), "--provider", "cpu", *args])
    assert cli.exit_code == 2
    assert message in cli.stderr and "Traceback" not in cli.output
    assert len(cli.stderr.strip().splitlines()) == 1


def test_cli_on_a_folder_that_is_not_an_export(tmp_path):
    cli = CliRunner().invoke(main, ["run", str(tmp_path), "--ids", "1"])
    assert cli.exit_code == 2
    assert cli.stderr.strip() == f"error: {tmp_path} is not a moe-onnx export (no moe_onnx.json)"


def test_cli_cuda_without_a_gpu(llama):
    if rt.providers.cuda_usable():
        pytest.skip("a usable CUDA provider exists here")
    cli = CliRunner().invoke(main, ["run", str(llama), "--provider", "cuda", "--ids", "1"])
    assert cli.exit_code == 2 and "CUDA provider is not usable" in cli.stderr


def test_an_export_with_the_old_weights_file_name_still_loads(tmp_path):
    """Exports before 2026-12-05 kept their weights in ``model.onnx.data``: found and loaded."""
    import onnx

    from moe_onnx import manifest

    model = make_model("qwen3_moe", eos_token_id=None, bos_token_id=None, pad_token_id=None)
    out = moe_onnx.export(model, tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    for f in out.iterdir():
        if f.name != manifest.DATA_FILENAME:
            (old / f.name).write_bytes(f.read_bytes())
    onnx.save(onnx.load(str(out / "model.onnx")), str(old / "model.onnx"), save_as_external_data=True,
              location=manifest.LEGACY_DATA_FILENAME, size_threshold=256)
    assert manifest.data_file(old).name == manifest.LEGACY_DATA_FILENAME
    assert manifest.data_file(out).name == manifest.DATA_FILENAME
    prompt = [[5, 17, 33, 2]]
    assert (rt.load(old, provider="cpu").generate(prompt, max_new_tokens=4).ids
            == rt.load(out, provider="cpu").generate(prompt, max_new_tokens=4).ids)
