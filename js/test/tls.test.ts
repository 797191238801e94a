// hostd's TCP listener is TLS-only with an API key: the SDK reaches it with
// MORU_HOSTD=host:port, MORU_HOSTD_TLS, MORU_HOSTD_CA (or `https://` / `tls`).
// scripts/test.mjs gives the test hostd such a listener on 127.0.0.1, with a
// CA made for this run (MORU_TEST_TLS_*). No VM is booted: Sandbox.list only.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import Sandbox, { AuthenticationError, ConnectionError, type SandboxListOpts } from '@moru-ai/core'

const ADDRESS = process.env.MORU_TEST_TLS_HOSTD ?? ''
const CA = process.env.MORU_TEST_TLS_CA ?? ''
const OTHER_CA = process.env.MORU_TEST_TLS_OTHER_CA ?? ''
const KEY = process.env.MORU_API_KEY ?? ''
// A hang would otherwise look like the runner's own timeout.
const BOUNDED = { requestTimeoutMs: 60_000 }

/** The first page of Sandbox.list, with `env` as the caller's environment while the SDK reads it. */
function firstPage(env: Record<string, string | undefined>, opts: SandboxListOpts = {}) {
  const old = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]))
  for (const [k, v] of Object.entries(env)) v === undefined ? delete process.env[k] : (process.env[k] = v)
  try {
    return Sandbox.list({ ...BOUNDED, ...opts })
  } finally {
    for (const [k, v] of Object.entries(old)) v === undefined ? delete process.env[k] : (process.env[k] = v)
  }
}

test('the TLS listener is configured (run through scripts/test.mjs)', () => {
  assert.match(ADDRESS, /^127\.0\.0\.1:\d+$/)
  assert.ok(CA && OTHER_CA && KEY, 'MORU_TEST_TLS_CA, MORU_TEST_TLS_OTHER_CA and MORU_API_KEY are set')
})

test('the right key over TLS works: from the environment, and as https:// with apiKey', async () => {
  const env = { MORU_HOSTD: ADDRESS, MORU_HOSTD_TLS: '1', MORU_HOSTD_CA: CA, MORU_API_KEY: KEY }
  const items = await firstPage(env).nextItems()
  assert.ok(Array.isArray(items))
  const again = await firstPage(
    { MORU_HOSTD: undefined, MORU_HOSTD_TLS: undefined, MORU_HOSTD_CA: CA, MORU_API_KEY: undefined },
    { hostd: `https://${ADDRESS}`, apiKey: KEY },
  ).nextItems()
  assert.ok(Array.isArray(again))
})

test('a wrong key over TLS is an AuthenticationError', async () => {
  const env = { MORU_HOSTD: ADDRESS, MORU_HOSTD_TLS: '1', MORU_HOSTD_CA: CA, MORU_API_KEY: KEY }
  await assert.rejects(firstPage(env, { apiKey: `${KEY}-wrong` }).nextItems(), (e: unknown) => {
    assert.ok(e instanceof AuthenticationError, `got ${String(e)}`)
    assert.equal(e.code, 'UNAUTHENTICATED')
    return true
  })
  await assert.rejects(firstPage({ ...env, MORU_API_KEY: undefined }).nextItems(), AuthenticationError)
})

test('a server certificate from a CA the client does not trust fails, saying so', async () => {
  const env = { MORU_HOSTD: ADDRESS, MORU_HOSTD_TLS: '1', MORU_HOSTD_CA: OTHER_CA, MORU_API_KEY: KEY }
  await assert.rejects(firstPage(env).nextItems(), (e: unknown) => {
    assert.ok(e instanceof ConnectionError, `got ${String(e)}`)
    assert.equal(e.code, 'UNAVAILABLE')
    assert.match(e.message, /certificate/i)
    assert.match(e.message, /MORU_HOSTD_CA/)
    return true
  })
})
