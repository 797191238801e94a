/**
 * `sandbox.files`: streamed read and write, listing, stat, watching.
 *
 * Reads and writes stream in CHUNK-sized messages, so a file of any size
 * passes with bounded memory; streams carry no gRPC deadline (a large upload
 * must not be cut off by the client); unary calls use requestTimeoutMs.
 */
import type { ClientReadableStream, ClientWritableStream } from '@grpc/grpc-js'
import { NotFoundError, SandboxError } from './errors.js'
import type { GuestTarget } from './guest.js'
import { entryInfo, filesystemEvent, type EntryInfo, type FilesystemEvent } from './models.js'
import {
  ListDirRequest,
  MakeDirRequest,
  MoveRequest,
  ReadRequest,
  RemoveRequest,
  StatRequest,
  WatchRequest,
  WriteRequest,
  type ReadResponse,
  type WatchEvent,
  type WriteResponse,
} from './gen/moru_proto/guest/v1/filesystem.js'

const CHUNK = 1024 * 1024

export type WriteData = string | ArrayBuffer | Uint8Array | Blob | ReadableStream<Uint8Array | string>

/** Slices of at most CHUNK bytes of any accepted `data`, read lazily. */
async function* chunksOf(data: WriteData): AsyncGenerator<Uint8Array> {
  if (typeof data === 'string') data = new TextEncoder().encode(data)
  if (data instanceof ArrayBuffer) data = new Uint8Array(data)
  if (data instanceof Uint8Array) {
    for (let i = 0; i < data.length; i += CHUNK) yield data.subarray(i, i + CHUNK)
    return
  }
  const stream: ReadableStream<Uint8Array | string> = data instanceof Blob ? data.stream() : data
  const reader = stream.getReader()
  try {
    for (;;) {
      const { done, value } = await reader.read()
      if (done) return
      const b = typeof value === 'string' ? new TextEncoder().encode(value) : value
      for (let i = 0; i < b.length; i += CHUNK) yield b.subarray(i, i + CHUNK)
    }
  } finally {
    reader.releaseLock()
  }
}

function knownSize(data: WriteData): number | undefined {
  if (typeof data === 'string') return Buffer.byteLength(data)
  if (data instanceof ArrayBuffer || data instanceof Uint8Array) return data.byteLength
  if (data instanceof Blob) return data.size
  return undefined
}

export type WatchCallback = (event: FilesystemEvent) => void | Promise<void>

/** A directory watch; `stop()` ends it. Events arrive at the callback. */
export class WatchHandle {
  private readonly done: Promise<void>
  private stopped = false

  /** Internal; use files.watchDir. */
  constructor(
    private readonly call: ClientReadableStream<WatchEvent>,
    events: AsyncIterator<WatchEvent>,
    onEvent: WatchCallback,
    onExit?: (err?: Error) => void,
    target?: GuestTarget,
  ) {
    this.done = (async () => {
      try {
        for (;;) {
          const r = await events.next()
          if (r.done) break
          if (r.value.filesystem) await onEvent(filesystemEvent(r.value.filesystem))
        }
        onExit?.()
      } catch (e) {
        if (this.stopped) onExit?.()
        else onExit?.((target ? target.error(e, 'watching directory') : e) as Error)
      }
    })()
  }

  /** Ends the watch. */
  async stop(): Promise<void> {
    this.stopped = true
    this.call.cancel()
    await this.done
  }
}

/** Files in one sandbox (`sandbox.files`). Paths are absolute. */
export class Files {
  /** Internal; use `sandbox.files`. */
  constructor(private readonly target: GuestTarget) {}

  /** Opens a Read stream and waits for its first message, so a missing file fails here. */
  private async open(
    path: string,
    user: string | undefined,
  ): Promise<[ReadResponse | undefined, AsyncIterator<ReadResponse>, () => void]> {
    const call = this.target.filesystem().read(ReadRequest.fromPartial({ path, user: user ?? '' }), this.target.metadata())
    call.on('error', () => {}) // errors reach the iterator
    const it = (call as AsyncIterable<ReadResponse>)[Symbol.asyncIterator]()
    try {
      const r = await it.next()
      return [r.done ? undefined : r.value, it, () => call.cancel()]
    } catch (e) {
      call.cancel()
      throw this.target.error(e, `reading ${path}`)
    }
  }

  /**
   * The file's content as text (default), bytes, or a ReadableStream of chunks.
   * Every call takes `user` (name or uid): guestd then acts with that user's
   * rights (PermissionDeniedError where they may not); default root.
   */
  read(path: string, opts?: { format?: 'text'; user?: string }): Promise<string>
  read(path: string, opts: { format: 'bytes'; user?: string }): Promise<Uint8Array>
  read(path: string, opts: { format: 'stream'; user?: string }): Promise<ReadableStream<Uint8Array>>
  async read(
    path: string,
    opts: { format?: 'text' | 'bytes' | 'stream'; user?: string } = {},
  ): Promise<string | Uint8Array | ReadableStream<Uint8Array>> {
    const format = opts.format ?? 'text'
    if (!['text', 'bytes', 'stream'].includes(format)) {
      throw new TypeError(`files.read: format must be "text", "bytes" or "stream", not ${JSON.stringify(format)}`)
    }
    const [first, it, cancel] = await this.open(path, opts.user)
    const target = this.target
    if (format === 'stream') {
      let pending: Uint8Array | undefined = first?.data.length ? first.data : undefined
      return new ReadableStream<Uint8Array>({
        async pull(controller) {
          if (pending) {
            controller.enqueue(pending)
            pending = undefined
            return
          }
          try {
            for (;;) {
              const r = await it.next()
              if (r.done) return controller.close()
              if (r.value.data.length) return controller.enqueue(r.value.data)
            }
          } catch (e) {
            controller.error(target.error(e, `reading ${path}`))
          }
        },
        cancel() {
          cancel()
        },
      })
    }
    const parts: Uint8Array[] = first?.data.length ? [first.data] : []
    try {
      for (;;) {
        const r = await it.next()
        if (r.done) break
        if (r.value.data.length) parts.push(r.value.data)
      }
    } catch (e) {
      throw this.target.error(e, `reading ${path}`)
    }
    const all = Buffer.concat(parts)
    return format === 'text' ? all.toString('utf8') : new Uint8Array(all.buffer, all.byteOffset, all.length)
  }

  /** Writes `data` to `path`, streamed; parents are created; the file is replaced atomically. */
  async write(path: string, data: WriteData, opts: { user?: string; mode?: number } = {}): Promise<EntryInfo> {
    let call: ClientWritableStream<WriteRequest> | undefined
    const response = new Promise<WriteResponse>((resolve, reject) => {
      call = this.target.filesystem().write(this.target.metadata(), (err, res) => {
        if (err) reject(this.target.error(err, `writing ${path}`))
        else resolve(res!)
      })
    })
    response.catch(() => {}) // awaited below; avoids an unhandled rejection while still sending
    const c = call!
    const send = (msg: WriteRequest): Promise<void> =>
      new Promise((resolve) => {
        if (c.write(msg)) resolve()
        else c.once('drain', resolve)
      })
    try {
      await send(
        WriteRequest.fromPartial({
          header: { path, user: opts.user ?? '', mode: opts.mode ?? 0, size: knownSize(data) },
        }),
      )
      for await (const piece of chunksOf(data)) await send(WriteRequest.fromPartial({ data: Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength) }))
      c.end()
    } catch (e) {
      c.cancel()
      throw e
    }
    const res = await response
    return entryInfo(res.entry)
  }

  /** Entries under a directory, `depth` levels deep. */
  async list(path: string, opts: { depth?: number; user?: string } = {}): Promise<EntryInfo[]> {
    const fs = this.target.filesystem()
    const req = ListDirRequest.fromPartial({ path, depth: opts.depth ?? 1, user: opts.user ?? '' })
    const resp = await this.target.call(fs.listDir, fs, req, `listing ${path}`)
    return resp.entries.map(entryInfo)
  }

  /** Type, size, mode, owner and mtime of a path. */
  async getInfo(path: string, opts: { user?: string } = {}): Promise<EntryInfo> {
    const fs = this.target.filesystem()
    const resp = await this.target.call(fs.stat, fs, StatRequest.fromPartial({ path, user: opts.user ?? '' }), `stat ${path}`)
    return entryInfo(resp.entry)
  }

  async exists(path: string, opts: { user?: string } = {}): Promise<boolean> {
    try {
      await this.getInfo(path, opts)
    } catch (e) {
      if (e instanceof NotFoundError) return false
      throw e
    }
    return true
  }

  /** Removes a file, or a directory with its contents. */
  async remove(path: string, opts: { user?: string } = {}): Promise<void> {
    const fs = this.target.filesystem()
    const req = RemoveRequest.fromPartial({ path, recursive: true, user: opts.user ?? '' })
    await this.target.call(fs.remove, fs, req, `removing ${path}`)
  }

  async rename(oldPath: string, newPath: string, opts: { user?: string } = {}): Promise<EntryInfo> {
    const fs = this.target.filesystem()
    const resp = await this.target.call(
      fs.move,
      fs,
      MoveRequest.fromPartial({ source: oldPath, destination: newPath, user: opts.user ?? '' }),
      `renaming ${oldPath} to ${newPath}`,
    )
    return entryInfo(resp.entry)
  }

  /** Creates a directory and its parents; false if it existed already. */
  async makeDir(path: string, opts: { user?: string } = {}): Promise<boolean> {
    const fs = this.target.filesystem()
    const resp = await this.target.call(fs.makeDir, fs, MakeDirRequest.fromPartial({ path, user: opts.user ?? '' }), `making directory ${path}`)
    return resp.created
  }

  /**
   * Watches a directory; resolves once the watch is in place, so every change
   * made after it is reported to `onEvent`.
   */
  async watchDir(
    path: string,
    onEvent: WatchCallback,
    opts: { recursive?: boolean; user?: string; onExit?: (err?: Error) => void } = {},
  ): Promise<WatchHandle> {
    const call = this.target.filesystem().watch(
      WatchRequest.fromPartial({ path, recursive: opts.recursive ?? false, user: opts.user ?? '' }),
      this.target.metadata(),
    )
    call.on('error', () => {}) // errors reach the iterator
    const it = (call as AsyncIterable<WatchEvent>)[Symbol.asyncIterator]()
    try {
      for (;;) {
        const r = await it.next()
        if (r.done) throw new SandboxError(`watch of ${path} ended before it started`)
        if (r.value.started) break
      }
    } catch (e) {
      call.cancel()
      throw this.target.error(e, `watching ${path}`)
    }
    return new WatchHandle(call, it, onEvent, opts.onExit, this.target)
  }
}
