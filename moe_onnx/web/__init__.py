"""``moe-onnx web OUT``: the export in a browser page, run by onnxruntime-web, on 127.0.0.1.

The page (``static/index.html``, ``static/app.mjs``: no build step, no CDN) loads ``model.onnx``
and its external data with onnxruntime-web, tokenizes with the export's own ``tokenizer.json``
(``@huggingface/tokenizers``, a pure-JS reader of it) and streams a greedy completion, tokens/s on
the page. It runs on wasm with threads by default (the server sends the COOP/COEP headers that make
the page cross-origin isolated, which wasm threads need) and on WebGPU when the browser offers an
adapter (``?ep=webgpu``, or ``auto``). The JavaScript comes from npm packages in a folder outside
the repository (:func:`js_dir`; ``scripts/install_js_peers.sh`` or this command installs them).

The server is the standard library's threading HTTP server: it only serves files (the page, the
two packages' ``dist`` folders, the export's graph, weights and tokenizer files, a ``config.json``
of the export's inputs), so a web framework would add nothing but a dependency. Only those files
are served; any other path is a 404.

``config.json`` gives the page what the Python runtime reads from the manifest: every past input
(keys, values and recurrent states) with its dtype and empty shape and the output that feeds it
back, the end-of-sequence ids, and whether the tokenizer adds BOS. The static cache is not served:
its buffers need the capacity bookkeeping of :class:`moe_onnx.runtime.steps.BoundSteps`.
"""

from __future__ import annotations

import errno
import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np

from moe_onnx import contract, manifest
from moe_onnx.errors import MoeOnnxError

TRANSFORMERS_JS = "4.3.2"  # brings onnxruntime-web and @huggingface/tokenizers (as install_js_peers.sh)
STATIC = Path(__file__).parent / "static"
DRIVER = Path(__file__).with_name("drive_page.mjs")  # headless Chromium through the page (run_page)
PACKAGES = {"ort": "onnxruntime-web/dist", "tokenizers": "@huggingface/tokenizers/dist"}
MODEL_FILES = ("model.onnx", "tokenizer.json", "tokenizer_config.json")
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".html": "text/html; charset=utf-8", ".png": "image/png"}
ONNX_TYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.int64): "int64"}


def js_dir() -> Path:
    """Where the npm packages live: ``$MOE_ONNX_JS_DIR``, else ``~/.cache/moe-onnx/js``."""
    return Path(os.environ.get("MOE_ONNX_JS_DIR") or Path.home() / ".cache" / "moe-onnx" / "js")


def js_packages(folder: Path | None = None, install: bool = True) -> dict[str, Path]:
    """``{url prefix: dist folder}`` of onnxruntime-web and @huggingface/tokenizers, installed with
    npm (transformers.js, which brings both; onnxruntime-node's download skipped) when missing."""
    folder = folder or js_dir()
    found = {prefix: folder / "node_modules" / sub for prefix, sub in PACKAGES.items()}
    if all(p.is_dir() for p in found.values()):
        return found
    if not install:
        raise MoeOnnxError(f"onnxruntime-web is not installed in {folder} (scripts/install_js_peers.sh)")
    npm = shutil.which("npm")
    if npm is None:
        raise MoeOnnxError("moe-onnx web needs onnxruntime-web from npm, and npm is not installed "
                           "(install Node.js >= 18 with npm)")
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
    command = [npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund", "--loglevel=error",
               f"@huggingface/transformers@{TRANSFORMERS_JS}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not all(p.is_dir() for p in found.values()):
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MoeOnnxError(f"npm could not install onnxruntime-web into {folder}: {detail[0]}")
    return found


def page_config(out: Path) -> dict:
    """What the page needs beyond the graph: its past inputs (name, dtype, empty dims, the output
    that feeds it back), end-of-sequence ids, BOS, the weights file's name."""
    from moe_onnx.runtime.session import ModelInfo
    from moe_onnx.runtime.tokenizer import _adds_bos

    m = manifest.read(out)
    if m.kv_cache == "static":
        raise MoeOnnxError(f"{out} has a static KV cache; the web page runs concat-cache exports "
                           "(re-export without --kv-cache static)")
    spec, info = m.spec, ModelInfo.read(out)
    feeds = contract.prefill_feeds([[0]], spec.num_layers, m.kv_dims, m.kv.numpy, False, spec.layer_types,
                                   spec.state_shapes(), m.compute.numpy)
    pasts = [{"name": n, "present": contract.present(n), "type": ONNX_TYPES[feeds[n].dtype],
              "dims": list(feeds[n].shape)} for n in contract.cache_names(spec.num_layers, spec.layer_types)]
    data = manifest.data_file(out)
    return {"name": out.name, "model_type": spec.model_type, "vocab_size": spec.vocab_size,
            "pasts": pasts, "eos_ids": list(info.eos_ids), "add_bos": _adds_bos(out),
            "external_data": data.name if data.is_file() else None}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files from a fixed table of roots; COOP/COEP on every answer (wasm threads need them)."""

    def __init__(self, *args, routes: dict[str, Path], files: dict[str, Path], config: bytes, **kwargs):
        self.routes, self.files, self.config = routes, files, config
        super().__init__(*args, **kwargs)

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def translate_path(self, path: str) -> str:
        """Only the table's files; anything else maps to a path that does not exist (404)."""
        clean = path.split("?", 1)[0].split("#", 1)[0]
        if clean in self.files:
            return str(self.files[clean])
        prefix, _, rest = clean.lstrip("/").partition("/")
        root = self.routes.get(prefix)
        if root is None or not rest or ".." in rest.split("/"):
            return str(STATIC / "missing")
        return str(root / rest)

    def guess_type(self, path) -> str:
        return TYPES.get(Path(path).suffix, "application/octet-stream")

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        if self.path.split("?", 1)[0] == "/config.json":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.config)))
            self.end_headers()
            self.wfile.write(self.config)
            return
        super().do_GET()

    def log_message(self, format, *args) -> None:  # noqa: A002 - the standard library's signature
        pass


def make_server(out, host: str = "127.0.0.1", port: int = 8000,
                packages: dict[str, Path] | None = None) -> http.server.ThreadingHTTPServer:
    """The page's HTTP server for the export in ``out`` (not yet serving). A folder that is not a
    concat-cache export, or a busy port, is a :class:`MoeOnnxError`."""
    out = Path(out)
    if not (out / manifest.FILENAME).is_file() or not (out / "model.onnx").is_file():
        raise MoeOnnxError(f"{out} is not a moe-onnx export (no {manifest.FILENAME} and model.onnx)")
    if not (out / "tokenizer.json").is_file():
        raise MoeOnnxError(f"{out} has no tokenizer.json: the page tokenizes with it")
    config = page_config(out)
    files = {"/": STATIC / "index.html", "/app.mjs": STATIC / "app.mjs"}
    files |= {f"/model/{name}": out / name for name in MODEL_FILES if (out / name).is_file()}
    if config["external_data"]:
        files[f"/model/{config['external_data']}"] = out / config["external_data"]
    routes = dict(packages or js_packages())
    handler = functools.partial(_Handler, routes=routes, files=files, config=json.dumps(config).encode())
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        why = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be opened ({err.strerror})"
        raise MoeOnnxError(f"port {port} on {host} {why}; choose another with --port") from None


def run_page(out, prompt: str, max_new_tokens: int, ep: str = "wasm", screenshot: Path | None = None,
             timeout: float = 600) -> dict:
    """The page for ``out`` served on a free port and driven once by headless Chromium (Debian's
    ``chromium`` with puppeteer-core, ``drive_page.mjs``): a greedy completion of ``prompt`` on
    ``ep`` (wasm | webgpu | auto); what the page reports (``window.moeResult``: ``promptIds``,
    ``ids``, ``text``, ``ep``, ``threads``, ``isolated``, ``decodeTokensPerSecond``, or ``error``).
    Missing chromium, node or puppeteer-core is a :class:`MoeOnnxError` naming it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise MoeOnnxError("no chromium (apt-get install chromium)")
    if shutil.which("node") is None or not (js_dir() / "node_modules" / "puppeteer-core").is_dir():
        raise MoeOnnxError("no node or puppeteer-core (scripts/install_js_peers.sh)")
    server = make_server(out, port=0, packages=js_packages(install=False))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = (f"http://127.0.0.1:{server.server_address[1]}/?run=1&ep={ep}&max_new_tokens={max_new_tokens}"
           f"&prompt={quote(prompt)}")
    env = {**os.environ, "MOE_ONNX_JS_DIR": str(js_dir()), "CHROMIUM": chromium}
    try:
        done = subprocess.run(["node", str(DRIVER), url, *([str(screenshot)] if screenshot else [])],
                              capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        server.shutdown()
        server.server_close()
    if done.returncode != 0:
        raise MoeOnnxError(f"headless Chromium failed on the page: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
