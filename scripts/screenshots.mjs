// Screenshots of TensorBoard's dashboards with Playwright: node screenshots.mjs URL OUTDIR.
// Called by scripts/screenshots.sh, which starts TensorBoard and installs playwright-core.
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(path.join(process.env.PW_DIR || '/tmp/pw', 'node_modules', 'x.js'));
const { chromium } = require('playwright-core');
const [url, outdir] = process.argv.slice(2);

// The classic Scalars dashboard, filtered to the train/ and val/ groups: one expanded grid,
// 3 charts a row at 1500 px (without a filter only the first two groups, alphabetically
// hparams/ and perf/, are open; the Time Series dashboard is no better, with bigger cards).
// On Images and Text a filter would show each card twice (in its group and in the matches),
// so they get none.
// Playwright's CSS selectors reach into shadow roots.
const lines = 'vz-line-chart2 path.line:visible';
const dashboards = [
  { name: 'scalars', hash: 'scalars&tagFilter=^(train|val)/', ready: lines },
  // One eval figure at its own size: at the card's width a 15-column figure is unreadable.
  { name: 'images', hash: 'images&tagFilter=test-16/median', width: 2600, ready: 'tf-image-loader img:visible', then: actualSize },
  { name: 'custom_scalars', hash: 'custom_scalars', ready: lines },
  { name: 'hparams', hash: 'hparams', ready: 'tf-hparams-table-view vaadin-grid:visible' },
  { name: 'text', hash: 'text', ready: 'tf-text-loader:visible' },
];
// Images are shrunk to the card's width (about 330 px); show them 1:1 where they fit.
async function actualSize(page) {
  const widths = await page.locator('tf-image-loader img').evaluateAll((imgs) => imgs.map((i) => i.naturalWidth));
  if (Math.max(...widths) <= page.viewportSize().width - 300) await page.getByText('Show actual image size').click();
}
const spinners = 'paper-spinner-lite[active]:visible, mat-spinner:visible, mat-progress-spinner:visible';
const TIMEOUT = 60_000;

const plugins = await (await fetch(new URL('data/plugins_listing', url))).json();
const runs = await (await fetch(new URL('data/runs', url))).json();
if (runs.length === 0) {
  console.error('screenshots: TensorBoard found no runs (no event files) in the log folder');
  process.exit(1);
}

// Playwright starts Chromium with a new, empty, temporary --user-data-dir of its own.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  handleSIGINT: false, handleSIGTERM: false, handleSIGHUP: false,
});
// On a signal, exit at once: Playwright's exit hook kills Chromium and deletes its profile.
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(sig, () => process.exit(130));
let failed = false;
try {
  for (const d of dashboards) {
    if (!plugins[d.name]?.enabled) {
      console.error(`screenshots: skipped ${d.name}: TensorBoard has no ${d.name} data in this log folder`);
      continue;
    }
    const t0 = Date.now();
    const page = await browser.newPage({ viewport: { width: d.width || 1500, height: 900 } });
    // Requests in flight, to wait for the dashboard's data requests to settle.
    let inflight = 0, changed = Date.now();
    const track = (k) => () => { inflight += k; changed = Date.now(); };
    page.on('request', track(1));
    page.on('requestfinished', track(-1));
    page.on('requestfailed', track(-1));
    const settle = async (quietMs = 500) => {
      const deadline = Date.now() + TIMEOUT;
      while (inflight > 0 || Date.now() - changed < quietMs) {
        if (Date.now() > deadline) throw new Error(`requests still in flight after ${TIMEOUT / 1000} s`);
        await page.waitForTimeout(100);
      }
    };
    const file = path.join(outdir, `${d.name}.png`);
    try {
      await page.goto(`${url}#${d.hash}`, { waitUntil: 'networkidle', timeout: TIMEOUT });
      await page.locator(d.ready).first().waitFor({ timeout: TIMEOUT });
      await settle();
      await page.locator(spinners).first().waitFor({ state: 'hidden', timeout: TIMEOUT });
      await page.locator('img').evaluateAll((imgs) => Promise.all(imgs.map((i) => i.decode().catch(() => {}))));
      if (d.then) await d.then(page);
      await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    } catch (e) {
      failed = true;
      console.error(`screenshots: ${d.name} did not finish rendering (${e.message.split('\n')[0]}); screenshot taken anyway`);
    }
    await page.screenshot({ path: file });
    console.error(`screenshots: wrote ${file} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    await page.close();
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
