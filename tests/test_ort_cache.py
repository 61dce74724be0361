"""The prepared onnxruntime copy of an export (runtime/ort_cache.py) and the memory checks of a load
(runtime/memory.py): same logits as the export, rebuilt when stale or foreign, placed elsewhere
for a read-only export, and a load that cannot fit refused with our error."""

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from models import make_model

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime import memory, ort_cache


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    model = make_model("qwen2_moe", num_hidden_layers=2)
    return moe_onnx.export(model, tmp_path_factory.mktemp("ort_cache") / "int4", weights="int4")


@pytest.fixture()
def export(int4_export, tmp_path):
    """A private copy (the tests below change its cache)."""
    return shutil.copytree(int4_export, tmp_path / "export")


def _logits(session):
    ids = np.array([[3, 17, 5, 9, 11, 2]], dtype=np.int64)
    logits, cache = session.forward(ids)
    step, _ = session.forward(np.array([[7]], dtype=np.int64), cache=cache)
    return np.concatenate([logits, step], axis=1)


def test_prepared_copy_gives_the_exports_logits_from_mapped_weights(export):
    plain = rt.load(export, provider="cpu", ort_cache="off")
    prepared = rt.load(export, provider="cpu", ort_cache="on")
    assert not plain.prepared and prepared.prepared
    stored = json.loads((export / "ort-cache" / "cache.json").read_text())
    assert stored == {**ort_cache.key(export), "resident_bytes": memory.resident_bytes(export / "model.onnx"),
                      "largest_packed_bytes": stored["largest_packed_bytes"]}
    assert ort_cache.resident_bytes(export / "ort-cache" / "model.onnx") == stored["resident_bytes"] > 0
    import onnx

    graph = onnx.load(str(export / "ort-cache" / "model.onnx"), load_external_data=False).graph
    blobs = [int(blob.split(";")[1]) for init in graph.initializer for e in init.external_data
             if e.key.startswith("prepacked_") for blob in e.value.split("|")[1:]]
    assert stored["largest_packed_bytes"] == max(blobs)
    assert ort_cache.packing_bytes(export / "ort-cache" / "model.onnx", 3) == 3 * max(blobs)
    # the copy holds the fused graph: its weights are MatMulNBits inputs, not DequantizeLinear's
    graph = (export / "ort-cache" / "model.onnx").read_bytes()
    assert b"MatMulNBits" in graph and b"MatMulNBits" not in (export / "model.onnx").read_bytes()
    np.testing.assert_allclose(_logits(prepared), _logits(plain), rtol=1e-5, atol=1e-5)
    prompt = [3, 17, 5]
    assert prepared.generate(prompt, max_new_tokens=6).ids == plain.generate(prompt, max_new_tokens=6).ids


def test_a_valid_copy_is_reused_not_rebuilt(export):
    rt.load(export, provider="cpu", ort_cache="on")
    data = export / "ort-cache" / "model.onnx.data"
    before = data.stat().st_mtime_ns
    rt.load(export, provider="cpu", ort_cache="on")
    assert data.stat().st_mtime_ns == before


def test_auto_leaves_small_exports_alone(export):
    assert ort_cache.weights_bytes(export) < ort_cache.AUTO_MIN_BYTES
    assert not rt.load(export, provider="cpu").prepared
    assert not (export / "ort-cache").exists()


@pytest.mark.parametrize("field, value", [("onnxruntime", "0.0.1"), ("cpu", "a-different-cpu"),
                                          ("format", 0)])
def test_a_stale_copy_is_rebuilt_with_one_warning(export, caplog, field, value):
    rt.load(export, provider="cpu", ort_cache="on")
    key_file = export / "ort-cache" / "cache.json"
    stored = json.loads(key_file.read_text())
    key_file.write_text(json.dumps({**stored, field: value}))
    assert ort_cache.lookup(export)[0] is None
    with caplog.at_level(logging.WARNING, logger="moe_onnx.runtime"):
        session = rt.load(export, provider="cpu", ort_cache="on")
    warnings = [r for r in caplog.records if "cache of" in r.getMessage() and "is stale" in r.getMessage()]
    assert len(warnings) == 1 and field in warnings[0].getMessage()
    assert session.prepared and json.loads(key_file.read_text()) == stored


def test_a_copy_made_for_another_export_is_never_used(int4_export, tmp_path, caplog):
    other = moe_onnx.export(make_model("qwen2_moe", seed=1, num_hidden_layers=2), tmp_path / "other",
                            weights="int4")
    rt.load(other, provider="cpu", ort_cache="on")
    mine = shutil.copytree(int4_export, tmp_path / "mine")
    shutil.copytree(other / "ort-cache", mine / "ort-cache")  # a foreign copy beside it
    assert ort_cache.lookup(mine) == (None, "stale: its export differs")
    with caplog.at_level(logging.WARNING, logger="moe_onnx.runtime"):
        prepared = rt.load(mine, provider="cpu", ort_cache="on")
    assert any("export differs" in r.getMessage() for r in caplog.records)
    plain = rt.load(mine, provider="cpu", ort_cache="off")
    np.testing.assert_allclose(_logits(prepared), _logits(plain), rtol=1e-5, atol=1e-5)


def test_an_incomplete_copy_is_rebuilt(export):
    rt.load(export, provider="cpu", ort_cache="on")
    (export / "ort-cache" / "cache.json").unlink()  # as if the build had stopped half-way
    assert ort_cache.lookup(export) == (None, "an incomplete copy")
    assert rt.load(export, provider="cpu", ort_cache="on").prepared
    assert ort_cache.lookup(export)[1] == "valid"


def test_read_only_export_puts_the_copy_in_the_user_cache(export, tmp_path, monkeypatch, caplog):
    # root ignores file modes, so "read-only" is what the writability check answers
    monkeypatch.setattr(ort_cache, "_writable", lambda path: not Path(path).is_relative_to(export))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    session = rt.load(export, provider="cpu", ort_cache="on")
    assert session.prepared and not (export / "ort-cache").exists()
    assert list((tmp_path / "xdg" / "moe-onnx" / "ort-cache").glob("*/cache.json"))
    # nowhere writable: loaded as it is, with a warning
    monkeypatch.setattr(ort_cache, "_writable", lambda path: False)
    with caplog.at_level(logging.WARNING, logger="moe_onnx.runtime"):
        plain = rt.load(export, provider="cpu", ort_cache="on")
    assert not plain.prepared and any("writable" in r.getMessage() for r in caplog.records)


def test_unknown_mode_is_refused(export):
    with pytest.raises(MoeOnnxError, match="ort_cache must be one of"):
        rt.load(export, provider="cpu", ort_cache="always")


def test_a_load_that_cannot_fit_is_refused_with_what_it_needs(export, monkeypatch):
    need = memory.mapped_need(export / "model.onnx")
    monkeypatch.setattr(memory, "limit", lambda: need - 1)
    with pytest.raises(MoeOnnxError, match=r"loading .* needs about .* GiB of memory; this process may use"):
        rt.load(export, provider="cpu", ort_cache="off")
    with pytest.raises(MoeOnnxError, match=r"preparing .* needs about"):  # the build is refused first
        rt.load(export, provider="cpu", ort_cache="on")
    monkeypatch.undo()
    rt.load(export, provider="cpu", ort_cache="on")
    # a load also packs each weight again for a moment, on each of its threads (all cores here)
    packing = ort_cache.packing_bytes(export / "ort-cache" / "model.onnx", os.cpu_count() or 1)
    assert packing > 0
    need += packing
    monkeypatch.setattr(memory, "limit", lambda: need - 1)
    with pytest.raises(MoeOnnxError, match="decoding .* outside the experts.* needs about"):
        rt.load(export, provider="cpu", ort_cache="on")
    monkeypatch.setattr(memory, "limit", lambda: need)
    assert rt.load(export, provider="cpu", ort_cache="on").prepared


def test_resident_bytes_leave_out_experts_and_the_embedding(export):
    import onnx

    graph = onnx.load(str(export / "model.onnx"), load_external_data=False).graph
    experts = [i for i in graph.initializer if ".experts." in i.name]
    assert experts  # the check below means something only if the export has expert tensors
    assert 0 < memory.resident_bytes(export / "model.onnx") < ort_cache.weights_bytes(export)


def _memory_cgroup() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "cgroup.procs").exists() or not os.access(root, os.W_OK):
        return None
    group = root / f"moe-onnx-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError:
        return None
    return group


def test_a_real_cgroup_cap_gives_our_error_not_an_oom_kill(export):
    group = _memory_cgroup()
    if group is None:
        pytest.skip("no writable cgroup v1 memory controller here")
    try:
        rt.load(export, provider="cpu", ort_cache="on")  # the copy is built outside the cap
        cap = 160 << 20  # above an idle Python with onnxruntime, below what a load needs
        (group / "memory.limit_in_bytes").write_text(str(cap))
        code = ("import os,sys; open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid())); "
                "from moe_onnx.cli import main; main(['run', sys.argv[2], '--ids', '1,2,3', '--provider', "
                "'cpu', '--ort-cache', 'on', '--max-new-tokens', '2'])")
        done = subprocess.run([sys.executable, "-c", code, str(group), str(export)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode not in (-9, 137), "killed by the OOM killer instead of refused"
        assert done.returncode != 0
        assert "needs about" in done.stderr and "GiB of memory" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    finally:
        group.rmdir()


def test_the_copy_keeps_blobs_page_aligned_decode_reads_first_load_reads_last(export):
    """Every blob page-aligned; first what decoding reads (pre-packed buffers, norms, ...), then
    what only the session's creation reads (the weights the buffers replace and their MatMulNBits
    scales), in the order of the nodes that read it: a cold load's read-around stays in there."""
    import onnx

    rt.load(export, provider="cpu", ort_cache="on")
    graph = onnx.load(str(export / "ort-cache" / "model.onnx"), load_external_data=False).graph
    offsets, replaced = {}, set()
    decode = []
    for init in graph.initializer:
        entries = {e.key: e.value for e in init.external_data}
        packed = [v for k, v in entries.items() if k.startswith("prepacked_")]
        for value in packed:
            decode += [int(blob.split(";")[0]) for blob in value.split("|")[1:]]
        if packed:
            replaced.add(init.name)
        if "offset" in entries:
            offsets[init.name] = int(entries["offset"])
    load = []  # names, in node order
    for node in graph.node:
        names = [n for n in node.input if n in replaced]  # MatMulNBits' weights, MatMul's (router)
        if names and node.op_type == "MatMulNBits":
            names += node.input[2:4]  # its scales and zero points (where it has them)
        load += [n for n in names if n in offsets and n not in load]
    assert load and set(replaced) <= set(load)
    decode += [offset for name, offset in offsets.items() if name not in load]
    assert all(offset % 4096 == 0 for offset in decode + list(offsets.values()))
    assert max(decode) < min(offsets[name] for name in load)
    assert [offsets[name] for name in load] == sorted(offsets[name] for name in load)


def test_a_build_without_disk_room_is_refused_before_it_starts(export, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ort_cache.shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, 1 << 10))
    with pytest.raises(MoeOnnxError, match=r"needs about .* GiB of disk .* free"):
        rt.load(export, provider="cpu", ort_cache="on")
    assert not (export / "ort-cache").exists()
    assert not list(export.glob(".ort-cache.*"))  # no half-built copy left behind


def test_realign_gives_the_same_file_whether_it_frees_the_source_as_it_goes_or_not(export, tmp_path,
                                                                                   monkeypatch):
    """The build's last step punches holes in the source as it copies (one copy's disk at a time);
    the result must be the same bytes as a plain copy's."""
    rt.load(export, provider="cpu", ort_cache="on")
    unaligned = tmp_path / "unaligned"
    unaligned.mkdir()
    ort_cache._stage("pack", export / "ort-cache" / "model.onnx", unaligned)  # a packed, unaligned copy
    punched, plain = (shutil.copytree(unaligned, tmp_path / name) for name in ("punched", "plain"))
    ort_cache.realign(punched / "model.onnx")
    monkeypatch.setattr(ort_cache, "_punch_hole", lambda f, offset, length: None)
    ort_cache.realign(plain / "model.onnx")
    for name in ("model.onnx", "model.onnx.data"):
        assert (punched / name).read_bytes() == (plain / name).read_bytes()


def test_shared_ranges_are_never_punched():
    import onnx

    def init(name, offset, length):
        tensor = onnx.TensorProto(name=name, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", "d"), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    assert ort_cache._disjoint([init("a", 0, 10), init("b", 10, 5)])
    assert not ort_cache._disjoint([init("a", 0, 10), init("b", 5, 10)])


def test_a_quantized_load_without_the_copy_is_refused_below_its_copies(export, monkeypatch):
    """The optimizer holds an int4 export's weights about twice: a limit that fits them once is
    refused up front, not left to the OOM killer."""
    once = memory.copied_need(ort_cache.weights_bytes(export))
    monkeypatch.setattr(memory, "limit", lambda: once + 1)
    with pytest.raises(MoeOnnxError, match="loading .* needs about"):
        rt.load(export, provider="cpu", ort_cache="off")


@pytest.mark.parametrize("mode", ["off", "on"])
def test_parallel_prepacking_packs_what_one_thread_packs(export, monkeypatch, mode):
    """onnxruntime packs the weights on the session's threads (``session.prepack.enable_parallel``,
    on by default: the 7 B export's session in 2.75 s instead of 4.77): the logits are those of
    packing on one thread, from the export as it is (the packed weights are the ones computed) and
    from the prepared copy (they only find the saved ones). onnxruntime takes any key, so the key
    must also be one this onnxruntime knows."""
    import onnxruntime as ort

    from moe_onnx.runtime.threads import session_options

    library = Path(ort.__file__).parent / "capi"
    assert any(b"session.prepack.enable_parallel" in lib.read_bytes() for lib in library.glob("*.so*")
               if "providers" not in lib.name)
    monkeypatch.delenv("MOE_ONNX_PARALLEL_PREPACK", raising=False)
    assert session_options(2).get_session_config_entry("session.prepack.enable_parallel") == "1"
    parallel = _logits(rt.load(export, provider="cpu", threads=2, ort_cache=mode))
    monkeypatch.setenv("MOE_ONNX_PARALLEL_PREPACK", "0")
    with pytest.raises(RuntimeError, match="does not have configuration"):
        session_options(2).get_session_config_entry("session.prepack.enable_parallel")
    one_thread = _logits(rt.load(export, provider="cpu", threads=2, ort_cache=mode))
    np.testing.assert_array_equal(parallel, one_thread)


def test_realign_frees_its_source_as_it_copies(export, tmp_path, monkeypatch):
    """The hole punching is real: each copied range of the source goes back to the file system
    (it once opened the source read-only, where ``fallocate`` fails, and a 21 B build ran out of
    disk)."""
    rt.load(export, provider="cpu", ort_cache="on")
    unaligned = tmp_path / "unaligned"
    unaligned.mkdir()
    ort_cache._stage("pack", export / "ort-cache" / "model.onnx", unaligned)
    probe = tmp_path / "probe.bin"
    probe.write_bytes(os.urandom(1 << 20))
    with probe.open("r+b") as f:
        if not ort_cache._punch_hole(f, 0, 1 << 19):
            pytest.skip("this file system cannot punch holes")
    assert probe.read_bytes()[: 1 << 19] == bytes(1 << 19)
    assert probe.stat().st_blocks * 512 <= (1 << 19) + 8192
    punched, real = [], ort_cache._punch_hole

    def recording(f, offset, length):
        blocks = os.fstat(f.fileno()).st_blocks
        done = real(f, offset, length)
        punched.append((done, blocks - os.fstat(f.fileno()).st_blocks))
        return done

    monkeypatch.setattr(ort_cache, "_punch_hole", recording)
    ort_cache.realign(unaligned / "model.onnx")
    assert punched and all(done for done, _ in punched)
    # a tiny export's blobs are mostly under a block: only the blocks they fill come back
    assert sum(freed for _, freed in punched) > 0


def test_a_disk_that_fills_up_while_building_is_one_clear_error_and_leaves_nothing(export, monkeypatch):
    import errno

    def full(model_path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ort_cache, "realign", full)
    with pytest.raises(MoeOnnxError, match=r"disk of .* filled up .* GiB needed while it builds"):
        rt.load(export, provider="cpu", ort_cache="on")
    assert not (export / "ort-cache").exists() and not list(export.glob(".ort-cache.*"))
    from click.testing import CliRunner

    from moe_onnx.cli import main

    result = CliRunner().invoke(main, ["prepare", str(export)])
    assert result.exit_code != 0 and "filled up" in result.output and "Traceback" not in result.output


def test_a_build_stage_that_fills_the_disk_says_so(export, monkeypatch):
    """A stage child whose write failed for want of disk (onnxruntime's own message) is the same
    one clear error as a full disk in the realign."""
    def full(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "onnxruntime: write failed: No space left on device")

    monkeypatch.setattr(ort_cache.subprocess, "run", full)
    with pytest.raises(MoeOnnxError, match=r"disk of .* filled up"):
        rt.load(export, provider="cpu", ort_cache="on")
    assert not (export / "ort-cache").exists() and not list(export.glob(".ort-cache.*"))
