/**
 * @moru-ai/core: microVM sandboxes for AI agents, from Node.
 *
 *     import Sandbox from '@moru-ai/core'
 *     const sandbox = await Sandbox.create()
 *     console.log((await sandbox.commands.run('echo hello')).stdout)
 *     await sandbox.kill()
 *
 * hostd's address comes from MORU_HOSTD (default unix:/run/moru/hostd.sock)
 * and its API key from MORU_API_KEY.
 */
import { Sandbox } from './sandbox.js'

export { Sandbox, SandboxPaginator } from './sandbox.js'
export type { SandboxOpts, SandboxListOpts, SandboxNetworkOpts } from './sandbox.js'
export { Commands, CommandHandle } from './commands.js'
export type { CommandStartOpts, OutputCallback } from './commands.js'
export { Volume } from './volume.js'
export type { VolumeInfo } from './volume.js'
export { Files, WatchHandle } from './files.js'
export type { WriteData, WatchCallback } from './files.js'
export { ConnectionConfig, closeClients, DEFAULT_HOSTD } from './connection.js'
export type { ConnectionOpts } from './connection.js'
export {
  SandboxError,
  NotFoundError,
  TimeoutError,
  AuthenticationError,
  PermissionDeniedError,
  InvalidArgumentError,
  NotEnoughSpaceError,
  RateLimitError,
  FailedPreconditionError,
  ConnectionError,
  CommandExitError,
  SandboxException,
  NotFoundException,
  TimeoutException,
  AuthenticationException,
  PermissionDeniedException,
  InvalidArgumentException,
  NotEnoughSpaceException,
  RateLimitException,
  FailedPreconditionException,
  ConnectionException,
  CommandExitException,
} from './errors.js'
export type {
  CommandResult,
  EntryInfo,
  FileType,
  FilesystemEvent,
  FilesystemEventType,
  NetworkPolicy,
  ProcessInfo,
  SandboxInfo,
  SandboxMetrics,
  SandboxStateName,
} from './models.js'

export default Sandbox
