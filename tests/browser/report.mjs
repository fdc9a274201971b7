// Opens an evaluation report.html in headless Chromium and screenshots it:
//   node tests/browser/report.mjs REPORT.html SHOT.png
// Prints {"console_errors": [...], "curves": N, "images": N}.
import { chromium } from "playwright-core";
import { pathToFileURL } from "node:url";

const [report, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(pathToFileURL(report).href);
  const seen = await page.evaluate(() => ({
    curves: document.querySelectorAll("polyline.curve").length,
    images: [...document.querySelectorAll(".shot img")].filter((i) => i.complete && i.naturalWidth > 0).length,
  }));
  await page.screenshot({ path: shot, fullPage: false });
  console.log(JSON.stringify({ console_errors: errors, ...seen }));
} finally {
  await browser.close();
}
