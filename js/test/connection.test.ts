// Where the SDK finds hostd: options, then MORU_* environment, then defaults;
// and both builds export the same surface (default export Sandbox).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'
import { join } from 'node:path'
import * as esm from '@moru-ai/core'
import { ConnectionConfig, DEFAULT_HOSTD } from '@moru-ai/core'
import { PKG } from './support/example.js'

function withEnv<T>(env: Record<string, string | undefined>, f: () => T): T {
  const old = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]))
  for (const [k, v] of Object.entries(env)) v === undefined ? delete process.env[k] : (process.env[k] = v)
  try {
    return f()
  } finally {
    for (const [k, v] of Object.entries(old)) v === undefined ? delete process.env[k] : (process.env[k] = v)
  }
}

test('hostd address and key: option, then environment, then default', () => {
  const none = { MORU_HOSTD: undefined, MORU_API_KEY: undefined, MORU_HOSTD_TLS: undefined }
  withEnv(none, () => {
    const c = ConnectionConfig.resolve()
    assert.equal(c.address, DEFAULT_HOSTD)
    assert.equal(c.apiKey, undefined)
    assert.equal(c.tls, false)
    assert.equal(c.metadata().get('authorization').length, 0)
  })
  withEnv({ ...none, MORU_HOSTD: '/run/x.sock', MORU_API_KEY: 'k1' }, () => {
    const c = ConnectionConfig.resolve()
    assert.equal(c.address, 'unix:/run/x.sock')
    assert.deepEqual(c.metadata('sbx_1', 'tok').getMap(), {
      authorization: 'Bearer k1',
      'sandbox-id': 'sbx_1',
      'x-moru-access-token': 'tok',
    })
    const o = ConnectionConfig.resolve({ hostd: 'https://node1:7443', apiKey: 'k2' })
    assert.deepEqual([o.address, o.tls, o.apiKey], ['node1:7443', true, 'k2'])
  })
  withEnv({ ...none, MORU_HOSTD: 'node2:7443', MORU_HOSTD_TLS: '1' }, () => {
    const c = ConnectionConfig.resolve()
    assert.deepEqual([c.address, c.tls], ['node2:7443', true])
    assert.equal(c.unaryOptions(0).deadline, undefined, 'no deadline when 0')
  })
})

test('ESM and CommonJS builds export the same names; default export is Sandbox', () => {
  const cjs = createRequire(join(PKG, 'package.json'))('@moru-ai/core') as Record<string, unknown>
  assert.deepEqual(Object.keys(cjs).filter((k) => k !== '__esModule').sort(), Object.keys(esm).sort())
  assert.equal(esm.default, esm.Sandbox)
  assert.equal(cjs.default, cjs.Sandbox)
  assert.equal(esm.SandboxException, esm.SandboxError)
})

test('a status hostd raises itself is not blamed on the connection', async () => {
  // A stand-in for hostd (grpc-js server, no VM) that answers List the way
  // hostd answers a failed pause: UNAVAILABLE with its `moru-status-from` trailer.
  const grpc = await import('@grpc/grpc-js')
  const server = new grpc.Server()
  const raw = (b: Buffer) => b
  server.addService(
    {
      List: {
        path: '/moru.host.v1.SandboxService/List',
        requestStream: false,
        responseStream: false,
        requestSerialize: raw,
        requestDeserialize: raw,
        responseSerialize: raw,
        responseDeserialize: raw,
      },
    },
    {
      List: (_call: unknown, callback: (e: Partial<import('@grpc/grpc-js').StatusObject>) => void) => {
        const md = new grpc.Metadata()
        md.set('moru-status-from', 'hostd')
        callback({ code: grpc.status.UNAVAILABLE, details: 'the node is draining', metadata: md })
      },
    },
  )
  const port = await new Promise<number>((ok, fail) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? fail(e) : ok(p))),
  )
  try {
    const page = esm.default.list({ hostd: `127.0.0.1:${port}`, requestTimeoutMs: 10_000 })
    await assert.rejects(page.nextItems(), (e: unknown) => {
      assert.ok(e instanceof esm.ConnectionError, `got ${String(e)}`)
      assert.match(e.message, /draining/)
      assert.doesNotMatch(e.message, /moru-hostd serve/)
      return true
    })
  } finally {
    server.forceShutdown()
  }
})
