/**
 * Sandboxes shared by the VM tests of one run (they are slow to boot under
 * TCG): the spec's examples create them, later tests reuse them, and
 * `killAll` removes every sandbox on the run's own test hostd.
 */
import Sandbox, { closeClients } from '@moru-ai/core'

/** Sandbox-like: the spec examples' objects come from the CommonJS build. */
export type AnySandbox = Sandbox

export const made: Record<string, AnySandbox> = {}

export function remember(name: string, s: unknown): AnySandbox {
  made[name] = s as AnySandbox
  return made[name]
}

export async function killAll(): Promise<void> {
  for await (const info of Sandbox.list({ state: ['running', 'paused'] })) await Sandbox.kill(info.sandboxId)
  closeClients()
}
