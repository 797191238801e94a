"""A process's kept output: one bounded buffer per stream, read by cursors.

Each stream (stdout, stderr or pty) keeps at most `capacity` bytes: the newest
ones. Chunks carry a process-wide sequence number that changes whenever the
stream being written changes, so a reader that merges the streams by sequence
sees stdout and stderr in the order guestd read them. Chunks hold immutable
`bytes` (a pipe read is stored as is, not copied); only the newest chunk of the
whole process grows, and only while it is small (GROW_MAX), which keeps the
chunk count bounded without breaking that order.

Readers take *parts*: the bytes objects (or memoryviews of them) that make up
the next message, up to a size limit and across chunks of the same run, so a
message is assembled with a single copy where it is encoded (`take_parts`).

A `Cursor` is one reader's position (Start or Connect stream). When the
buffer trimmed bytes a cursor had not read yet, the cursor reports them as
dropped before the next data: output is never lost silently.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

STDOUT, STDERR, PTY = "stdout", "stderr", "pty"
CHUNK_MAX = 1024 * 1024
GROW_MAX = 64 * 1024  # a newest chunk smaller than this absorbs the next small read
Part = bytes | memoryview


@dataclass(eq=False)
class _Chunk:
    seq: int
    start: int  # offset of data[0] within its stream
    data: bytes


class StreamBuffer:
    """The newest `capacity` bytes of one output stream (plus at most one chunk).

    Only whole chunks are dropped, and only while the rest still holds at
    least `capacity` bytes, so a reader that is at most `capacity` bytes behind
    never loses anything. Chunks are at most capacity/4, which bounds the
    overshoot to a quarter of the capacity.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunk_max = max(1, min(CHUNK_MAX, capacity // 4))
        self.chunks: deque[_Chunk] = deque()
        self.first = 0  # absolute index of chunks[0]
        self.size = 0  # bytes held
        self.end = 0  # bytes ever written
        self.trimmed = 0  # bytes ever dropped (== offset of the first held byte)

    def append(self, seq: int, data: bytes, grow_last: bool) -> None:
        last = self.chunks[-1] if self.chunks else None
        if (grow_last and last is not None and len(last.data) < GROW_MAX
                and len(last.data) + len(data) <= self.chunk_max):
            last.data += data  # a new bytes object: views a reader holds stay valid
        else:
            self.chunks.append(_Chunk(seq, self.end, bytes(data)))
        self.size += len(data)
        self.end += len(data)
        while len(self.chunks) > 1 and self.size - len(self.chunks[0].data) >= self.capacity:
            old = self.chunks.popleft()
            self.first += 1
            self.size -= len(old.data)
            self.trimmed += len(old.data)


@dataclass
class Cursor:
    """One reader's position in every stream: (chunk index, offset in chunk)."""

    index: dict[str, int] = field(default_factory=dict)
    offset: dict[str, int] = field(default_factory=dict)  # absolute stream offset
    dropped: dict[str, int] = field(default_factory=dict)


class OutputLog:
    """All streams of one process plus the sequence counter that orders them."""

    def __init__(self, kinds: tuple[str, ...], capacity: int) -> None:
        self.streams = {k: StreamBuffer(capacity) for k in kinds}
        self._seq = 0
        self._last_kind = ""

    def append(self, kind: str, data: bytes) -> None:
        grow = self._last_kind == kind
        if not grow:
            self._seq += 1
            self._last_kind = kind
        self.streams[kind].append(self._seq, data, grow)

    def held_bytes(self) -> int:
        return sum(s.size for s in self.streams.values())

    def new_cursor(self, live_only: bool = False) -> Cursor:
        cur = Cursor()
        for kind, s in self.streams.items():
            if live_only:
                cur.index[kind], cur.offset[kind] = s.first + len(s.chunks), s.end
                # A still-growing last chunk: start after what it holds now.
                if s.chunks:
                    cur.index[kind] -= 1
            else:
                cur.index[kind], cur.offset[kind] = 0, 0
            cur.dropped[kind] = 0
        return cur

    def unread(self, cur: Cursor, kind: str) -> int:
        return self.streams[kind].end - cur.offset[kind]

    def take(self, cur: Cursor, limit: int = CHUNK_MAX,
             ) -> tuple[dict[str, int], tuple[str, bytes] | None]:
        """Next data for `cur`: (newly dropped bytes per stream, (kind, data) or None)."""
        dropped, item = self.take_parts(cur, limit)
        if item is None:
            return dropped, None
        kind, parts = item
        return dropped, (kind, parts[0] if len(parts) == 1 and isinstance(parts[0], bytes)
                         else b"".join(parts))

    def take_parts(self, cur: Cursor, limit: int,
                   ) -> tuple[dict[str, int], tuple[str, list[Part]] | None]:
        """Like `take`, without copying: the next at most `limit` bytes of one
        stream as a list of parts (whole chunks or views of them), coalesced
        across that stream's chunks as long as no other stream's output came
        in between."""
        dropped: dict[str, int] = {}
        best: tuple[int, str] | None = None
        for kind, s in self.streams.items():
            if cur.offset[kind] < s.trimmed:
                dropped[kind] = s.trimmed - cur.offset[kind]
                cur.offset[kind] = s.trimmed
                cur.index[kind] = s.first
            if cur.index[kind] < s.first:
                cur.index[kind] = s.first
            i = cur.index[kind] - s.first
            while i < len(s.chunks):
                ch = s.chunks[i]
                if cur.offset[kind] < ch.start + len(ch.data):
                    if best is None or ch.seq < best[0]:
                        best = (ch.seq, kind)
                    break
                if i + 1 == len(s.chunks):
                    break  # stay on the newest chunk: it may still grow
                i += 1
            cur.index[kind] = s.first + i
        if best is None:
            return dropped, None
        seq, kind = best
        s = self.streams[kind]
        i = cur.index[kind] - s.first
        off = cur.offset[kind]
        parts: list[Part] = []
        n = 0
        while n < limit:
            ch = s.chunks[i]
            if ch.seq != seq:
                break
            lo = off - ch.start
            hi = min(len(ch.data), lo + limit - n)
            if lo < hi:
                parts.append(ch.data if lo == 0 and hi == len(ch.data)
                             else memoryview(ch.data)[lo:hi])
                n += hi - lo
                off += hi - lo
            if hi < len(ch.data) or i + 1 == len(s.chunks):
                break  # part of this chunk is left, or it is the newest (it may grow)
            i += 1
        cur.index[kind] = s.first + i
        cur.offset[kind] = off
        return dropped, (kind, parts)
