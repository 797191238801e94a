#!/usr/bin/env node
// Regenerates src/gen/ from ../proto with ts-proto (messages + @grpc/grpc-js
// clients), run through the venv's protoc (grpcio-tools). Never edit src/gen.
//
// Usage: node scripts/gen-proto.mjs [OUT_DIR]   (default: src/gen)
// test/proto-fresh.test.ts regenerates into a temporary dir and fails when
// the committed code differs.
import { execFileSync } from 'node:child_process'
import { readdirSync, rmSync, mkdirSync } from 'node:fs'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const pkg = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const protoDir = resolve(pkg, '..', 'proto')
const out = resolve(process.argv[2] ?? join(pkg, 'src', 'gen'))
const python = process.env.MORU_PYTHON ?? join(process.env.MORU_VENV ?? '/opt/moru/venv', 'bin', 'python')
const plugin = join(pkg, 'node_modules', '.bin', 'protoc-gen-ts_proto')

// ts-proto's settings; changing one regenerates everything.
const options = [
  'outputServices=grpc-js',
  'env=node',
  'esModuleInterop=true',
  'importSuffix=.js',
  'forceLong=number',
  'useDate=true',
]

function protoFiles(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? protoFiles(join(dir, e.name)) : e.name.endsWith('.proto') ? [join(dir, e.name)] : [],
  )
}

// google/protobuf/*.proto ship inside grpcio-tools.
const include = execFileSync(python, [
  '-c',
  'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))',
]).toString().trim()

rmSync(out, { recursive: true, force: true })
mkdirSync(out, { recursive: true })
const files = protoFiles(protoDir).sort().map((f) => relative(protoDir, f))
execFileSync(
  python,
  [
    '-m', 'grpc_tools.protoc',
    `--plugin=protoc-gen-ts_proto=${plugin}`,
    `-I${protoDir}`,
    `-I${include}`,
    `--ts_proto_out=${out}`,
    `--ts_proto_opt=${options.join(',')}`,
    ...files,
  ],
  { cwd: protoDir, stdio: 'inherit' },
)
console.log(`generated ${out}`)
