// The committed src/gen is exactly what `npm run gen` makes from ../proto.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, relative } from 'node:path'
import { PKG } from './support/example.js'

function tree(root: string, dir = root): Map<string, string> {
  const out = new Map<string, string>()
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name)
    if (e.isDirectory()) for (const [k, v] of tree(root, p)) out.set(k, v)
    else out.set(relative(root, p), readFileSync(p, 'utf8'))
  }
  return out
}

test('generated protocol code is fresh', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'moru-js-gen-'))
  try {
    execFileSync(process.execPath, [join(PKG, 'scripts', 'gen-proto.mjs'), tmp], { stdio: 'pipe' })
    const fresh = tree(tmp)
    const committed = tree(join(PKG, 'src', 'gen'))
    assert.deepEqual([...committed.keys()].sort(), [...fresh.keys()].sort(), 'files differ: run `npm run gen`')
    const stale = [...fresh.keys()].filter((k) => fresh.get(k) !== committed.get(k))
    assert.deepEqual(stale, [], 'stale generated code: run `npm run gen`')
  } finally {
    rmSync(tmp, { recursive: true, force: true })
  }
})
