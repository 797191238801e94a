/**
 * Every TypeScript example of the spec (sandbox-operations.md), run as
 * written (see support/example.ts). The sandboxes they create are kept in
 * `made` for the tests after them.
 */
import { test } from 'node:test'
import assert from 'node:assert/strict'
import Sandbox, { Volume } from '@moru-ai/core'
import { runExample } from './support/example.js'
import { SNIPPETS } from './support/spec-snippets.js'
import { made, remember } from './support/state.js'

export function specExamples(): void {
  test('spec: create, default template', async () => {
    const { vars } = await runExample(SNIPPETS.createDefault.code)
    const sbx = await remember('base', vars.sandbox)
    assert.equal((await sbx.getInfo()).templateId, 'base')
    assert.equal((await sbx.commands.run('echo ok')).stdout, 'ok\n')
  })

  test('spec: create, specific template', async () => {
    const { vars } = await runExample(SNIPPETS.createTemplate.code)
    const sbx = await remember('python', vars.sandbox)
    assert.equal((await sbx.getInfo()).templateId, 'python')
    assert.equal((await sbx.commands.run("python3 -c 'print(6*7)'")).stdout, '42\n')
  })

  test('spec: create with options', async () => {
    // The spec's placeholder volume id stands for a volume made beforehand.
    const vol = await Volume.create('js-spec-example', 64)
    const { vars } = await runExample(SNIPPETS.createOptions.code.replace('vol_abc123', vol.volumeId),
    )
    const info = await vars.sandbox.getInfo()
    assert.deepEqual(info.metadata, { project: 'my-agent' })
    const life = (info.endAt.getTime() - info.startedAt.getTime()) / 1000
    assert.ok(life >= 590 && life <= 610, `lifetime ${life} s`)
    const sbx = await remember('options', vars.sandbox)
    assert.equal(info.secure, true)
    assert.deepEqual(info.network?.allowOut, ['api.openai.com'])
    assert.equal((await sbx.commands.run('echo $API_KEY')).stdout, 'secret\n')
    assert.match((await sbx.commands.run('cat /proc/mounts')).stdout, / \/workspace /)
  })

  test('spec: connect', async () => {
    const existing = made.base!
    const { vars } = await runExample(SNIPPETS.connect.code,
      { sandboxId: existing.sandboxId },
    )
    assert.equal(vars.sandbox.sandboxId, existing.sandboxId)
    assert.equal(await vars.sandbox.isRunning(), true)
  })

  test('spec: sandbox information', async () => {
    const { vars, logs } = await runExample(SNIPPETS.info.code)
    const sbx = await remember('info', vars.sandbox)
    assert.deepEqual(logs, [sbx.sandboxId, 'Template: base', 'State: running'])
    const info = vars.info
    assert.ok(info.startedAt instanceof Date && info.endAt > info.startedAt)
    assert.ok(info.cpuCount >= 1 && info.memoryMB >= 64)
  })

  test('spec: timeout management', async () => {
    const { vars } = await runExample(SNIPPETS.timeout.code)
    const left = ((await vars.sandbox.getInfo()).endAt.getTime() - Date.now()) / 1000
    assert.ok(left > 1700 && left <= 1800, `${left} s left`)
    await remember('timeout', vars.sandbox)
  })

  test('spec: list sandboxes', async () => {
    const { logs } = await runExample(SNIPPETS.list.code)
    for (const s of Object.values(made)) assert.ok(logs.includes(`${s.sandboxId}: running`), `${s.sandboxId} in ${logs}`)
  })
}

/** Last of the run: the kill example ends two of the shared sandboxes. */
export function specKillExample(): void {
  test('spec: kill sandbox', async () => {
    const a = made.info!
    const b = made.timeout!
    await runExample(SNIPPETS.kill.code,
      { scope: { sandbox: a }, sandboxId: b.sandboxId },
    )
    assert.equal(await a.isRunning(), false)
    assert.equal(await b.isRunning(), false)
    assert.equal(await Sandbox.kill(b.sandboxId), false, 'a second kill finds nothing')
  })
}
