/**
 * Sandboxes shared by the VM tests of one run (they are slow to boot under
 * TCG): the spec's examples create them, later tests reuse them, and
 * `killAll` removes every sandbox on the run's own test hostd.
 */
import Sandbox, { closeClients } from '@moru-ai/core'

/** Sandbox-like: the spec examples' objects come from the CommonJS build. */
export type AnySandbox = Sandbox

export const made: Record<string, AnySandbox> = {}

/**
 * Keeps an example's sandbox for later tests, alive for an hour: the
 * examples' own lifetimes (5 min by default) could end it before a later
 * test on a slow, loaded machine.
 */
export async function remember(name: string, s: unknown): Promise<AnySandbox> {
  const sbx = s as AnySandbox
  made[name] = sbx
  await sbx.setTimeout(3_600_000)
  return sbx
}

export async function killAll(): Promise<void> {
  for await (const info of Sandbox.list({ state: ['running', 'paused'] })) await Sandbox.kill(info.sandboxId)
  closeClients()
}
