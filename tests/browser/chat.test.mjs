// Real-browser test: two chat pages (headless Chromium) on two wsfan instances that
// share one private redis-server. A message typed in one page appears in the other,
// as text (markup in it is not interpreted). Then instance A is SIGKILLed, page B sends
// three messages, A is started again on the same address: page A reconnects, says it
// recovered 3 messages, and shows each once, in order. Run by run.sh, which starts the
// processes and passes A's pid and command line.
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import assert from "node:assert/strict";

const [urlA, urlB, pidA, bin, ...argsA] = process.argv.slice(2);
let restarted = null;
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
  console.log("browser: message typed on instance A appeared on instance B");

  // Instance A dies; B's page keeps talking; A comes back on the same address.
  process.kill(Number(pidA), "SIGKILL");
  await a.waitForFunction(() => document.getElementById("status").textContent.startsWith("reconnecting"),
                          null, { timeout: 15000 });
  const missed = ["while A was down 1", "while A was down 2", "while A was down 3"];
  for (const m of missed) {
    await b.fill("#text", m);
    await b.click("#send");
    await b.waitForFunction((t) => [...document.querySelectorAll("#messages li")].some((li) => li.textContent === t),
                            m, { timeout: 15000 });
  }
  restarted = spawn(bin, argsA, { stdio: "ignore" });
  await a.waitForFunction(() => document.getElementById("status").textContent.includes("recovered 3 messages"),
                          null, { timeout: 30000 });
  const shown = await a.$$eval("#messages li", (els) => els.map((e) => e.textContent));
  assert.deepEqual(shown.filter((t) => t.startsWith("while A was down")), missed,
                   "page A shows every message sent while its instance was down, once, in order");
  await a.screenshot({ path: process.env.SCREENSHOT || "/tmp/wsfan-chat.png" });
  console.log("browser: page A recovered the 3 messages sent while its instance was down");
} finally {
  await browser.close();
  if (restarted) restarted.kill("SIGKILL");
}
