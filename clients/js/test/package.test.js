// The npm package: `npm pack --dry-run` ships the module, its types and README, never the tests.
import test from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const manifest = JSON.parse(readFileSync(path.join(PACKAGE_DIR, 'package.json'), 'utf8'));

test('npm pack lists ferrocast.js, ferrocast.d.ts, README.md and package.json, and no test file', () => {
  // --ignore-scripts: packing must not run anything; the cache goes to a throwaway place.
  const out = execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], {
    cwd: PACKAGE_DIR,
    encoding: 'utf8',
    env: { ...process.env, npm_config_loglevel: 'silent', npm_config_update_notifier: 'false' },
    timeout: 30_000,
  });
  const [report] = JSON.parse(out);
  const files = report.files.map((f) => f.path).sort();
  assert.deepEqual(files, ['README.md', 'ferrocast.d.ts', 'ferrocast.js', 'package.json']);
  assert.ok(!files.some((f) => f.startsWith('test/')), files.join(', '));
  assert.equal(report.name, manifest.name);
  assert.equal(report.version, '0.1.0');
});

test('the manifest is fit for publishing: ESM, exports with types, license, engines, repository', () => {
  assert.equal(manifest.type, 'module');
  assert.equal(manifest.license, 'Apache-2.0');
  assert.equal(manifest.sideEffects, false);
  assert.ok(manifest.engines?.node, 'engines.node');
  assert.ok(manifest.repository?.url, 'repository');
  assert.equal(manifest.types, './ferrocast.d.ts');
  assert.deepEqual(manifest.exports, { '.': { types: './ferrocast.d.ts', default: './ferrocast.js' } });
  assert.ok(manifest.files.includes('ferrocast.js') && manifest.files.includes('ferrocast.d.ts'));
});

test('the package resolves by its own name to the module that exports the client', async () => {
  // Self-reference through "exports" works only when the name and exports map are right.
  const url = import.meta.resolve(`${manifest.name}`);
  assert.equal(fileURLToPath(url), path.join(PACKAGE_DIR, 'ferrocast.js'));
  const mod = await import(manifest.name);
  assert.equal(typeof mod.Ferrocast, 'function');
});
