"""The bench's ``wasm`` provider: an export on onnxruntime-web's wasm backend, in a Node process.

``moe-onnx bench OUT --providers cpu,wasm`` times the same export on onnxruntime CPU and on
onnxruntime-web (the runtime a web page gets; ``moe-onnx web`` serves one) in the same interleaved
rounds. The Node side (``wasm_runner.mjs``) loads the graph and its external data with
onnxruntime-web, keeps the caches the bench prepares, and times each ``session.run`` by itself;
this side is the suite's Runner interface over a line of JSON per command. Batch 1, concat-cache
exports (the inputs ``moe-onnx web`` lists); the Node process's memory is not in the bench's
memory table. Needs ``node`` and onnxruntime-web in :func:`moe_onnx.web.js_dir`
(``scripts/install_js_peers.sh``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from moe_onnx.errors import MoeOnnxError
from moe_onnx.runtime.providers import ProviderError

SCRIPT = Path(__file__).with_name("wasm_runner.mjs")


def wasm_usable() -> str | None:
    """None when the wasm provider can run here, else why not."""
    from moe_onnx.web import js_packages

    if shutil.which("node") is None:
        return "the wasm provider runs onnxruntime-web in Node, and node is not installed"
    try:
        js_packages(install=False)
    except MoeOnnxError as err:
        return f"the wasm provider needs onnxruntime-web: {err}"
    return None


class WasmRunner:
    """One export in one Node process; ``prefill``/``prepare_decode``/``decode_step`` as the bench's
    other runners, each time measured in Node around ``session.run``."""

    def __init__(self, out: Path, threads: int):
        from moe_onnx.web import js_dir, page_config

        why = wasm_usable()
        if why:
            raise ProviderError(why)
        config = page_config(Path(out))
        self.placement = f"onnxruntime-web wasm in Node, {threads} threads"
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            ["node", str(SCRIPT), str(js_dir()), str(out), str(threads), json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._answer()  # {"ready": true} once the session is made

    def _answer(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            detail = (self._stderr.read().strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"onnxruntime-web (wasm, Node) stopped: {detail[:300]}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"onnxruntime-web (wasm, Node): {answer['error'][:300]}")
        return answer

    def _ask(self, **command) -> dict:
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        return self._answer()

    @staticmethod
    def _row(ids: np.ndarray) -> list[int]:
        if ids.shape[0] != 1:
            raise MoeOnnxError("the wasm provider times batch 1")
        return [int(i) for i in ids[0]]

    def prefill(self, ids: np.ndarray) -> float:
        return self._ask(cmd="prefill", ids=self._row(ids))["seconds"]

    def prepare_decode(self, context_ids: np.ndarray) -> None:
        self._ask(cmd="prepare", key=context_ids.shape[1], ids=self._row(context_ids))

    def decode_step(self, context: int, token: np.ndarray) -> float:
        return self._ask(cmd="decode", key=context, token=self._row(token)[0])["seconds"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to free
            pass
