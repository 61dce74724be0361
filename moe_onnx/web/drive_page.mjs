// Drives headless Chromium (puppeteer-core) through the `moe-onnx web` page and prints the page's
// result as one JSON line: node drive_page.mjs URL [SCREENSHOT.png] (moe_onnx.web.run_page runs it)
// Environment: MOE_ONNX_JS_DIR (where puppeteer-core is installed), CHROMIUM (the browser).
import { createRequire } from "node:module";

const require = createRequire(`${process.env.MOE_ONNX_JS_DIR}/node_modules/`);
const puppeteer = require("puppeteer-core");
const [url, screenshot] = process.argv.slice(2);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM, headless: true,
  args: ["--no-sandbox", "--enable-unsafe-webgpu"],
});
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 900, height: 640 });
  page.on("console", (m) => console.error(`page: ${m.text()}`));
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  await page.goto(url);
  await page.waitForFunction("window.moeResult !== undefined", { timeout: 300000, polling: 200 });
  const result = await page.evaluate(() => window.moeResult);
  if (screenshot) await page.screenshot({ path: screenshot });
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
