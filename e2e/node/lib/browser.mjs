// Debian's Chromium for the browser tests, driven by playwright-core: where it is, and how
// it is launched, shared by every suite that opens a page.
import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

/** Debian's Chromium (installed by scripts/test), or $FERROCAST_CHROMIUM. */
export const CHROMIUM = process.env.FERROCAST_CHROMIUM || '/usr/bin/chromium';

// The first three are the design's Chromium flags; the rest keep it off the network and quiet
// (no QUIC, first-run, component or sync traffic). Playwright gives each launch a fresh
// --user-data-dir.
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Why the browser tests cannot run here, or false when Chromium is installed. */
export function chromiumMissing() {
  return existsSync(CHROMIUM) ? false : `chromium not installed (${CHROMIUM}; apt-get install chromium)`;
}

/** Launches headless Chromium. */
export function launchChromium() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: 30000 });
}
