/**
 * The SDK's errors, and the one place gRPC statuses become them (`fromStatus`).
 * Class names follow the Python SDK's (which ends them in `Exception`; the
 * Python names are exported as aliases of the same classes).
 */
import { status, type ServiceError } from '@grpc/grpc-js'
import type { CommandResult } from './models.js'

/** Base of every error the SDK throws. `code` is the gRPC status name when one caused it. */
export class SandboxError extends Error {
  readonly code?: string
  constructor(message: string, code?: string) {
    super(message)
    this.name = new.target.name
    this.code = code
  }
}

/** The sandbox, template, file or process does not exist (any more). */
export class NotFoundError extends SandboxError {}
/** An operation took longer than allowed; for a command, its own `timeoutMs`. */
export class TimeoutError extends SandboxError {}
/** hostd refused the API key (set MORU_API_KEY or pass `apiKey`). */
export class AuthenticationError extends SandboxError {}
/** The guest refused access to a path (file permissions); try `user: 'root'`. */
export class PermissionDeniedError extends SandboxError {}
/** The request was wrong; the message names the field or path to fix. */
export class InvalidArgumentError extends SandboxError {}
/** The sandbox's disk is full. */
export class NotEnoughSpaceError extends SandboxError {}
/** The node has no room right now (too many sandboxes or not enough memory). */
export class RateLimitError extends SandboxError {}
/** The target is in the wrong state, e.g. a paused sandbox (call `Sandbox.connect`). */
export class FailedPreconditionError extends SandboxError {}
/** hostd (or the sandbox's guest agent) could not be reached. */
export class ConnectionError extends SandboxError {}

/** A command exited with a non-zero code; the result is attached. */
export class CommandExitError extends SandboxError implements CommandResult {
  readonly stdout: string
  readonly stderr: string
  readonly exitCode: number
  readonly error?: string
  readonly result: CommandResult
  constructor(result: CommandResult) {
    let msg = `command exited with code ${result.exitCode}`
    if (result.error) msg += ` (${result.error})`
    const tail = result.stderr.trim().slice(-500)
    if (tail) msg += `; stderr: ${tail}`
    super(msg)
    this.result = result
    this.stdout = result.stdout
    this.stderr = result.stderr
    this.exitCode = result.exitCode
    this.error = result.error
  }
}

const HINTS: Partial<Record<status, string>> = {
  [status.NOT_FOUND]: 'it may have been killed or timed out; see Sandbox.list()',
  [status.UNAUTHENTICATED]: "set MORU_API_KEY (or pass apiKey) to hostd's API key",
  [status.DEADLINE_EXCEEDED]: 'the call took too long; retry or raise requestTimeoutMs',
  [status.RESOURCE_EXHAUSTED]: 'free resources (kill unused sandboxes) and retry',
  [status.FAILED_PRECONDITION]: 'a paused sandbox resumes with Sandbox.connect(id)',
}

/** hostd's prefix for an unreachable guest (hostd/passthrough.py GUEST_UNREACHABLE). */
const GUEST_UNREACHABLE = "hostd cannot reach the sandbox's guest agent"
// Set by hostd on the statuses it raises itself (so it is up).
const STATUS_FROM_HEADER = 'moru-status-from'

/** grpc-js's words (from Node's TLS) for a server certificate the client refused. */
const TLS_FAILURE = /certificate|self[- ]signed|altnames|SSL routines|wrong version number|handshake/i

/** The error for a gRPC status; `what` says what was attempted. */
export function fromStatus(
  code: status,
  details: string,
  what: string,
  opts: { address?: string; guest?: boolean; fromHostd?: boolean } = {},
): SandboxError {
  const text = details ? `${what}: ${details}` : what
  const name = status[code] ?? String(code)
  const hinted = `${text} (${HINTS[code] ?? ''})`
  switch (code) {
    case status.NOT_FOUND:
      return new NotFoundError(opts.guest ? text : hinted, name)
    case status.DEADLINE_EXCEEDED:
      return new TimeoutError(hinted, name)
    case status.UNAUTHENTICATED:
      return new AuthenticationError(hinted, name)
    case status.PERMISSION_DENIED:
      return opts.guest
        ? new PermissionDeniedError(`${text} (run as another user)`, name)
        : new AuthenticationError(`${text} (this key may not do that)`, name)
    case status.INVALID_ARGUMENT:
    case status.OUT_OF_RANGE:
    case status.ALREADY_EXISTS:
      return new InvalidArgumentError(text, name)
    case status.RESOURCE_EXHAUSTED:
      return opts.guest
        ? new NotEnoughSpaceError(`${text} (the sandbox ran out of space; remove files)`, name)
        : new RateLimitError(hinted, name)
    case status.FAILED_PRECONDITION:
      return new FailedPreconditionError(opts.guest ? text : hinted, name)
    case status.UNAVAILABLE: {
      if (details.includes(GUEST_UNREACHABLE) || opts.fromHostd) {
        return new ConnectionError(`${text} (hostd is fine; check the sandbox with getInfo / isRunning)`, name)
      }
      const where = opts.address ? ` at ${opts.address}` : ''
      if (TLS_FAILURE.test(details)) {
        return new ConnectionError(
          `${text} (TLS to hostd${where} failed: set MORU_HOSTD_CA to the CA that signed hostd's certificate, which must name this address)`,
          name,
        )
      }
      return new ConnectionError(
        `${text} (cannot reach hostd${where}: is \`moru-hostd serve\` running and MORU_HOSTD set to its address?)`,
        name,
      )
    }
    default:
      return new SandboxError(text, name)
  }
}

function isServiceError(e: unknown): e is ServiceError {
  return typeof e === 'object' && e !== null && typeof (e as ServiceError).code === 'number' && 'metadata' in e
}

/** Turns a grpc-js error into the matching SandboxError; other errors pass unchanged. */
export function translate(e: unknown, what: string, opts: { address?: string; guest?: boolean } = {}): unknown {
  if (e instanceof SandboxError || !isServiceError(e)) return e
  const fromHostd = e.metadata?.get(STATUS_FROM_HEADER)?.[0] === 'hostd'
  const err = fromStatus(e.code, e.details ?? '', what, { ...opts, fromHostd })
  ;(err as { cause?: unknown }).cause = e
  return err
}

// The Python SDK's names, for code that follows its docs.
export {
  SandboxError as SandboxException,
  NotFoundError as NotFoundException,
  TimeoutError as TimeoutException,
  AuthenticationError as AuthenticationException,
  PermissionDeniedError as PermissionDeniedException,
  InvalidArgumentError as InvalidArgumentException,
  NotEnoughSpaceError as NotEnoughSpaceException,
  RateLimitError as RateLimitException,
  FailedPreconditionError as FailedPreconditionException,
  ConnectionError as ConnectionException,
  CommandExitError as CommandExitException,
}
