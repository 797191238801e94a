#!/usr/bin/env node
// Builds dist/esm (ES modules + .d.ts, type-checked under strict) and
// dist/cjs (CommonJS, same sources, with the same declarations), then the
// tests into dist-test. The generated code in src/gen is built as is.
import { execFileSync } from 'node:child_process'
import { cpSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const pkg = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const tsc = join(pkg, 'node_modules', 'typescript', 'bin', 'tsc')
const run = (project) => {
  try {
    execFileSync(process.execPath, [tsc, '-p', project], { cwd: pkg, stdio: 'inherit' })
  } catch {
    console.error(`build: tsc -p ${project} failed`)
    process.exit(1)
  }
}

rmSync(join(pkg, 'dist'), { recursive: true, force: true })
rmSync(join(pkg, 'dist-test'), { recursive: true, force: true })
run('tsconfig.esm.json')
run('tsconfig.cjs.json')
writeFileSync(join(pkg, 'dist', 'cjs', 'package.json'), '{ "type": "commonjs" }\n')
// The declarations describe both builds; under dist/cjs they read as CommonJS.
cpSync(join(pkg, 'dist', 'esm'), join(pkg, 'dist', 'cjs'), {
  recursive: true,
  filter: (src) => !src.endsWith('.js') && !src.endsWith('.js.map') || isDir(src),
})
run('tsconfig.test.json')

function isDir(p) {
  try {
    readdirSync(p)
    return true
  } catch {
    return false
  }
}
