/**
 * The guest side of one sandbox: which hostd, which sandbox, which token.
 * Process and Filesystem calls go to hostd, which forwards them to the
 * sandbox's guestd by the `sandbox-id` metadata and checks the access token.
 */
import type { CallOptions, Metadata } from '@grpc/grpc-js'
import { client, unary, type ConnectionConfig } from './connection.js'
import { translate } from './errors.js'
import { ProcessClient } from './gen/moru_proto/guest/v1/process.js'
import { FilesystemClient } from './gen/moru_proto/guest/v1/filesystem.js'

export class GuestTarget {
  constructor(
    readonly config: ConnectionConfig,
    readonly sandboxId: string,
    readonly accessToken: string | undefined,
  ) {}

  metadata(): Metadata {
    return this.config.metadata(this.sandboxId, this.accessToken)
  }

  process(): ProcessClient {
    return client(ProcessClient, this.config)
  }

  filesystem(): FilesystemClient {
    return client(FilesystemClient, this.config)
  }

  /** Deadline for unary guest calls; streams never get one. */
  unaryOptions(): Partial<CallOptions> {
    return this.config.unaryOptions()
  }

  /** A guest error as the SDK's error naming `what`. */
  error(e: unknown, what: string): unknown {
    return translate(e, what, { address: this.config.address, guest: true })
  }

  /** A unary guest call with the sandbox's metadata and the request deadline. */
  call<Req, Res>(
    method: Parameters<typeof unary<Req, Res>>[0],
    self: unknown,
    request: Req,
    what: string,
  ): Promise<Res> {
    return unary(method, self, request, this.metadata(), this.unaryOptions(), what, {
      address: this.config.address,
      guest: true,
    })
  }
}
