#!/usr/bin/env node
// The JS SDK's cost per call and stream throughput vs raw generated grpc-js
// calls of the same requests through hostd, measured in the same run on one
// running sandbox. Run by benchmarks/bench_sdk_js.py (which also measures the
// Python SDK on the same sandbox); needs `npm run build` first.
//
// Usage: MORU_HOSTD=... MORU_API_KEY=... node bench/bench-sdk.mjs SANDBOX_ID [RUNS] [MB] [ROUNDS]
import { randomBytes } from 'node:crypto'
import Sandbox, { ConnectionConfig, closeClients } from '../dist/esm/index.js'
import { ProcessClient, StartRequest } from '../dist/esm/gen/moru_proto/guest/v1/process.js'
import { FilesystemClient, ReadRequest, WriteRequest } from '../dist/esm/gen/moru_proto/guest/v1/filesystem.js'
import { SandboxServiceClient } from '../dist/esm/gen/moru_proto/host/v1/sandbox.js'

const [sandboxId, runsArg = '12', mbArg = '50', roundsArg = '3'] = process.argv.slice(2)
const runs = Number(runsArg)
const mb = Number(mbArg)
const rounds = Number(roundsArg)
const CHUNK = 1 << 20
const config = ConnectionConfig.resolve()
const opts = { 'grpc.max_receive_message_length': -1, 'grpc.max_send_message_length': -1 }
const hostd = new SandboxServiceClient(config.address, config.credentials(), opts)
const proc = new ProcessClient(config.address, config.credentials(), opts)
const fs = new FilesystemClient(config.address, config.credentials(), opts)
const info = await new Promise((res, rej) =>
  hostd.get({ sandboxId }, config.metadata(), (e, r) => (e ? rej(e) : res(r))),
)
const md = () => config.metadata(sandboxId, info.accessToken || undefined)
const sbx = await Sandbox.connect(sandboxId)

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
async function medianTime(fn, n, warmup) {
  for (let i = 0; i < warmup; i++) await fn()
  const out = []
  for (let i = 0; i < n; i++) {
    const t0 = performance.now()
    await fn()
    out.push((performance.now() - t0) / 1000)
  }
  return median(out)
}

const startReq = StartRequest.fromPartial({ config: { shell: 'true' }, timeoutSeconds: 60 })
async function rawRun() {
  for await (const ev of proc.start(startReq, md())) {
    if (ev.end) {
      if (ev.end.exitCode !== 0) throw new Error('exit code')
      return
    }
  }
  throw new Error('no end event')
}
const sdkRun = () => sbx.commands.run('true')

let ok = true
const rawT = []
const sdkT = []
for (let i = 0; i < 3; i++) {
  rawT.push(await medianTime(rawRun, Math.floor(runs / 3) || 1, 2))
  sdkT.push(await medianTime(sdkRun, Math.floor(runs / 3) || 1, 2))
}
const rawRt = median(rawT)
const sdkRt = median(sdkT)
const ratio = sdkRt / rawRt
ok &&= ratio <= 1.2
console.log(
  `JS commands.run('true'): SDK ${(sdkRt * 1000).toFixed(2)} ms  raw grpc-js Process/Start ${(rawRt * 1000).toFixed(2)} ms  ` +
    `ratio ${ratio.toFixed(3)} (floor: <= 1.2) ${ratio <= 1.2 ? 'OK' : 'FAIL'}`,
)

const size = mb << 20
const data = new Uint8Array(randomBytes(size))
const path = '/tmp/bench-js.bin'
function rawWrite() {
  return new Promise((resolve, reject) => {
    const call = fs.write(md(), (e) => (e ? reject(e) : resolve()))
    const send = async () => {
      const put = (m) => new Promise((r) => (call.write(m) ? r() : call.once('drain', r)))
      await put(WriteRequest.fromPartial({ header: { path } }))
      for (let i = 0; i < size; i += CHUNK) {
        await put(WriteRequest.fromPartial({ data: Buffer.from(data.buffer, data.byteOffset + i, Math.min(CHUNK, size - i)) }))
      }
      call.end()
    }
    send().catch(reject)
  })
}
const sdkWrite = () => sbx.files.write(path, data)
async function rawRead() {
  let n = 0
  for await (const msg of fs.read(ReadRequest.fromPartial({ path }), md())) n += msg.data.length
  if (n !== size) throw new Error(`read ${n}`)
}
async function sdkRead() {
  const b = await sbx.files.read(path, { format: 'bytes' })
  if (b.length !== size) throw new Error(`read ${b.length}`)
}

for (const [name, rawFn, sdkFn] of [
  ['upload', rawWrite, sdkWrite],
  ['download', rawRead, sdkRead],
]) {
  const rawS = []
  const sdkS = []
  for (let i = 0; i < rounds; i++) {
    rawS.push(await medianTime(rawFn, 1, 0))
    sdkS.push(await medianTime(sdkFn, 1, 0))
    console.log(`  JS ${name}: raw ${rawS.at(-1).toFixed(2)} s, SDK ${sdkS.at(-1).toFixed(2)} s`)
  }
  const rawMbs = mb / median(rawS)
  const sdkMbs = mb / median(sdkS)
  const r = sdkMbs / rawMbs
  ok &&= r >= 0.8
  console.log(
    `JS files ${name} ${mb} MiB: SDK ${sdkMbs.toFixed(1)} MiB/s  raw grpc-js Filesystem RPC ${rawMbs.toFixed(1)} MiB/s  ` +
      `ratio ${r.toFixed(3)} (floor: >= 0.8) ${r >= 0.8 ? 'OK' : 'FAIL'}`,
  )
}
await sbx.files.remove(path)
for (const c of [hostd, proc, fs]) c.close()
closeClients()
process.exit(ok ? 0 : 1)
