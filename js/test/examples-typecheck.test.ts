// Every TypeScript example of the spec type-checks under `strict` against
// the published declarations (dist/esm/index.d.ts via '@moru-ai/core'), as
// an ES module. An example that continues an earlier one gets a declared
// `sandbox`; one without an import gets the default import.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { join } from 'node:path'
import ts from 'typescript'
import { PKG } from './support/example.js'
import { SNIPPETS, type Snippet } from './support/spec-snippets.js'

test('spec examples type-check under strict', () => {
  const files = new Map<string, string>()
  for (const [name, s] of Object.entries(SNIPPETS) as [string, Snippet][]) {
    const prelude = [
      s.code.includes("from '@moru-ai/core'") ? '' : "import Sandbox from '@moru-ai/core'",
      ...(s.uses ?? []).map((v) => `declare const ${v}: Sandbox`),
    ].join('\n')
    files.set(join(PKG, 'test', `spec-${name}.example.mts`), `${prelude}\n${s.code}\nexport {}\n`)
  }
  const options: ts.CompilerOptions = {
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    lib: ['lib.es2022.d.ts', 'lib.dom.d.ts'],
    types: ['node'],
    strict: true,
    skipLibCheck: true,
    noEmit: true,
  }
  const host = ts.createCompilerHost(options)
  const { getSourceFile, fileExists, readFile } = host
  host.fileExists = (f) => files.has(f) || fileExists.call(host, f)
  host.readFile = (f) => files.get(f) ?? readFile.call(host, f)
  host.getSourceFile = (f, lang, ...rest) =>
    files.has(f) ? ts.createSourceFile(f, files.get(f)!, lang, true) : getSourceFile.call(host, f, lang, ...rest)
  const program = ts.createProgram([...files.keys()], options, host)
  const problems = ts
    .getPreEmitDiagnostics(program)
    .map((d) => `${d.file?.fileName ?? ''}: ${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`)
  assert.deepEqual(problems, [])
})
