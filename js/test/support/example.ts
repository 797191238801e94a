/**
 * Runs a TypeScript example of the spec as written: the snippet is
 * transpiled (TypeScript's own transpiler, CommonJS) and run as the body of
 * an async function, so top-level `await` and `import Sandbox from
 * '@moru-ai/core'` work as in a user's module. The import resolves to this
 * package's CommonJS build (package self-reference); tests import the ESM
 * build, so both builds are exercised.
 *
 * Only ids change: the made-up "sbx_abc123..." becomes a real sandbox's id.
 * Variables an example uses but does not declare (it continues an earlier
 * one) come from `scope`; the names it declares are returned.
 */
import { createRequire } from 'node:module'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import ts from 'typescript'

export const PKG = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
export const REPO = resolve(PKG, '..')
const pkgRequire = createRequire(join(PKG, 'package.json'))
export const CjsSandbox = pkgRequire('@moru-ai/core').default
const FAKE_ID = '"sbx_abc123..."'

// eslint-disable-next-line @typescript-eslint/no-empty-function
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor as new (
  ...args: string[]
) => (...args: unknown[]) => Promise<Record<string, unknown>>

export interface ExampleRun {
  vars: Record<string, any>
  /** What the example printed with console.log, one entry per call. */
  logs: string[]
}

export async function runExample(
  code: string,
  opts: { scope?: Record<string, unknown>; sandboxId?: string } = {},
): Promise<ExampleRun> {
  let src = code
  if (opts.sandboxId !== undefined) src = src.split(FAKE_ID).join(JSON.stringify(opts.sandboxId))
  const js = ts.transpileModule(src, {
    compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022 },
  }).outputText
  const declared = [...src.matchAll(/^(?:const|let|var)\s+(\w+)/gm)].map((m) => m[1]!)
  const ret = `\nreturn { ${declared.map((n) => `${n}: typeof ${n} === 'undefined' ? undefined : ${n}`).join(', ')} }`
  const logs: string[] = []
  const console = { log: (...a: unknown[]) => logs.push(a.map(String).join(' ')) }
  const scope = { Sandbox: CjsSandbox, ...(opts.scope ?? {}) }
  const names = Object.keys(scope).filter((n) => !declared.includes(n))
  const fn = new AsyncFunction('require', 'exports', 'console', ...names, js + ret)
  const vars = await fn(pkgRequire, {}, console, ...names.map((n) => (scope as Record<string, unknown>)[n]))
  return { vars, logs }
}
