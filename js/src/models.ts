/** Plain objects the SDK returns, built from the generated protocol messages. */
import {
  SandboxState,
  type NetworkPolicy as PbNetworkPolicy,
  type SandboxInfo as PbSandboxInfo,
  type SandboxMetric as PbSandboxMetric,
} from './gen/moru_proto/host/v1/sandbox.js'
import type { ProcessInfo as PbProcessInfo } from './gen/moru_proto/guest/v1/process.js'
import {
  EventType as FsEventType,
  FileType as PbFileType,
  type EntryInfo as PbEntryInfo,
  type FilesystemEvent as PbFilesystemEvent,
} from './gen/moru_proto/guest/v1/filesystem.js'

export type SandboxStateName = 'creating' | 'running' | 'paused' | 'terminated' | 'error' | 'unknown'

const STATES: Record<number, SandboxStateName> = {
  [SandboxState.SANDBOX_STATE_CREATING]: 'creating',
  [SandboxState.SANDBOX_STATE_RUNNING]: 'running',
  [SandboxState.SANDBOX_STATE_PAUSED]: 'paused',
  [SandboxState.SANDBOX_STATE_TERMINATED]: 'terminated',
  [SandboxState.SANDBOX_STATE_ERROR]: 'error',
}

export function stateValue(name: SandboxStateName): SandboxState {
  const hit = Object.entries(STATES).find(([, n]) => n === name)
  return hit ? Number(hit[0]) : SandboxState.SANDBOX_STATE_UNSPECIFIED
}

/** Egress policy: CIDRs, addresses or domain names. */
export interface NetworkPolicy {
  allowOut: string[]
  denyOut: string[]
  allowPublicTraffic?: boolean
}

export interface SandboxInfo {
  sandboxId: string
  templateId: string
  metadata: Record<string, string>
  state: SandboxStateName
  startedAt: Date
  endAt: Date
  cpuCount: number
  memoryMB: number
  diskMB: number
  allowInternetAccess: boolean
  secure: boolean
  network?: NetworkPolicy
  volumeId?: string
  volumeMountPath?: string
  guestIp?: string
}

function network(p: PbNetworkPolicy | undefined): NetworkPolicy | undefined {
  if (!p) return undefined
  return { allowOut: [...p.allowOut], denyOut: [...p.denyOut], allowPublicTraffic: p.allowPublicTraffic }
}

export function sandboxInfo(m: PbSandboxInfo): SandboxInfo {
  return {
    sandboxId: m.sandboxId,
    templateId: m.templateId,
    metadata: { ...m.metadata },
    state: STATES[m.state] ?? 'unknown',
    startedAt: m.startedAt ?? new Date(0),
    endAt: m.endAt ?? new Date(0),
    cpuCount: m.cpuCount,
    memoryMB: m.memoryMb,
    diskMB: m.diskMb,
    allowInternetAccess: m.allowInternetAccess,
    secure: m.secure,
    network: network(m.network),
    volumeId: m.volumeId || undefined,
    volumeMountPath: m.volumeMountPath || undefined,
    guestIp: m.guestIp || undefined,
  }
}

/** One resource sample of a sandbox. Memory and disk in bytes. */
export interface SandboxMetrics {
  timestamp: Date
  cpuCount: number
  cpuUsedPct: number
  memUsed: number
  memTotal: number
  diskUsed: number
  diskTotal: number
}

export function sandboxMetrics(m: PbSandboxMetric): SandboxMetrics {
  return {
    timestamp: m.timestamp ?? new Date(0),
    cpuCount: m.cpuCount,
    cpuUsedPct: m.cpuUsedPct,
    memUsed: m.memUsed,
    memTotal: m.memTotal,
    diskUsed: m.diskUsed,
    diskTotal: m.diskTotal,
  }
}

/** A finished command. `error` says why it did not exit normally, if so. */
export interface CommandResult {
  stdout: string
  stderr: string
  exitCode: number
  error?: string
}

/** A process running in the sandbox (`commands.list()`). */
export interface ProcessInfo {
  pid: number
  tag?: string
  cmd: string
  args: string[]
  envs: Record<string, string>
  cwd?: string
}

export function processInfo(m: PbProcessInfo): ProcessInfo {
  const c = m.config
  const [cmd, args] = c?.shell
    ? ['/bin/bash', ['-l', '-c', c.shell]]
    : [c?.argv[0] ?? '', c?.argv.slice(1) ?? []]
  return { pid: m.pid, tag: m.tag || undefined, cmd, args, envs: { ...c?.env }, cwd: c?.cwd || undefined }
}

export type FileType = 'file' | 'dir' | 'symlink' | 'other'

const FILE_TYPES: Record<number, FileType> = {
  [PbFileType.FILE_TYPE_FILE]: 'file',
  [PbFileType.FILE_TYPE_DIRECTORY]: 'dir',
  [PbFileType.FILE_TYPE_SYMLINK]: 'symlink',
}

/** A file or directory in the sandbox. */
export interface EntryInfo {
  name: string
  path: string
  type: FileType
  size: number
  mode: number
  owner: string
  group: string
  modifiedTime: Date
  symlinkTarget?: string
}

export function entryInfo(m: PbEntryInfo | undefined): EntryInfo {
  return {
    name: m?.name ?? '',
    path: m?.path ?? '',
    type: FILE_TYPES[m?.type ?? 0] ?? 'other',
    size: m?.size ?? 0,
    mode: m?.mode ?? 0,
    owner: m?.owner ?? '',
    group: m?.group ?? '',
    modifiedTime: m?.modifiedTime ?? new Date(0),
    symlinkTarget: m?.symlinkTarget || undefined,
  }
}

export type FilesystemEventType = 'create' | 'write' | 'remove' | 'rename' | 'chmod' | 'unknown'

const EVENT_TYPES: Record<number, FilesystemEventType> = {
  [FsEventType.EVENT_TYPE_CREATE]: 'create',
  [FsEventType.EVENT_TYPE_WRITE]: 'write',
  [FsEventType.EVENT_TYPE_REMOVE]: 'remove',
  [FsEventType.EVENT_TYPE_RENAME]: 'rename',
  [FsEventType.EVENT_TYPE_CHMOD]: 'chmod',
}

/** A change under a watched directory. */
export interface FilesystemEvent {
  type: FilesystemEventType
  path: string
  name: string
}

export function filesystemEvent(m: PbFilesystemEvent): FilesystemEvent {
  return { type: EVENT_TYPES[m.type] ?? 'unknown', path: m.path, name: m.name }
}
