/**
 * Where hostd is and how to talk to it: address, TLS, API key, gRPC clients,
 * and the two call shapes (unary with a deadline, streams without one).
 *
 * Each setting comes from the call's option, then the environment
 * (MORU_HOSTD, MORU_API_KEY, MORU_HOSTD_TLS, MORU_HOSTD_CA), then the default
 * (the local socket unix:/run/moru/hostd.sock, no key), as in the Python SDK.
 */
import { readFileSync } from 'node:fs'
import {
  credentials,
  Metadata,
  type CallOptions,
  type ChannelCredentials,
  type ClientOptions,
  type ClientUnaryCall,
  type ServiceError,
} from '@grpc/grpc-js'
import { translate } from './errors.js'

export const DEFAULT_HOSTD = 'unix:/run/moru/hostd.sock'
export const SANDBOX_HEADER = 'sandbox-id'
export const TOKEN_HEADER = 'x-moru-access-token'
export const DEFAULT_REQUEST_TIMEOUT_MS = 60_000
/** Create boots a VM; under TCG on a loaded machine that takes minutes. */
export const CREATE_TIMEOUT_MS = 600_000

/** How to reach hostd; the options every call accepts. */
export interface ConnectionOpts {
  /** hostd's address: `unix:/path`, `/path`, `host:port`, `https://host:port`. */
  hostd?: string
  apiKey?: string
  /** Use TLS to a `host:port` address (default from MORU_HOSTD_TLS). */
  tls?: boolean
  /** Deadline of each non-streaming call; 0 for none. */
  requestTimeoutMs?: number
}

function truthy(v: string | undefined): boolean {
  return ['1', 'true', 'yes', 'on'].includes((v ?? '').trim().toLowerCase())
}

export class ConnectionConfig {
  constructor(
    readonly address: string,
    readonly apiKey: string | undefined,
    readonly tls: boolean,
    readonly rootCertificates: Buffer | undefined,
    readonly requestTimeoutMs: number,
  ) {}

  /** Options first, then the MORU_* environment, then defaults. */
  static resolve(opts: ConnectionOpts = {}): ConnectionConfig {
    let address = opts.hostd || process.env.MORU_HOSTD || DEFAULT_HOSTD
    let tls = opts.tls ?? truthy(process.env.MORU_HOSTD_TLS)
    if (address.startsWith('https://')) {
      address = address.slice('https://'.length)
      tls = opts.tls ?? true
    } else if (address.startsWith('http://')) {
      address = address.slice('http://'.length)
    } else if (address.startsWith('/')) {
      address = `unix:${address}`
    }
    const ca = process.env.MORU_HOSTD_CA
    return new ConnectionConfig(
      address,
      opts.apiKey ?? (process.env.MORU_API_KEY || undefined),
      tls,
      ca && tls ? readFileSync(ca) : undefined,
      opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    )
  }

  /** Call metadata: the API key, and for guest calls the sandbox and its token. */
  metadata(sandboxId?: string, accessToken?: string): Metadata {
    const md = new Metadata()
    if (this.apiKey) md.set('authorization', `Bearer ${this.apiKey}`)
    if (sandboxId) md.set(SANDBOX_HEADER, sandboxId)
    if (accessToken) md.set(TOKEN_HEADER, accessToken)
    return md
  }

  credentials(): ChannelCredentials {
    return this.tls ? credentials.createSsl(this.rootCertificates ?? null) : credentials.createInsecure()
  }

  /** Call options with this config's deadline (`ms` overrides; 0: none). */
  unaryOptions(ms: number = this.requestTimeoutMs): Partial<CallOptions> {
    return ms > 0 ? { deadline: new Date(Date.now() + ms) } : {}
  }
}

// No client keepalive pings: hostd answers pings during a minutes-long Create
// with GOAWAY "too_many_pings" (seen with the Python SDK).
const CLIENT_OPTIONS: Partial<ClientOptions> = {
  'grpc.max_receive_message_length': -1,
  'grpc.max_send_message_length': -1,
}

type ClientCtor<C> = new (address: string, creds: ChannelCredentials, options?: Partial<ClientOptions>) => C

// Per service constructor (generated constructors share one class name), per address.
const clients = new Map<unknown, Map<string, unknown>>()

/** The cached client of service `ctor` for `config`'s address (one channel each). */
export function client<C>(ctor: ClientCtor<C>, config: ConnectionConfig): C {
  const key = `${config.address}\0${config.tls}\0${config.rootCertificates?.toString('base64') ?? ''}`
  let perService = clients.get(ctor)
  if (perService === undefined) clients.set(ctor, (perService = new Map()))
  let c = perService.get(key) as C | undefined
  if (c === undefined) {
    c = new ctor(config.address, config.credentials(), CLIENT_OPTIONS)
    perService.set(key, c)
  }
  return c
}

/** Closes every cached client (lets a script's process exit at once). */
export function closeClients(): void {
  for (const perService of clients.values()) {
    for (const c of perService.values()) (c as { close(): void }).close()
  }
  clients.clear()
}

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall

/** A unary call as a promise; gRPC errors become SandboxErrors naming `what`. */
export function unary<Req, Res>(
  method: UnaryMethod<Req, Res>,
  self: unknown,
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  what: string,
  where: { address?: string; guest?: boolean },
): Promise<Res> {
  return new Promise<Res>((resolve, reject) => {
    method.call(self, request, metadata, options, (err, res) => {
      if (err) reject(translate(err, what, where))
      else resolve(res)
    })
  })
}
