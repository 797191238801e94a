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
