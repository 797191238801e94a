/**
 * Sandbox: a microVM on a hostd node. Lifecycle calls go to hostd's
 * SandboxService; `commands` and `files` go through hostd's guest passthrough.
 */
import { Commands } from './commands.js'
import { client, CREATE_TIMEOUT_MS, ConnectionConfig, unary, type ConnectionOpts } from './connection.js'
import { InvalidArgumentError, NotFoundError } from './errors.js'
import { Files } from './files.js'
import { GuestTarget } from './guest.js'
import {
  CreateRequest,
  GetHostRequest,
  GetMetricsRequest,
  GetRequest,
  KillRequest,
  ListRequest,
  PauseRequest,
  ResumeRequest,
  SandboxServiceClient,
  SandboxState,
  SetTimeoutRequest,
  type SandboxInfo as PbSandboxInfo,
} from './gen/moru_proto/host/v1/sandbox.js'
import {
  sandboxInfo,
  sandboxMetrics,
  stateValue,
  type SandboxInfo,
  type SandboxMetrics,
  type SandboxStateName,
} from './models.js'

export interface SandboxNetworkOpts {
  allowOut?: string[]
  denyOut?: string[]
  allowPublicTraffic?: boolean
}

export interface SandboxOpts extends ConnectionOpts {
  /** The sandbox's lifetime; default 300 000 (5 minutes). Extend with setTimeout. */
  timeoutMs?: number
  metadata?: Record<string, string>
  envs?: Record<string, string>
  allowInternetAccess?: boolean
  network?: SandboxNetworkOpts
  /** Guest calls must carry the sandbox's access token (default true). */
  secure?: boolean
  volumeId?: string
  volumeMountPath?: string
}

export interface SandboxListOpts extends ConnectionOpts {
  /** Only sandboxes whose metadata holds every one of these pairs. */
  metadata?: Record<string, string>
  /** Only these states; default running and paused. */
  state?: SandboxStateName[]
  /** Sandboxes per page (per hostd call); default 100. */
  limit?: number
}

const seconds = (ms: number): number => Math.ceil(ms / 1000)

function service(config: ConnectionConfig): SandboxServiceClient {
  return client(SandboxServiceClient, config)
}

/** A unary SandboxService call with `config`'s key, deadline and error mapping. */
function call<Req, Res>(
  config: ConnectionConfig,
  pick: (s: SandboxServiceClient) => Parameters<typeof unary<Req, Res>>[0],
  request: Req,
  what: string,
  deadlineMs?: number,
): Promise<Res> {
  const s = service(config)
  return unary(pick(s), s, request, config.metadata(), config.unaryOptions(deadlineMs), what, {
    address: config.address,
  })
}

/** `Sandbox.list()`: an async iterable over every match, or page by page. */
export class SandboxPaginator implements AsyncIterable<SandboxInfo> {
  private token = ''
  private more = true

  /** Internal; use Sandbox.list(). */
  constructor(
    private readonly config: ConnectionConfig,
    private readonly opts: SandboxListOpts,
  ) {}

  /** True while another page may follow. */
  get hasNext(): boolean {
    return this.more
  }

  /** The next page of sandboxes. */
  async nextItems(): Promise<SandboxInfo[]> {
    if (!this.more) throw new Error('Sandbox.list: no more items (check hasNext)')
    const req = ListRequest.fromPartial({
      metadata: this.opts.metadata ?? {},
      states: (this.opts.state ?? []).map(stateValue),
      pageSize: this.opts.limit ?? 100,
      pageToken: this.token,
    })
    const resp = await call(this.config, (s) => s.list, req, 'listing sandboxes')
    this.token = resp.nextPageToken
    this.more = this.token !== ''
    return resp.sandboxes.map(sandboxInfo)
  }

  async *[Symbol.asyncIterator](): AsyncIterator<SandboxInfo> {
    while (this.hasNext) yield* await this.nextItems()
  }
}

export class Sandbox {
  readonly sandboxId: string
  readonly commands: Commands
  readonly files: Files
  private info: SandboxInfo
  private readonly config: ConnectionConfig

  /** Internal; use Sandbox.create() or Sandbox.connect(). */
  protected constructor(info: PbSandboxInfo, config: ConnectionConfig) {
    this.info = sandboxInfo(info)
    this.sandboxId = info.sandboxId
    this.config = config
    const target = new GuestTarget(config, info.sandboxId, info.accessToken || undefined)
    this.commands = new Commands(target)
    this.files = new Files(target)
  }

  /** hostd's address this sandbox is reached through. */
  get connectionConfig(): ConnectionConfig {
    return this.config
  }

  /** Boots a sandbox (default template 'base'); resolves once its guest is ready. */
  static async create(opts?: SandboxOpts): Promise<Sandbox>
  static async create(template: string, opts?: SandboxOpts): Promise<Sandbox>
  static async create(templateOrOpts?: string | SandboxOpts, maybeOpts?: SandboxOpts): Promise<Sandbox> {
    const [template, opts] =
      typeof templateOrOpts === 'string' ? [templateOrOpts, maybeOpts ?? {}] : ['base', templateOrOpts ?? {}]
    const config = ConnectionConfig.resolve(opts)
    if (opts.volumeId && !opts.volumeMountPath) {
      throw new InvalidArgumentError("volumeMountPath: required with volumeId (e.g. '/workspace')")
    }
    const req = CreateRequest.fromPartial({
      template: template || 'base',
      timeoutSeconds: seconds(opts.timeoutMs ?? 300_000),
      metadata: opts.metadata ?? {},
      envs: opts.envs ?? {},
      allowInternetAccess: opts.allowInternetAccess ?? true,
      secure: opts.secure ?? true,
      volumeId: opts.volumeId ?? '',
      volumeMountPath: opts.volumeMountPath ?? '',
      network: opts.network && {
        allowOut: opts.network.allowOut ?? [],
        denyOut: opts.network.denyOut ?? [],
        allowPublicTraffic: opts.network.allowPublicTraffic,
      },
    })
    const info = await call(
      config,
      (s) => s.create,
      req,
      `creating a sandbox from template ${JSON.stringify(template)}`,
      opts.requestTimeoutMs ?? CREATE_TIMEOUT_MS,
    )
    return new this(info, config)
  }

  /** A sandbox by id, resumed first if it is paused. */
  static async connect(sandboxId: string, opts: ConnectionOpts & { timeoutMs?: number } = {}): Promise<Sandbox> {
    const config = ConnectionConfig.resolve(opts)
    return new this(await getOrResume(config, sandboxId, opts.timeoutMs), config)
  }

  /** Resumes this sandbox if it is paused (after betaPause); returns it. */
  async connect(opts: { timeoutMs?: number } = {}): Promise<this> {
    this.info = sandboxInfo(await getOrResume(this.config, this.sandboxId, opts.timeoutMs))
    return this
  }

  /** True while the sandbox runs (false when paused, killed or timed out). */
  async isRunning(): Promise<boolean> {
    try {
      return (await this.getInfo()).state === 'running'
    } catch (e) {
      if (e instanceof NotFoundError) return false
      throw e
    }
  }

  /** templateId, state, startedAt/endAt, cpuCount, memoryMB, metadata, ... */
  async getInfo(): Promise<SandboxInfo> {
    this.info = await Sandbox.getInfo(this.sandboxId, this.sameHostd())
    return this.info
  }

  static async getInfo(sandboxId: string, opts: ConnectionOpts = {}): Promise<SandboxInfo> {
    const config = ConnectionConfig.resolve(opts)
    const info = await call(config, (s) => s.get, GetRequest.fromPartial({ sandboxId }), `getting info of sandbox ${sandboxId}`)
    return sandboxInfo(info)
  }

  /** Resource samples hostd kept for the sandbox, oldest first. */
  async getMetrics(): Promise<SandboxMetrics[]> {
    const resp = await call(
      this.config,
      (s) => s.getMetrics,
      GetMetricsRequest.fromPartial({ sandboxId: this.sandboxId }),
      `getting metrics of sandbox ${this.sandboxId}`,
    )
    return resp.metrics.map(sandboxMetrics)
  }

  /** The sandbox will be killed `timeoutMs` from now. */
  async setTimeout(timeoutMs: number): Promise<void> {
    await Sandbox.setTimeout(this.sandboxId, timeoutMs, this.sameHostd())
  }

  static async setTimeout(sandboxId: string, timeoutMs: number, opts: ConnectionOpts = {}): Promise<void> {
    const config = ConnectionConfig.resolve(opts)
    await call(
      config,
      (s) => s.setTimeout,
      SetTimeoutRequest.fromPartial({ sandboxId, timeoutSeconds: seconds(timeoutMs) }),
      `setting the timeout of sandbox ${sandboxId}`,
    )
  }

  /** Kills the sandbox; true if it was killed, false if it did not exist. */
  async kill(): Promise<boolean> {
    return Sandbox.kill(this.sandboxId, this.sameHostd())
  }

  static async kill(sandboxId: string, opts: ConnectionOpts = {}): Promise<boolean> {
    const config = ConnectionConfig.resolve(opts)
    try {
      await call(config, (s) => s.kill, KillRequest.fromPartial({ sandboxId }), `killing sandbox ${sandboxId}`)
    } catch (e) {
      if (e instanceof NotFoundError) return false
      throw e
    }
    return true
  }

  /** Pauses the sandbox, keeping its filesystem; resume with connect(). Returns its id. */
  async betaPause(): Promise<string> {
    const info = await call(
      this.config,
      (s) => s.pause,
      PauseRequest.fromPartial({ sandboxId: this.sandboxId }),
      `pausing sandbox ${this.sandboxId}`,
      CREATE_TIMEOUT_MS,
    )
    this.info = sandboxInfo(info)
    return this.sandboxId
  }

  /** The host name under which `port` of the sandbox is reachable: `{port}-{id}.{domain}`. */
  async getHost(port: number): Promise<string> {
    return (await this.hostOf(port)).host
  }

  /** A URL that reaches `port` of the sandbox from this machine (hostd's proxy). */
  async getUrl(port: number): Promise<string> {
    return (await this.hostOf(port)).url
  }

  private hostOf(port: number): Promise<{ host: string; url: string }> {
    return call(
      this.config,
      (s) => s.getHost,
      GetHostRequest.fromPartial({ sandboxId: this.sandboxId, port }),
      `getting the host of port ${port}`,
    )
  }

  /** Running and paused sandboxes, optionally only those whose metadata holds every given pair. */
  static list(opts: SandboxListOpts = {}): SandboxPaginator {
    return new SandboxPaginator(ConnectionConfig.resolve(opts), opts)
  }

  private sameHostd(): ConnectionOpts {
    return { hostd: this.config.address, apiKey: this.config.apiKey, tls: this.config.tls, requestTimeoutMs: this.config.requestTimeoutMs }
  }
}

async function getOrResume(config: ConnectionConfig, sandboxId: string, timeoutMs?: number): Promise<PbSandboxInfo> {
  if (!sandboxId) throw new InvalidArgumentError('sandboxId: required')
  const info = await call(config, (s) => s.get, GetRequest.fromPartial({ sandboxId }), `connecting to sandbox ${sandboxId}`)
  if (info.state !== SandboxState.SANDBOX_STATE_PAUSED) return info
  const req = ResumeRequest.fromPartial({
    sandboxId,
    timeoutSeconds: timeoutMs === undefined ? undefined : seconds(timeoutMs),
  })
  return call(config, (s) => s.resume, req, `resuming sandbox ${sandboxId}`, CREATE_TIMEOUT_MS)
}
