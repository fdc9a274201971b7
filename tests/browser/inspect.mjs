// The inspection page of `metauas serve` in a real browser (Debian's chromium, driven by
// playwright-core). Run by tests/clients/test_browser.py, which starts the server:
//   node tests/browser/inspect.mjs URL PROMPT.png QUERY.png BROKEN.png PRODUCT SHOT.png
// Prints one JSON object with what it saw; exits non-zero on a failed check.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";

const [url, promptFile, queryFile, brokenFile, product, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"],
});
const report = { console_errors: [], checks: [] };
const check = (name, ok, detail) => {
  report.checks.push({ name, ok, detail });
  if (!ok) process.exitCode = 1;
};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") report.console_errors.push(m.text()); });
  page.on("pageerror", (e) => report.console_errors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("engine").textContent.includes("backend"));
  report.engine = await page.textContent("#engine");

  // A one-off prompt and a query: the overlay shown is the API's PNG, pixel for pixel.
  await page.setInputFiles("#prompt-file", promptFile);
  await page.waitForFunction(() => window.inspection.prompt);
  await page.setInputFiles("#query-files", queryFile);
  await page.waitForFunction(() => {
    const img = document.querySelector(".card .overlay");
    return img && img.complete && img.naturalWidth > 0;
  });
  const queryB64 = readFileSync(queryFile).toString("base64");
  const same = await page.evaluate(async (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const t = window.inspection.threshold;
    const r = await fetch(`/v1/segment?prompt=${window.inspection.prompt}&map=none&overlay=1&threshold=${t}`,
                          { method: "POST", body: bytes }).then((x) => x.json());
    const pixels = async (src) => {
      const img = new Image();
      img.src = src;
      await img.decode();
      const c = document.createElement("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext("2d");
      g.drawImage(img, 0, 0);
      return g.getImageData(0, 0, c.width, c.height).data;
    };
    const shown = await pixels(document.querySelector(".card .overlay").src);
    const api = await pixels("data:image/png;base64," + r.overlay);
    let diff = shown.length === api.length ? 0 : -1;
    for (let i = 0; diff >= 0 && i < api.length; i++) if (shown[i] !== api[i]) diff++;
    return { diff, size: [r.frame[0], r.frame[1]] };
  }, queryB64);
  check("overlay pixels equal the API's PNG", same.diff === 0, same);

  // The threshold slider: the page's region count equals the API's for that threshold.
  for (const t of [0.2, 0.5, 0.53, 0.56, 0.9]) {
    const counts = await page.evaluate(async ([t, b64]) => {
      const slider = document.getElementById("threshold");
      slider.value = String(t);
      slider.dispatchEvent(new Event("input"));
      const shown = Number(document.querySelector(".card").dataset.regions);
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const r = await fetch(`/v1/segment?prompt=${window.inspection.prompt}&map=none&threshold=${slider.value}`,
                            { method: "POST", body: bytes }).then((x) => x.json());
      return { t: Number(slider.value), shown, api: r.regions.length, verdict: r.verdict.anomalous,
               badge: document.querySelector(".card .badge").textContent };
    }, [t, queryB64]);
    check(`regions at threshold ${counts.t}`, counts.shown === counts.api
          && counts.badge === (counts.verdict ? "NG" : "OK"), counts);
  }

  // A calibrated product: its verdict and threshold source.
  await page.selectOption("#product", product);
  await page.waitForFunction(() => document.getElementById("threshold-source").textContent.includes("calibration"));
  await page.setInputFiles("#query-files", queryFile);
  await page.waitForFunction(() => document.querySelectorAll(".card").length === 2
    && document.querySelector(".card").dataset.regions !== undefined);
  const productCard = await page.evaluate(() => ({
    badge: document.querySelector(".card .badge").textContent,
    info: document.getElementById("product-info").textContent,
    verdict: window.inspection.cards.at(-1).answer.verdict,
  }));
  check("product verdict shown", productCard.badge === (productCard.verdict.anomalous ? "NG" : "OK"), productCard);

  // A broken image shows the API's one-line error.
  await page.setInputFiles("#query-files", brokenFile);
  await page.waitForFunction(() => document.querySelector(".card .err").textContent.length > 0);
  const error = await page.textContent(".card .err");
  check("broken image error", error.length > 0 && !error.includes("\n"), error);

  await page.screenshot({ path: shot, fullPage: true });
  check("no console errors", report.console_errors.length === 0
        || report.console_errors.every((e) => e.includes("400")), report.console_errors);
} catch (e) {
  const shown = await browser.contexts()[0]?.pages()[0]?.evaluate(() =>
    [document.getElementById("error").textContent,
     [...document.querySelectorAll(".card .err")].map((x) => x.textContent)]).catch(() => null);
  check("script", false, String(e.stack || e) + " | page: " + JSON.stringify(shown));
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
