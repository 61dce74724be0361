"""transformers.js (on onnxruntime-node) runs our exports as they are: greedy generation from its
``AutoModelForCausalLM`` equals our runtime's, for an attention-only MoE and the hybrids whose
recurrent states it reads by our names (``past_conv.{i}``, ``past_recurrent.{i}``).

Needs node and ``scripts/install_js_peers.sh`` (``.ci/run`` runs it; the package goes to
``$MOE_ONNX_JS_DIR``, else ``~/.cache/moe-onnx/js``); skipped, with the reason, without them."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from models import byte_level_tokenizer, make_model

import moe_onnx
import moe_onnx.runtime as rt

JS_DIR = Path(os.environ.get("MOE_ONNX_JS_DIR", Path.home() / ".cache" / "moe-onnx" / "js"))
ENTRY = JS_DIR / "node_modules" / "@huggingface" / "transformers" / "dist" / "transformers.node.mjs"
if shutil.which("node") is None or not ENTRY.is_file():
    pytest.skip(f"transformers.js is not installed in {JS_DIR} (scripts/install_js_peers.sh), or node is "
                "missing", allow_module_level=True)

PROMPT = [5, 17, 33, 2, 9, 64]
NEW = 8
# Loads each export directory as it is (subfolder ''), greedy, and prints its new tokens as JSON.
SCRIPT = """
import { pathToFileURL } from 'url';
const { AutoModelForCausalLM, Tensor, env } = await import(pathToFileURL(process.argv[2]).href);
env.allowRemoteModels = false;
env.localModelPath = process.argv[3];
const ids = JSON.parse(process.argv[4]);
const results = {};
for (const name of process.argv.slice(6)) {
  const model = await AutoModelForCausalLM.from_pretrained(name, { dtype: 'fp32', subfolder: '' });
  const input_ids = new Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
  const attention_mask = new Tensor('int64', BigInt64Array.from(ids.map(() => 1n)), [1, ids.length]);
  const out = await model.generate({ input_ids, attention_mask, max_new_tokens: Number(process.argv[5]),
                                     do_sample: false });
  results[name] = Array.from(out.data).slice(ids.length).map(Number);
}
console.log(JSON.stringify(results));
"""


def test_transformers_js_generates_what_our_runtime_does(tmp_path):
    tok = byte_level_tokenizer()
    cases = ["qwen3_moe", "lfm2_moe", "qwen3_next"]
    expected = {}
    for case in cases:
        model = make_model(case, vocab_size=tok.get_vocab_size(), eos_token_id=None, bos_token_id=None,
                           pad_token_id=None)
        out = moe_onnx.export(model, tmp_path / case)
        tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<eos>", "eos_token": "<eos>"}))
        expected[case] = rt.load(out, provider="cpu").generate([PROMPT], max_new_tokens=NEW).ids[0]
    script = tmp_path / "generate.mjs"
    script.write_text(SCRIPT)
    command = ["node", str(script), str(ENTRY), f"{tmp_path}/", json.dumps(PROMPT), str(NEW), *cases]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
