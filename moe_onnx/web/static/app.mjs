// The export in the page: onnxruntime-web runs model.onnx, @huggingface/tokenizers reads the
// export's tokenizer.json, and a greedy loop feeds each step's present_* outputs back as the next
// past_* inputs (keys, values and recurrent states alike, as /config.json lists them).
//
// Query parameters (the test drives these): prompt, max_new_tokens, ep (auto | wasm | webgpu),
// run=1 to generate once loaded. The result lands in window.moeResult {ids, text, ep, ...}.
import * as ort from "/ort/ort.webgpu.min.mjs";
import { Tokenizer } from "/tokenizers/tokenizers.min.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TYPED = { float32: Float32Array, float16: Uint16Array, int64: BigInt64Array };

ort.env.wasm.wasmPaths = "/ort/";
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(navigator.hardwareConcurrency || 1, 8) : 1;

async function chooseEp(wanted) {
  if (wanted === "wasm") return "wasm";
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (adapter) return "webgpu";
  if (wanted === "webgpu") throw new Error("this browser offers no WebGPU adapter");
  return "wasm";
}

function int64(values, dims) {
  return new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

function emptyPasts(config) {
  const feeds = {};
  for (const p of config.pasts) {
    const size = p.dims.reduce((a, b) => a * b, 1);
    feeds[p.name] = new ort.Tensor(p.type, new TYPED[p.type](size), p.dims);
  }
  return feeds;
}

function argmax(logits) {  // the last position's row of [1, S, V] float32 logits
  const data = logits.data, V = logits.dims[2], start = data.length - V;
  let best = 0, top = -Infinity;
  for (let i = 0; i < V; i++) if (data[start + i] > top) { top = data[start + i]; best = i; }
  return best;
}

async function load(ep) {
  const config = await (await fetch("/config.json")).json();
  const [tokJson, tokConfig] = await Promise.all([
    fetch("/model/tokenizer.json").then((r) => r.json()),
    fetch("/model/tokenizer_config.json").then((r) => (r.ok ? r.json() : {})),
  ]);
  const options = { executionProviders: [ep], graphOptimizationLevel: "all" };
  if (config.external_data) {
    options.externalData = [{ path: config.external_data, data: `/model/${config.external_data}` }];
  }
  const session = await ort.InferenceSession.create("/model/model.onnx", options);
  return { config, session, tokenizer: new Tokenizer(tokJson, tokConfig) };
}

async function generate({ config, session, tokenizer }, prompt, maxNew, onToken) {
  const promptIds = tokenizer.encode(prompt, { add_special_tokens: config.add_bos }).ids;
  const keep = session.inputNames.includes("num_logits_to_keep") ? "num_logits_to_keep" : null;
  let pasts = emptyPasts(config), ids = promptIds, past = 0;
  const out = [], started = performance.now();
  let firstAt = 0;
  for (let step = 0; step < maxNew; step++) {
    const total = past + ids.length;
    const feeds = {
      input_ids: int64(ids, [1, ids.length]),
      attention_mask: int64(new Array(total).fill(1), [1, total]),
      position_ids: int64(ids.map((_, i) => past + i), [1, ids.length]),
      ...pasts,
    };
    if (keep) feeds[keep] = new ort.Tensor("int64", BigInt64Array.from([1n]), []);
    const results = await session.run(feeds);
    const next = argmax(results.logits);
    if (step === 0) firstAt = performance.now();
    pasts = Object.fromEntries(config.pasts.map((p) => [p.name, results[p.present]]));
    past = total;
    if (config.eos_ids.includes(next)) break;
    out.push(next);
    onToken(tokenizer.decode(out, { skip_special_tokens: true }));
    ids = [next];
  }
  const ended = performance.now();
  const decodeSeconds = (ended - firstAt) / 1000;
  return {
    promptIds, ids: out, text: tokenizer.decode(out, { skip_special_tokens: true }),
    prefillMs: firstAt - started,
    decodeTokensPerSecond: out.length > 1 ? (out.length - 1) / decodeSeconds : null,
  };
}

async function main() {
  const prompt = params.get("prompt");
  if (prompt !== null) $("prompt").value = prompt;
  if (params.get("max_new_tokens")) $("tokens").value = params.get("max_new_tokens");
  if (params.get("ep")) $("ep").value = params.get("ep");
  const ep = await chooseEp($("ep").value);
  const model = await load(ep);
  $("model").textContent = `${model.config.name} (${model.config.model_type}) on ${ep}`;
  $("status").textContent = `loaded on ${ep}` + (ep === "wasm" ? `, ${ort.env.wasm.numThreads} thread(s)` : "");
  const run = async () => {
    $("go").disabled = true;
    $("out").textContent = "";
    const result = await generate(model, $("prompt").value, Number($("tokens").value), (text) => {
      $("out").textContent = text;
    });
    const speed = result.decodeTokensPerSecond;
    $("speed").textContent = `prefill ${result.promptIds.length} tokens in ${result.prefillMs.toFixed(1)} ms; ` +
      (speed ? `decode ${speed.toFixed(1)} tokens/s` : "");
    $("go").disabled = false;
    window.moeResult = { ...result, ep, threads: ort.env.wasm.numThreads, isolated: self.crossOriginIsolated };
  };
  $("go").disabled = false;
  $("go").onclick = () => run().catch(fail);
  if (params.get("run") === "1") await run();
}

function fail(err) {
  $("status").textContent = `error: ${err.message || err}`;
  window.moeResult = { error: String(err.message || err) };
}

main().catch(fail);
