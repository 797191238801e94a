#!/usr/bin/env node
// Runs the JS SDK's tests (dist-test/test/*.test.js, built by `npm run build`)
// against a real hostd booting real sandboxes: tests/sdk/serve_hostd.py starts
// one for this run (own socket and state dir, shared image cache) and removes
// everything it made when its stdin closes. The tests find it the way users'
// code does: MORU_HOSTD and MORU_API_KEY. Exit status: the test runner's, or
// non-zero when the hostd helper failed or left something behind.
//
// Usage: node scripts/test.mjs [TEST_FILE_SUBSTRING...]
import { spawn } from 'node:child_process'
import { readdirSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

const pkg = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const repo = resolve(pkg, '..')
const python = process.env.MORU_PYTHON ?? join(process.env.MORU_VENV ?? '/opt/moru/venv', 'bin', 'python')
const filters = process.argv.slice(2)
const testDir = join(pkg, 'dist-test', 'test')
const files = readdirSync(testDir)
  .filter((f) => f.endsWith('.test.js') && (filters.length === 0 || filters.some((s) => f.includes(s))))
  .sort()
  .map((f) => join(testDir, f))

const helper = spawn(python, [join(repo, 'tests', 'sdk', 'serve_hostd.py')], {
  cwd: repo,
  env: { ...process.env, PYTHONPATH: [repo, process.env.PYTHONPATH].filter(Boolean).join(':') },
  stdio: ['pipe', 'pipe', 'inherit'],
})
const helperExit = new Promise((res) => helper.on('exit', (code, sig) => res(code ?? (sig ? 1 : 0))))
const first = await new Promise((res) => {
  const rl = createInterface({ input: helper.stdout })
  rl.once('line', (line) => res(line))
  helper.once('exit', () => res(undefined))
})
if (!first) {
  console.error('scripts/test.mjs: the test hostd did not start (see its output above)')
  process.exit(1)
}
const { hostd, api_key: apiKey } = JSON.parse(first)
console.error(`scripts/test.mjs: test hostd at ${hostd}`)

// The VM tests are one file (vm.test.ts) so they share booted sandboxes.
const runner = spawn(process.execPath, ['--test', ...files], {
  cwd: pkg,
  env: { ...process.env, MORU_HOSTD: hostd, MORU_API_KEY: apiKey },
  stdio: 'inherit',
})
const stopRunner = () => runner.kill('SIGTERM')
process.on('SIGINT', stopRunner)
process.on('SIGTERM', stopRunner)
const testsCode = await new Promise((res) => runner.on('exit', (code, sig) => res(code ?? (sig ? 1 : 0))))
helper.stdin.end()
const hostdCode = await helperExit
if (hostdCode !== 0) console.error(`scripts/test.mjs: the test hostd helper failed (exit ${hostdCode})`)
process.exit(testsCode !== 0 ? testsCode : hostdCode)
