// The JS client's TypeScript declarations (clients/js/ferrocast.d.ts): a usage file compiles
// against them with the TypeScript compiler (`tsc --noEmit`, strict, the .d.ts itself checked
// too), its misuse lines are refused, and every name the declarations export is one the
// module exports at run time, and the other way round.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { promisify } from 'node:util';

import * as client from '../../clients/js/ferrocast.js';

const here = (path) => fileURLToPath(new URL(path, import.meta.url));

test('a usage file compiles against ferrocast.d.ts and its misuse is refused', { timeout: 60_000 }, async () => {
  const tsc = here('./node_modules/typescript/bin/tsc');
  const run = promisify(execFile)(process.execPath, [tsc, '-p', here('./types/tsconfig.json')], { timeout: 50_000 });
  const { stdout, stderr } = await run.catch((e) => e);
  assert.equal(`${stdout}${stderr}`.trim(), '', 'tsc --noEmit reported errors');
});

test('ferrocast.d.ts declares exactly what ferrocast.js exports', async () => {
  const dts = await readFile(here('../../clients/js/ferrocast.d.ts'), 'utf8');
  const declared = [...dts.matchAll(/^export (?:const|class|function) (\w+)/gm)].map((m) => m[1]).sort();
  assert.deepEqual(declared, Object.keys(client).sort());
  const start = dts.indexOf('export class Ferrocast {');
  const body = dts.slice(start, dts.indexOf('\n}\n', start));
  const methods = [...body.matchAll(/^ {2}(?:readonly )?(\w+)[(<:]/gm)]
    .map((m) => m[1])
    .filter((name) => name !== 'constructor')
    .sort();
  const actual = Object.getOwnPropertyNames(client.Ferrocast.prototype).filter((n) => n !== 'constructor').sort();
  assert.deepEqual(methods, actual);
});
