/**
 * The SDK beyond the spec's examples: streaming callbacks, background
 * commands reconnected by pid, 20 MB files by hash, the file API, errors,
 * paging through Sandbox.list(). Reuses the sandboxes the examples made.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import Sandbox, {
  AuthenticationError,
  CommandExitError,
  ConnectionError,
  InvalidArgumentError,
  NotFoundError,
  NotFoundException,
  SandboxError,
  FailedPreconditionError,
  Volume,
  TimeoutError,
  type FilesystemEvent,
} from '@moru-ai/core'
import { made } from './support/state.js'

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex')

async function until<T>(what: string, f: () => T | Promise<T>, limitMs = 60_000): Promise<T> {
  const end = Date.now() + limitMs
  for (;;) {
    const v = await f()
    if (v) return v
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 100))
  }
}

/** The shared base sandbox through the ESM build (the examples made it with the CJS one). */
let sbx: Sandbox
async function base(): Promise<Sandbox> {
  sbx ??= await Sandbox.connect(made.base!.sandboxId)
  return sbx
}

export function features(): void {
  test('list: for await pages through many sandboxes; metadata filters', async () => {
    const ids = Object.values(made).map((s) => s.sandboxId)
    assert.ok(ids.length >= 5, `${ids.length} sandboxes`)
    const seen: string[] = []
    for await (const info of Sandbox.list({ limit: 2 })) seen.push(info.sandboxId)
    assert.deepEqual([...seen].sort(), [...ids].sort())
    const pages = Sandbox.list({ limit: 2 })
    let n = 0
    while (pages.hasNext) n += (await pages.nextItems()).length >= 0 ? 1 : 0
    assert.ok(n >= 3, `${n} pages of 2`)
    const mine: string[] = []
    for await (const info of Sandbox.list({ metadata: { project: 'my-agent' } })) mine.push(info.sandboxId)
    assert.deepEqual(mine, [made.options!.sandboxId])
    for await (const info of Sandbox.list({ metadata: { project: 'nobody' } })) assert.fail(`unexpected ${info.sandboxId}`)
  })

  test('commands: output streams to callbacks while the command runs', async () => {
    const s = await base()
    const out: string[] = []
    const err: string[] = []
    const handle = await s.commands.run(
      'echo first; echo oops >&2; while [ ! -f /tmp/js-go ]; do sleep 0.1; done; echo second',
      { background: true, onStdout: (d) => void out.push(d), onStderr: (d) => void err.push(d), timeoutMs: 0 },
    )
    await until('first output', () => out.join('').includes('first\n') && err.join('') === 'oops\n')
    assert.equal(handle.exitCode, undefined, 'still running')
    await s.files.write('/tmp/js-go', '')
    const result = await handle.wait()
    assert.equal(result.stdout, 'first\nsecond\n')
    assert.equal(out.join(''), result.stdout)
    assert.equal(result.stderr, 'oops\n')
    assert.equal(result.exitCode, 0)
    const fg: string[] = []
    const r = await s.commands.run('seq 1 3', { onStdout: (d) => void fg.push(d), envs: { X: '1' }, cwd: '/tmp' })
    assert.equal(fg.join(''), '1\n2\n3\n')
    assert.equal(r.stdout, '1\n2\n3\n')
    assert.equal((await s.commands.run('echo $MY_VAR; pwd', { envs: { MY_VAR: 'Hello' }, cwd: '/tmp' })).stdout, 'Hello\n/tmp\n')
  })

  test('commands: a background command is reconnected by pid', async () => {
    const s = await base()
    const handle = await s.commands.run('for i in 1 2 3 4 5; do echo tick$i; sleep 0.3; done', {
      background: true,
      timeoutMs: 0,
    })
    const pid = handle.pid
    assert.ok((await s.commands.list()).some((p) => p.pid === pid))
    await handle.disconnect()
    const seen: string[] = []
    const again = await s.commands.connect(pid, { onStdout: (d) => void seen.push(d) })
    const result = await again.wait()
    assert.equal(result.stdout, 'tick1\ntick2\ntick3\ntick4\ntick5\n')
    assert.equal(seen.join(''), result.stdout)
    // stdin and kill through the handle and by pid.
    const reader = await s.commands.run('read line; echo got:$line', { background: true, stdin: true })
    await reader.sendStdin('hello\n')
    assert.equal((await reader.wait()).stdout, 'got:hello\n')
    const sleeper = await s.commands.run('sleep 600', { background: true, timeoutMs: 0 })
    assert.equal(await s.commands.kill(sleeper.pid), true)
    await assert.rejects(sleeper.wait(), CommandExitError)
    assert.equal(await s.commands.kill(sleeper.pid), false)
  })

  test('files: 20 MB up and down, compared by hash', async () => {
    const s = await base()
    const data = new Uint8Array(randomBytes(20 * 1024 * 1024))
    const entry = await s.files.write('/tmp/js-big.bin', data)
    assert.equal(entry.size, data.length)
    assert.equal((await s.commands.run('sha256sum /tmp/js-big.bin')).stdout.split(' ')[0], sha256(data))
    assert.equal(sha256(await s.files.read('/tmp/js-big.bin', { format: 'bytes' })), sha256(data))
    const h = createHash('sha256')
    let total = 0
    const stream = await s.files.read('/tmp/js-big.bin', { format: 'stream' })
    for await (const chunk of stream as unknown as AsyncIterable<Uint8Array>) {
      h.update(chunk)
      total += chunk.length
    }
    assert.equal(total, data.length)
    assert.equal(h.digest('hex'), sha256(data))
    // A ReadableStream and a Blob upload the same way.
    const third = data.subarray(0, 7 * 1024 * 1024 + 13)
    const rs = new ReadableStream<Uint8Array>({
      start(c) {
        for (let i = 0; i < third.length; i += 300_000) c.enqueue(third.subarray(i, i + 300_000))
        c.close()
      },
    })
    await s.files.write('/tmp/js-rs.bin', rs)
    assert.equal(sha256(await s.files.read('/tmp/js-rs.bin', { format: 'bytes' })), sha256(third))
    await s.files.write('/tmp/js-blob.txt', new Blob(['héllo ', 'blob']))
    assert.equal(await s.files.read('/tmp/js-blob.txt'), 'héllo blob')
    await s.files.remove('/tmp/js-big.bin')
  })

  test('files: list, exists, getInfo, rename, makeDir, remove, watchDir', async () => {
    const s = await base()
    assert.equal(await s.files.makeDir('/tmp/js-dir/sub'), true)
    assert.equal(await s.files.makeDir('/tmp/js-dir/sub'), false)
    const events: FilesystemEvent[] = []
    const watch = await s.files.watchDir('/tmp/js-dir', (e) => void events.push(e))
    await s.files.write('/tmp/js-dir/a.txt', 'abc')
    await until('a create event', () => events.some((e) => e.name === 'a.txt' && e.type === 'create'))
    await watch.stop()
    const info = await s.files.getInfo('/tmp/js-dir/a.txt')
    assert.equal(info.type, 'file')
    assert.equal(info.size, 3)
    assert.ok(info.modifiedTime instanceof Date)
    const moved = await s.files.rename('/tmp/js-dir/a.txt', '/tmp/js-dir/b.txt')
    assert.equal(moved.path, '/tmp/js-dir/b.txt')
    const names = (await s.files.list('/tmp/js-dir')).map((e) => `${e.name}:${e.type}`).sort()
    assert.deepEqual(names, ['b.txt:file', 'sub:dir'])
    assert.equal(await s.files.exists('/tmp/js-dir/a.txt'), false)
    assert.equal(await s.files.exists('/tmp/js-dir/b.txt'), true)
    await s.files.remove('/tmp/js-dir')
    assert.equal(await s.files.exists('/tmp/js-dir'), false)
  })

  test('errors: one class per gRPC status, all SandboxError', async () => {
    const s = await base()
    const cases: [() => Promise<unknown>, new (...a: never[]) => Error, string][] = [
      [() => Sandbox.connect('sbx_aaaaaaaaaaaaaaaaaaaa'), NotFoundError, 'NOT_FOUND'],
      [() => Sandbox.create('my-template'), NotFoundError, 'NOT_FOUND'],
      [() => s.files.read('/no/such/file'), NotFoundError, 'NOT_FOUND'],
      [() => s.files.read('relative/path'), InvalidArgumentError, 'INVALID_ARGUMENT'],
      [() => Sandbox.getInfo(s.sandboxId, { apiKey: 'wrong-key' }), AuthenticationError, 'UNAUTHENTICATED'],
      [() => Sandbox.list({ hostd: 'unix:/nonexistent/moru.sock' }).nextItems(), ConnectionError, 'UNAVAILABLE'],
      [() => s.commands.run('sleep 30', { timeoutMs: 1000 }), TimeoutError, ''],
    ]
    for (const [p, cls, code] of cases) {
      const e = await p().then(
        () => assert.fail(`expected ${cls.name}`),
        (e: unknown) => e,
      )
      assert.ok(e instanceof cls, `${String(e)} is a ${cls.name}`)
      assert.ok(e instanceof SandboxError)
      if (code) assert.equal((e as SandboxError).code, code)
    }
    assert.equal(NotFoundException, NotFoundError, "the Python SDK's name is the same class")
    const exit = await s.commands.run('echo out; echo err >&2; exit 3').catch((e: unknown) => e)
    assert.ok(exit instanceof CommandExitError)
    assert.equal(exit.exitCode, 3)
    assert.equal(exit.stdout, 'out\n')
    assert.equal(exit.stderr, 'err\n')
  })

  test('volumes: list, get, attached, delete refused while mounted', async () => {
    const mounted = made.options!.sandboxId
    const vol = (await Volume.list()).find((v) => v.attachedTo === mounted)
    assert.ok(vol, 'the create-with-options example mounted a volume')
    const got = await Volume.get(vol.volumeId)
    assert.equal(got.name, 'js-spec-example')
    assert.equal(got.sizeMB, 64)
    assert.ok(got.createdAt instanceof Date)
    await assert.rejects(Volume.delete(vol.volumeId), FailedPreconditionError)
    await assert.rejects(Volume.get('vol_doesnotexist'), (e: unknown) => e instanceof NotFoundError || e instanceof InvalidArgumentError)
    await assert.rejects(Volume.create('x', 0), InvalidArgumentError)
  })

  test('metrics, host, set timeout, pause and resume', async () => {
    const s = await base()
    const metrics = (await until('a metrics sample', () => s.getMetrics().then((m) => (m.length ? m : undefined))))!
    assert.ok(metrics[0]!.memTotal > 0 && metrics[0]!.timestamp instanceof Date)
    assert.ok((await s.getHost(8080)).startsWith(`8080-${s.sandboxId}.`))
    await Sandbox.setTimeout(s.sandboxId, 1_200_000)
    const left = ((await s.getInfo()).endAt.getTime() - Date.now()) / 1000
    assert.ok(left > 1100 && left <= 1200, `${left} s`)
    const py = await Sandbox.connect(made.python!.sandboxId)
    await py.files.write('/data/important.txt', 'Preserve this!')
    await py.betaPause()
    assert.equal((await py.getInfo()).state, 'paused')
    assert.equal(await py.isRunning(), false)
    const back = await Sandbox.connect(py.sandboxId)
    assert.equal(await back.isRunning(), true)
    assert.equal(await back.files.read('/data/important.txt'), 'Preserve this!')
  })
}
