"""The guest side of one sandbox: stubs and metadata for Process/Filesystem calls.

Both go to hostd (which forwards them to the sandbox's guestd by the
`sandbox-id` metadata), or straight to a bare guestd in tests: guestd ignores
`sandbox-id`, so the same code runs against either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from moru._connection import ConnectionConfig, channel
from moru._errors import translate
from moru_proto.guest.v1 import filesystem_pb2_grpc, process_pb2_grpc


@dataclass(frozen=True)
class GuestTarget:
    """A sandbox's guest API: which hostd, which sandbox, which token."""

    config: ConnectionConfig
    sandbox_id: str
    access_token: str | None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.config.metadata(self.sandbox_id, self.access_token)

    @property
    def timeout(self) -> float | None:
        """Deadline for unary guest calls; streams never get one."""
        return self.config.request_timeout

    # Typed Any: the generated stubs are typed for the sync API only.
    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """translate() for a guest call: typed exceptions naming hostd's address."""
        with translate(what, address=self.config.address, guest=True):
            yield

    def process(self) -> Any:
        return process_pb2_grpc.ProcessStub(channel(self.config))

    def filesystem(self) -> Any:
        return filesystem_pb2_grpc.FilesystemStub(channel(self.config))
