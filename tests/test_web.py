"""``moe-onnx web``: the export in a browser page on onnxruntime-web.

The page test drives headless Chromium (Debian's ``chromium``) with puppeteer-core through the
page served for the shipped reference MoE (fp32, and int4 weights) and checks that its greedy text
and ids equal :meth:`Session.generate`'s for the same prompt, on wasm with threads (the server's
COOP/COEP headers make the page cross-origin isolated). It is skipped, with the reason, where
chromium, node or the npm packages (``scripts/install_js_peers.sh``) are absent; ``.ci/run``
installs them. The refusals need none of them."""

import json
import os
import shutil
import socket
import threading
import urllib.request

import pytest
from click.testing import CliRunner

import moe_onnx
import moe_onnx.runtime as rt
from moe_onnx.cli import main
from moe_onnx.reference import default_models_dir
from moe_onnx.web import make_server, run_page

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def exports(reference_exports) -> dict:
    """``reference_models/moe`` exported as the CLI does by default, in fp32 and with int4 weights."""
    return reference_exports


def _serving(out):
    """The page's server for ``out`` on a free port, serving from a thread; (server, base url)."""
    server = make_server(out, port=0, packages=_packages())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _packages():
    from moe_onnx.web import js_packages

    try:
        return js_packages(install=False)
    except moe_onnx.MoeOnnxError as err:
        pytest.skip(str(err))


def test_the_server_sends_isolation_headers_and_only_its_files(exports):
    server, base = _serving(exports["fp32"])
    try:
        with urllib.request.urlopen(base + "/") as page:
            assert page.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert page.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            assert b'src="/app.mjs"' in page.read()
        with urllib.request.urlopen(base + "/config.json") as answer:
            config = json.loads(answer.read())
        names = [p["name"] for p in config["pasts"]]
        assert names[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
        assert config["pasts"][0]["present"] == "present.0.key" and config["pasts"][0]["dims"][2] == 0
        assert config["external_data"] == "model.onnx_data" and config["eos_ids"]
        with urllib.request.urlopen(base + "/ort/ort.webgpu.min.mjs") as script:
            assert script.headers["Content-Type"] == "text/javascript"
        for path in ("/model/moe_onnx.json", "/ort/../../../etc/passwd", "/nothing", "/model/"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path)
            assert err.value.code == 404, path
    finally:
        server.shutdown()
        server.server_close()


def test_web_refuses_what_it_cannot_serve(exports, tmp_path):
    result = CliRunner().invoke(main, ["web", str(tmp_path)])
    assert result.exit_code == 2 and "is not a moe-onnx export" in result.output
    assert "Traceback" not in result.output
    static = moe_onnx.export(default_models_dir() / "moe", tmp_path / "static", kv_cache="static")
    result = CliRunner().invoke(main, ["web", str(static)])
    assert result.exit_code == 2 and "static KV cache" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["web", str(exports["fp32"]), "--port", str(port)])
    assert result.exit_code == 2 and f"port {port} on 127.0.0.1 is in use" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("weights, ep", [("fp32", "wasm"), ("int4", "wasm"), ("fp32", "webgpu"),
                                         ("lfm2_moe", "wasm"), ("granitemoehybrid", "wasm"),
                                         ("qwen3_next", "wasm")])
def test_the_page_in_chromium_generates_what_the_runtime_does(exports, weights, ep, tmp_path):
    """Headless Chromium loads the page: onnxruntime-web on wasm (cross-origin isolated, more than
    one thread) or on WebGPU (SwiftShader's adapter in headless Chromium), the export's tokenizer
    in JS; its greedy ids and text equal the runtime's. The hybrids (tiny random models with a
    byte-level tokenizer) feed their recurrent states back as the page's config lists them."""
    if weights in exports:
        out = exports[weights]
    else:
        from models import export_with_tokenizer

        out = export_with_tokenizer(weights, tmp_path)[1]
    shot = tmp_path / "page.png"
    try:
        page = run_page(out, PROMPT, 16, ep, screenshot=shot, timeout=300)
    except moe_onnx.MoeOnnxError as err:
        if "no chromium" in str(err) or "no node" in str(err):
            pytest.skip(str(err))
        raise
    if ep == "webgpu" and "no WebGPU adapter" in page.get("error", ""):
        pytest.skip("this Chromium offers no WebGPU adapter")
    assert "error" not in page, page
    session = rt.load(out, provider="cpu")
    want = session.generate(PROMPT, max_new_tokens=16)
    assert page["promptIds"] == session.tokenizer.encode(PROMPT)
    assert page["ids"] == want.ids[0] and page["text"] == want.text, (page, want.text)
    assert page["ep"] == ep and page["isolated"] is True and page["threads"] > 1
    assert page["decodeTokensPerSecond"] > 0 and shot.stat().st_size > 10_000
    if os.environ.get("MOE_ONNX_WEB_SCREENSHOT"):  # README's picture: MOE_ONNX_WEB_SCREENSHOT=docs/web.png
        shutil.copy(shot, os.environ["MOE_ONNX_WEB_SCREENSHOT"])
