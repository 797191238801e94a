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
