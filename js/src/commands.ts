/**
 * `sandbox.commands`: run (foreground or background), list, connect, kill.
 *
 * A command's `timeoutMs` is the command's own: it goes to guestd, which
 * kills the process group on expiry. The output stream carries no gRPC
 * deadline, so a long command is never cut off by the client, and a process
 * outlives its stream (reattach with `connect(pid)`).
 */
import type { ClientReadableStream } from '@grpc/grpc-js'
import { CommandExitError, SandboxError, TimeoutError } from './errors.js'
import type { GuestTarget } from './guest.js'
import { processInfo, type CommandResult, type ProcessInfo } from './models.js'
import {
  ConnectRequest,
  ListRequest,
  SendInputRequest,
  SendSignalRequest,
  StartRequest,
  type EndEvent,
  type ProcessEvent,
} from './gen/moru_proto/guest/v1/process.js'

export type OutputCallback = (data: string) => void | Promise<void>

export interface CommandStartOpts {
  envs?: Record<string, string>
  cwd?: string
  user?: string
  /** The command's own time limit; 0 for none. Default 60 s. */
  timeoutMs?: number
  onStdout?: OutputCallback
  onStderr?: OutputCallback
  /** Keep stdin open for `sendStdin`. */
  stdin?: boolean
}

const SIGKILL = 9
const DEFAULT_COMMAND_TIMEOUT_MS = 60_000

/** A started or attached process: wait for it, kill it, write to its stdin. */
export class CommandHandle {
  private readonly out: string[] = []
  private readonly err: string[] = []
  private readonly decOut = new TextDecoder()
  private readonly decErr = new TextDecoder()
  private end?: EndEvent
  private dropped = 0
  private readonly done: Promise<void>
  private readonly events: AsyncIterator<ProcessEvent>

  /** Internal; use commands.run(..., {background: true}) or commands.connect(pid). */
  constructor(
    private readonly target: GuestTarget,
    readonly pid: number,
    private readonly call: ClientReadableStream<ProcessEvent>,
    private readonly opts: { onStdout?: OutputCallback; onStderr?: OutputCallback; timeoutMs?: number },
    first?: ProcessEvent,
    events?: AsyncIterator<ProcessEvent>,
  ) {
    this.events = events ?? (call as AsyncIterable<ProcessEvent>)[Symbol.asyncIterator]()
    this.done = this.pump(first)
    this.done.catch(() => {}) // seen by wait(); never an unhandled rejection
  }

  /** Output collected so far. */
  get stdout(): string {
    return this.out.join('')
  }

  get stderr(): string {
    return this.err.join('')
  }

  /** Undefined while the process runs. */
  get exitCode(): number | undefined {
    return this.end?.exitCode
  }

  private async feed(ev: ProcessEvent): Promise<void> {
    if (ev.data?.stdout !== undefined) {
      const s = this.decOut.decode(ev.data.stdout, { stream: true })
      this.out.push(s)
      if (s) await this.opts.onStdout?.(s)
    } else if (ev.data?.stderr !== undefined) {
      const s = this.decErr.decode(ev.data.stderr, { stream: true })
      this.err.push(s)
      if (s) await this.opts.onStderr?.(s)
    } else if (ev.end) {
      this.end = ev.end
      this.out.push(this.decOut.decode())
      this.err.push(this.decErr.decode())
    } else if (ev.dropped) {
      this.dropped += ev.dropped.stdoutBytes + ev.dropped.stderrBytes + ev.dropped.ptyBytes
    }
  }

  private async pump(first?: ProcessEvent): Promise<void> {
    try {
      if (first) await this.feed(first)
      if (this.end) return
      for (;;) {
        const r = await this.events.next()
        if (r.done) return
        await this.feed(r.value)
        if (this.end) return
      }
    } catch (e) {
      throw this.target.error(e, `reading output of process ${this.pid}`)
    } finally {
      this.call.cancel()
    }
  }

  /** Waits for the end; throws CommandExitError on a non-zero exit. */
  async wait(): Promise<CommandResult> {
    await this.done
    const end = this.end
    if (!end) {
      throw new SandboxError(
        `lost the output stream of process ${this.pid} before it ended; reattach with commands.connect(${this.pid})`,
      )
    }
    let error: string | undefined = end.error || undefined
    if (!error && !end.exited) error = end.status || `signal ${end.signal}`
    if (this.dropped) {
      const note = `${this.dropped} bytes of output were dropped (replay buffer full)`
      error = error ? `${error}; ${note}` : note
    }
    const result: CommandResult = { stdout: this.stdout, stderr: this.stderr, exitCode: end.exitCode, error }
    if (end.timedOut) {
      const limit = this.opts.timeoutMs ? ` of ${this.opts.timeoutMs} ms` : ''
      throw new TimeoutError(
        `command (pid ${this.pid}) exceeded its own timeout${limit} and was killed; pass a larger timeoutMs ` +
          "to commands.run (0 for no limit). This is the command's timeout, not the sandbox's.",
      )
    }
    if (end.error || !end.exited || end.exitCode !== 0) throw new CommandExitError(result)
    return result
  }

  /** SIGKILLs the process group; false if the process was already gone. */
  kill(): Promise<boolean> {
    return killProcess(this.target, this.pid)
  }

  sendStdin(data: string | Uint8Array): Promise<void> {
    return sendStdin(this.target, this.pid, data)
  }

  /** Stops receiving output; the process keeps running (see commands.connect). */
  async disconnect(): Promise<void> {
    this.call.cancel()
    await this.done.catch(() => {})
  }
}

async function killProcess(target: GuestTarget, pid: number): Promise<boolean> {
  const fs = target.process()
  try {
    await target.call(
      fs.sendSignal,
      fs,
      SendSignalRequest.fromPartial({ process: { pid }, signal: SIGKILL }),
      `killing process ${pid}`,
    )
  } catch (e) {
    const code = (e as SandboxError).code
    if (code === 'NOT_FOUND' || code === 'FAILED_PRECONDITION') return false
    throw e
  }
  return true
}

async function sendStdin(target: GuestTarget, pid: number, data: string | Uint8Array): Promise<void> {
  const p = target.process()
  const raw = typeof data === 'string' ? Buffer.from(data) : Buffer.from(data.buffer, data.byteOffset, data.byteLength)
  await target.call(p.sendInput, p, SendInputRequest.fromPartial({ process: { pid }, data: raw }), `sending stdin to process ${pid}`)
}

/** The first non-keepalive event of a stream, or undefined at its end; errors translated. */
async function firstEvent(
  target: GuestTarget,
  call: ClientReadableStream<ProcessEvent>,
  what: string,
  accept: (ev: ProcessEvent) => boolean,
): Promise<[ProcessEvent | undefined, AsyncIterator<ProcessEvent>]> {
  call.on('error', () => {}) // errors reach the iterator; cancel() must not crash the process
  const it = (call as AsyncIterable<ProcessEvent>)[Symbol.asyncIterator]()
  try {
    for (;;) {
      const r = await it.next()
      if (r.done) return [undefined, it]
      if (accept(r.value)) return [r.value, it]
    }
  } catch (e) {
    call.cancel()
    throw target.error(e, what)
  }
}

/** Processes in one sandbox (`sandbox.commands`). */
export class Commands {
  /** Internal; use `sandbox.commands`. */
  constructor(private readonly target: GuestTarget) {}

  /** Runs `cmd` in a shell; resolves with its result (a non-zero exit throws CommandExitError). */
  run(cmd: string, opts?: CommandStartOpts & { background?: false }): Promise<CommandResult>
  /** Starts `cmd` in the background; resolves with a handle once it has a pid. */
  run(cmd: string, opts: CommandStartOpts & { background: true }): Promise<CommandHandle>
  async run(
    cmd: string,
    opts: CommandStartOpts & { background?: boolean } = {},
  ): Promise<CommandResult | CommandHandle> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS
    const req = StartRequest.fromPartial({
      config: { shell: cmd, env: opts.envs ?? {}, cwd: opts.cwd ?? '', user: opts.user ?? '' },
      stdin: opts.stdin ?? false,
      timeoutSeconds: timeoutMs / 1000,
    })
    const call = this.target.process().start(req, this.target.metadata())
    const [start, events] = await firstEvent(this.target, call, `starting ${JSON.stringify(cmd)}`, (ev) => !!ev.start)
    if (!start?.start) throw new SandboxError(`guest closed the stream before ${JSON.stringify(cmd)} started`)
    const handle = new CommandHandle(this.target, start.start.pid, call, { ...opts, timeoutMs }, undefined, events)
    return opts.background ? handle : handle.wait()
  }

  /** A handle to a running (or kept, ended) process; replays its kept output first. */
  async connect(
    pid: number,
    opts: { onStdout?: OutputCallback; onStderr?: OutputCallback; timeoutMs?: number } = {},
  ): Promise<CommandHandle> {
    const call = this.target.process().connect(ConnectRequest.fromPartial({ process: { pid } }), this.target.metadata())
    const [first, events] = await firstEvent(this.target, call, `connecting to process ${pid}`, (ev) => !ev.keepalive)
    return new CommandHandle(this.target, pid, call, opts, first, events)
  }

  /** The running processes started through the guest API. */
  async list(): Promise<ProcessInfo[]> {
    const p = this.target.process()
    const resp = await this.target.call(p.list, p, ListRequest.fromPartial({}), 'listing processes')
    return resp.processes.filter((x) => x.running).map(processInfo)
  }

  /** SIGKILLs a process (its whole group); false if it was not found. */
  kill(pid: number): Promise<boolean> {
    return killProcess(this.target, pid)
  }

  sendStdin(pid: number, data: string | Uint8Array): Promise<void> {
    return sendStdin(this.target, pid, data)
  }
}
