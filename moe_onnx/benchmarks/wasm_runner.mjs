// The bench's `wasm` provider: an export on onnxruntime-web's wasm backend in Node, timed step by step.
//
//   node wasm_runner.mjs JS_DIR OUT THREADS CONFIG_JSON
//
// JS_DIR holds node_modules/onnxruntime-web (scripts/install_js_peers.sh); CONFIG_JSON is what
// `moe-onnx web` serves as /config.json (the past inputs, their empty dims, the outputs that feed
// them back). Reads one JSON command per stdin line and answers one JSON line on stdout:
//   {"cmd": "prefill", "ids": [...]}              -> {"seconds": s}   (a prefill from an empty cache)
//   {"cmd": "prepare", "key": K, "ids": [...]}    -> {"ok": true}     (keeps the cache after ids as K)
//   {"cmd": "decode", "key": K, "token": t}       -> {"seconds": s}   (one step after K; K is kept)
// Each time is session.run alone (inputs built before), as the Python runtime's step is timed.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import path from "node:path";

const [jsDir, out, threads, configJson] = process.argv.slice(2);
const require = createRequire(path.join(jsDir, "node_modules") + "/");
const ort = require("onnxruntime-web");
const config = JSON.parse(configJson);
const TYPED = { float32: Float32Array, float16: Uint16Array, int64: BigInt64Array };

ort.env.wasm.numThreads = Number(threads);
const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
if (config.external_data) {
  options.externalData = [{ path: config.external_data, data: readFileSync(path.join(out, config.external_data)) }];
}
const session = await ort.InferenceSession.create(readFileSync(path.join(out, "model.onnx")), options);
const keep = session.inputNames.includes("num_logits_to_keep");

const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);

function empty() {
  return Object.fromEntries(config.pasts.map((p) => {
    const size = p.dims.reduce((a, b) => a * b, 1);
    return [p.name, new ort.Tensor(p.type, new TYPED[p.type](size), p.dims)];
  }));
}

async function step(ids, cache) {  // -> [seconds, the cache after ids]
  const total = cache.length + ids.length;
  const feeds = {
    input_ids: int64(ids, [1, ids.length]),
    attention_mask: int64(new Array(total).fill(1), [1, total]),
    position_ids: int64(ids.map((_, i) => cache.length + i), [1, ids.length]),
    ...cache.pasts,
  };
  if (keep) feeds.num_logits_to_keep = new ort.Tensor("int64", BigInt64Array.from([1n]), []);
  const start = performance.now();
  const results = await session.run(feeds);
  const seconds = (performance.now() - start) / 1000;
  const pasts = Object.fromEntries(config.pasts.map((p) => [p.name, results[p.present]]));
  return [seconds, { length: total, pasts }];
}

const kept = new Map();
console.log(JSON.stringify({ ready: true, inputs: session.inputNames.length }));
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  try {
    if (command.cmd === "prefill") {
      const [seconds] = await step(command.ids, { length: 0, pasts: empty() });
      console.log(JSON.stringify({ seconds }));
    } else if (command.cmd === "prepare") {
      const [, cache] = await step(command.ids, { length: 0, pasts: empty() });
      kept.set(command.key, cache);
      console.log(JSON.stringify({ ok: true }));
    } else if (command.cmd === "decode") {
      const [seconds] = await step([command.token], kept.get(command.key));
      console.log(JSON.stringify({ seconds }));
    } else {
      console.log(JSON.stringify({ error: `unknown command ${command.cmd}` }));
    }
  } catch (err) {
    console.log(JSON.stringify({ error: String(err.message || err).split("\n")[0] }));
  }
}
