/**
 * Volumes: persistent disks that outlive sandboxes. One sandbox mounts a
 * volume at a time (`Sandbox.create({ volumeId, volumeMountPath })`); what it
 * wrote is there for the next. hostd refuses (FailedPreconditionError) a
 * second mount or a delete while a sandbox has it. As the Python SDK's Volume.
 */
import { client, ConnectionConfig, unary, type ConnectionOpts } from './connection.js'
import { InvalidArgumentError, NotFoundError } from './errors.js'
import {
  CreateVolumeRequest,
  DeleteVolumeRequest,
  GetVolumeRequest,
  ListVolumesRequest,
  VolumeServiceClient,
  type VolumeInfo as PbVolumeInfo,
} from './gen/moru_proto/host/v1/volume.js'

export interface VolumeInfo {
  volumeId: string
  name: string
  sizeMB: number
  createdAt: Date
  /** The sandbox that has it mounted; undefined when free. */
  attachedTo?: string
  /** What the sparse disk file really takes on the node. */
  usedBytes: number
}

function volumeInfo(m: PbVolumeInfo): VolumeInfo {
  return {
    volumeId: m.volumeId,
    name: m.name,
    sizeMB: m.sizeMb,
    createdAt: m.createdAt ?? new Date(0),
    attachedTo: m.attachedTo || undefined,
    usedBytes: m.usedBytes,
  }
}

function call<Req, Res>(
  opts: ConnectionOpts,
  pick: (s: VolumeServiceClient) => Parameters<typeof unary<Req, Res>>[0],
  request: Req,
  what: string,
): Promise<Res> {
  const config = ConnectionConfig.resolve(opts)
  const s = client(VolumeServiceClient, config)
  return unary(pick(s), s, request, config.metadata(), config.unaryOptions(), what, { address: config.address })
}

/** Volumes on the node: `Volume.create(name, sizeMB)`, `list()`, `get(id)`, `delete(id)`. */
export class Volume {
  /** A new empty ext4 volume; `name` is unique on the node. */
  static async create(name: string, sizeMB = 1024, opts: ConnectionOpts = {}): Promise<VolumeInfo> {
    if (!Number.isInteger(sizeMB) || sizeMB <= 0) {
      throw new InvalidArgumentError(`sizeMB: expected a whole number > 0, got ${sizeMB}`)
    }
    const req = CreateVolumeRequest.fromPartial({ name, sizeMb: sizeMB })
    return volumeInfo(await call(opts, (s) => s.create, req, `creating volume ${JSON.stringify(name)}`))
  }

  /** One volume; NotFoundError if there is none with that id. */
  static async get(volumeId: string, opts: ConnectionOpts = {}): Promise<VolumeInfo> {
    const req = GetVolumeRequest.fromPartial({ volumeId })
    return volumeInfo(await call(opts, (s) => s.get, req, `getting volume ${volumeId}`))
  }

  static async list(opts: ConnectionOpts = {}): Promise<VolumeInfo[]> {
    const resp = await call(opts, (s) => s.list, ListVolumesRequest.fromPartial({}), 'listing volumes')
    return resp.volumes.map(volumeInfo)
  }

  /** Deletes the volume and its data; false if it did not exist. */
  static async delete(volumeId: string, opts: ConnectionOpts = {}): Promise<boolean> {
    try {
      await call(opts, (s) => s.delete, DeleteVolumeRequest.fromPartial({ volumeId }), `deleting volume ${volumeId}`)
    } catch (e) {
      if (e instanceof NotFoundError) return false
      throw e
    }
    return true
  }
}
