"""The output log's accounting: order across streams, no loss within capacity,
exact dropped counts beyond it (in-process: pure data structure)."""

from __future__ import annotations

import random

from guestd.process.output import OutputLog


def drain(log: OutputLog, cur) -> tuple[dict[str, bytes], dict[str, int], list[str]]:  # type: ignore[no-untyped-def]
    got = {"stdout": b"", "stderr": b""}
    dropped = {"stdout": 0, "stderr": 0}
    order: list[str] = []
    while True:
        d, item = log.take(cur)
        for k, n in d.items():
            dropped[k] += n
        if item is None:
            return got, dropped, order
        got[item[0]] += item[1]
        order.append(item[0])


def test_reader_within_capacity_loses_nothing_and_keeps_order() -> None:
    rng = random.Random(7)
    cap = 4096
    log = OutputLog(("stdout", "stderr"), cap)
    cur = log.new_cursor()
    want = {"stdout": b"", "stderr": b""}
    got = {"stdout": b"", "stderr": b""}
    for i in range(3000):
        kind = rng.choice(["stdout", "stderr"])
        data = bytes([i % 251]) * rng.randint(1, 900)
        # The manager's rule: read only while the reader is <= capacity - read behind.
        while log.unread(cur, kind) > cap - 1024:
            d, item = log.take(cur)
            assert not d
            assert item is not None
            got[item[0]] += item[1]
        log.append(kind, data[:1024])
        want[kind] += data[:1024]
        if rng.random() < 0.3:
            d, item = log.take(cur)
            assert not d
            if item:
                got[item[0]] += item[1]
    rest, dropped, _ = drain(log, cur)
    assert dropped == {"stdout": 0, "stderr": 0}
    assert {k: got[k] + rest[k] for k in got} == want
    assert all(s.size <= cap + cap // 4 for s in log.streams.values())


def test_late_reader_gets_exact_dropped_counts_and_the_tail() -> None:
    log = OutputLog(("stdout", "stderr"), 4096)
    out = b"".join(bytes([i % 256]) * 100 for i in range(200))
    for i in range(0, len(out), 100):
        log.append("stdout", out[i : i + 100])
        log.append("stderr", b"e")
    got, dropped, _ = drain(log, log.new_cursor())
    assert dropped["stdout"] + len(got["stdout"]) == len(out)
    assert out.endswith(got["stdout"]) and len(got["stdout"]) >= 4096
    assert dropped["stderr"] == 0 and got["stderr"] == b"e" * 200


def test_interleaving_order_is_kept() -> None:
    log = OutputLog(("stdout", "stderr"), 1 << 20)
    seq = ["stdout", "stdout", "stderr", "stdout", "stderr", "stderr", "stdout"]
    for i, k in enumerate(seq):
        log.append(k, str(i).encode())
    _, _, order = drain(log, log.new_cursor())
    # consecutive writes to one stream coalesce; the alternation is preserved
    assert order == ["stdout", "stderr", "stdout", "stderr", "stdout"]


def test_live_only_cursor_skips_history() -> None:
    log = OutputLog(("stdout",), 1 << 20)
    log.append("stdout", b"old")
    cur = log.new_cursor(live_only=True)
    log.append("stdout", b"new")
    got, _, _ = drain(log, cur)
    assert got["stdout"] == b"new"


def test_take_parts_coalesces_a_run_up_to_the_limit_without_copying() -> None:
    log = OutputLog(("stdout", "stderr"), 1 << 20)
    reads = [bytes([i]) * (100 * 1024) for i in range(5)]  # big reads: one chunk each
    for r in reads:
        log.append("stdout", r)
    log.append("stderr", b"err")
    log.append("stdout", b"after")
    cur = log.new_cursor()
    _, item = log.take_parts(cur, 250 * 1024)
    assert item is not None and item[0] == "stdout"
    parts = item[1]
    assert parts[0] is reads[0] and parts[1] is reads[1]  # whole chunks: the read's bytes
    assert b"".join(parts) == b"".join(reads)[: 250 * 1024]
    _, item = log.take_parts(cur, 1 << 20)
    assert item is not None
    assert b"".join(item[1]) == b"".join(reads)[250 * 1024 :]  # stops before stderr's run
    _, item = log.take_parts(cur, 1 << 20)
    assert item == ("stderr", [b"err"])
    _, whole = log.take(cur)
    assert whole == ("stdout", b"after")


def test_small_reads_grow_one_chunk_and_held_views_survive_growth() -> None:
    log = OutputLog(("stdout",), 1 << 20)
    cur = log.new_cursor()
    log.append("stdout", b"a" * 10)
    _, first = log.take_parts(cur, 1 << 20)
    for _ in range(100):
        log.append("stdout", b"b" * 10)
    assert len(log.streams["stdout"].chunks) == 1
    assert first is not None and b"".join(first[1]) == b"a" * 10
    _, item = log.take(cur)
    assert item == ("stdout", b"b" * 1000)


def test_data_event_bytes_is_the_protobuf_encoding() -> None:
    from guestd.process.service import data_event_bytes
    from moru_proto.guest.v1 import process_pb2 as pb

    for n in (1, 127, 128, 16383, 16384, 1 << 20, (1 << 21) + 5):
        data = bytes(range(256)) * (n // 256) + b"x" * (n % 256)
        for kind in ("stdout", "stderr", "pty"):
            parts: list[bytes | memoryview] = [data[: n // 3], memoryview(data)[n // 3 :]]
            want = pb.ProcessEvent(data=pb.DataEvent(**{kind: data})).SerializeToString()
            assert data_event_bytes(kind, parts) == want
            assert pb.ProcessEvent.FromString(want).data.WhichOneof("output") == kind
