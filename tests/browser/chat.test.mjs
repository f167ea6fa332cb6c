// Real-browser test: two chat pages (headless Chromium) on two wsfan instances that
// share one private redis-server. A message typed in one page appears in the other,
// as text (markup in it is not interpreted). Run by run.sh, which starts the processes.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";

const [urlA, urlB] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const a = await browser.newPage();
  const b = await browser.newPage();
  await a.goto(urlA);
  await b.goto(urlB);
  for (const p of [a, b]) {
    await p.waitForFunction(() => document.getElementById("status").textContent.startsWith("connected"),
                            null, { timeout: 15000 });
  }
  const text = "hello across instances <b>not bold</b>";
  await a.fill("#text", text);
  await a.click("#send");
  for (const [name, p] of [["B", b], ["A", a]]) {
    await p.waitForFunction((t) => [...document.querySelectorAll("#messages li")].some((li) => li.textContent === t),
                            text, { timeout: 15000 });
    const bold = await p.$$eval("#messages b", (els) => els.length);
    assert.equal(bold, 0, `page ${name} rendered markup from a message`);
  }
  await b.screenshot({ path: process.env.SCREENSHOT || "/tmp/wsfan-chat.png" });
  console.log("browser: message typed on instance A appeared on instance B");
} finally {
  await browser.close();
}
