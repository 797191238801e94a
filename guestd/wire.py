"""Hand-built protobuf encoding for the bulk messages guestd streams.

protobuf copies a bytes field into the message and again when serializing; for
output and file data, guestd builds the few header bytes itself and joins them
with the payload once. The edge interceptor sends such bytes as they are.
Tests check these encodings against protobuf's byte for byte.
"""

from __future__ import annotations


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def len_key(msg: type, field: str) -> bytes:
    """The wire key of a length-delimited field (wire type 2)."""
    return varint(msg.DESCRIPTOR.fields_by_name[field].number << 3 | 2)  # type: ignore[attr-defined]


def only_field(raw: bytes, key: bytes) -> memoryview | None:
    """The payload of `raw` when `raw` is a message holding exactly one
    length-delimited field with wire key `key` (one byte), as a view: no copy.
    None for anything else, which the caller parses with protobuf."""
    if not raw or raw[0] != key[0] or len(key) != 1:
        return None
    n = shift = 0
    i = 1
    while i < len(raw) and i < 11:
        b = raw[i]
        n |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return memoryview(raw)[i:] if i + n == len(raw) else None
        shift += 7
    return None
