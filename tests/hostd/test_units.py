"""Unit tests without VMs: config, store, state table, paging, validation, events."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from hostd import paging, validation
from hostd.config import Config, ConfigError, load
from hostd.errors import FailedPrecondition, InvalidArgument
from hostd.events import Event, EventBus, EventType, Reason
from hostd.state import TRANSITIONS, Action, State, transition
from hostd.store import SandboxRecord, Store

# -- config -----------------------------------------------------------------


def test_config_defaults_work_on_one_machine() -> None:
    cfg = load(None, environ={})
    assert cfg.listen == "unix:/run/moru/hostd.sock"
    assert cfg.default_timeout_seconds == 300
    assert cfg.max_timeout_seconds == 24 * 3600
    assert cfg.network.enabled is True


def test_config_file_env_and_flags_layer(tmp_path: Path) -> None:
    f = tmp_path / "hostd.toml"
    f.write_text('max_sandboxes = 3\nstate_dir = "/tmp/x"\n[network]\nenabled = false\n')
    cfg = load(f, environ={"MORU_MAX_SANDBOXES": "5", "MORU_NETWORK_POOL_CIDR": "10.9.0.0/16"})
    assert cfg.max_sandboxes == 5  # env beats file
    assert cfg.state_dir == "/tmp/x"
    assert cfg.network.enabled is False
    assert cfg.network.pool_cidr == "10.9.0.0/16"
    cfg = load(f, overrides={"max_sandboxes": "7", "network.enabled": "true"}, environ={})
    assert cfg.max_sandboxes == 7 and cfg.network.enabled is True


def test_config_unknown_key_is_an_error_with_hint(tmp_path: Path) -> None:
    f = tmp_path / "hostd.toml"
    f.write_text("max_sandboxs = 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'max_sandboxs'.*did you mean 'max_sandboxes'"
    ):
        load(f, environ={})
    f.write_text("[network]\nuplnk = 'eth0'\n")
    with pytest.raises(ConfigError, match=r"network.uplnk.*'uplink'"):
        load(f, environ={})


def test_config_wrong_types_and_rules(tmp_path: Path) -> None:
    f = tmp_path / "hostd.toml"
    f.write_text('max_sandboxes = "many"\n')
    with pytest.raises(ConfigError, match=r"max_sandboxes: expected an integer"):
        load(f, environ={})
    with pytest.raises(ConfigError, match=r"accel"):
        load(None, overrides={"accel": "xen"}, environ={})
    with pytest.raises(ConfigError, match=r"tcp_listen: needs tls_cert"):
        load(None, overrides={"tcp_listen": "0.0.0.0:5000"}, environ={})
    with pytest.raises(ConfigError, match=r"default_timeout_seconds"):
        load(None, overrides={"default_timeout_seconds": "0"}, environ={})
    with pytest.raises(ConfigError, match=r"network.enabled: expected true or false"):
        load(None, environ={"MORU_NETWORK_ENABLED": "maybe"})


def test_config_shares_env_names_with_the_other_tools() -> None:
    # MORU_API_KEY and MORU_IMAGES_DIR mean the same to hostd, the SDK and
    # moru-images; MORU_HOSTD (the SDK's address) is not hostd's and is ignored.
    cfg = load(
        None, environ={"MORU_HOSTD": "unix:/x", "MORU_API_KEY": "k", "MORU_IMAGES_DIR": "/i"}
    )
    assert cfg.api_key == "k"
    assert cfg.images_path == Path("/i")
    assert cfg.listen == "unix:/run/moru/hostd.sock"


# -- store ------------------------------------------------------------------


def _rec(sid: str, created: float, **kw: object) -> SandboxRecord:
    return SandboxRecord(
        sandbox_id=sid,
        template_id="base",
        state=State.RUNNING,
        created_at=created,
        started_at=created,
        end_at=created + 300,
        **kw,  # type: ignore[arg-type]
    )


def test_store_round_trip_survives_reopen(tmp_path: Path) -> None:
    db = tmp_path / "hostd.db"
    s = Store(db)
    rec = _rec("sbx_" + "a" * 20, 1.0, metadata={"k": "v"}, network={"guest_ip": "10.0.0.2"})
    s.put(rec)
    rec.state = State.PAUSED
    rec.paused_remaining = 12.5
    s.put(rec)
    s.put(_rec("sbx_" + "b" * 20, 0.5))
    s.close()
    s = Store(db)
    got = s.all()
    assert [r.sandbox_id for r in got] == ["sbx_" + "b" * 20, "sbx_" + "a" * 20]
    a = s.get("sbx_" + "a" * 20)
    assert a == rec
    s.delete(rec.sandbox_id)
    assert s.get(rec.sandbox_id) is None
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_store_reads_rows_from_before_pause_to_disk(tmp_path: Path) -> None:
    """A row an older hostd wrote (no paused_to_disk) reads as paused in place; new ones keep it."""
    db = tmp_path / "hostd.db"
    s = Store(db)
    rec = _rec("sbx_" + "c" * 20, 1.0, paused_remaining=3.0)
    data = json.loads(rec.to_json())
    del data["paused_to_disk"]
    data["state"] = "paused"
    s._db.execute(
        "INSERT INTO sandboxes (sandbox_id, created_at, state, data) VALUES (?, ?, ?, ?)",
        (rec.sandbox_id, rec.created_at, "paused", json.dumps(data)),
    )
    old = s.get(rec.sandbox_id)
    assert old is not None and old.state is State.PAUSED and old.paused_to_disk is False
    old.paused_to_disk = True
    s.put(old)
    s.close()
    got = Store(db).get(rec.sandbox_id)
    assert got is not None and got.paused_to_disk is True


# -- state ------------------------------------------------------------------


def test_state_transitions() -> None:
    sid = "sbx_x"
    assert transition(sid, State.RUNNING, Action.PAUSE) is State.PAUSED
    assert transition(sid, State.PAUSED, Action.RESUME) is State.RUNNING
    assert transition(sid, State.CREATING, Action.READY) is State.RUNNING
    with pytest.raises(FailedPrecondition, match=r"is paused; resume it first"):
        transition(sid, State.PAUSED, Action.GUEST_CALL)
    with pytest.raises(FailedPrecondition, match=r"cannot pause sandbox sbx_x in state paused"):
        transition(sid, State.PAUSED, Action.PAUSE)
    with pytest.raises(FailedPrecondition, match=r"cannot resume"):
        transition(sid, State.RUNNING, Action.RESUME)
    for action in Action:
        with pytest.raises(FailedPrecondition):
            transition(sid, State.TERMINATED, action)
    # Every state but TERMINATED can be killed.
    assert all((s, Action.KILL) in TRANSITIONS for s in State if s is not State.TERMINATED)


# -- paging -----------------------------------------------------------------


def test_paging_walks_every_item_once_even_when_items_change() -> None:
    items = [((float(i), f"id{i:03}"), i) for i in range(25)]
    seen: list[int] = []
    page, tok = paging.page(items, 10, "")
    seen += page
    # An item before the cursor disappears and one after appears: no skips or repeats.
    items = [it for it in items if it[1] != 3] + [((100.0, "new"), 100)]
    while tok:
        page, tok = paging.page(items, 10, tok)
        seen += page
    assert seen == [*range(25), 100]


def test_paging_bad_inputs_name_the_field() -> None:
    with pytest.raises(InvalidArgument, match=r"page_token"):
        paging.page([], 10, "%%%not-a-token")
    with pytest.raises(InvalidArgument, match=r"page_size"):
        paging.page([], 5000, "")
    assert paging.page([((1.0, "a"), 1)], 0, "") == ([1], "")


# -- validation -------------------------------------------------------------


def test_validation_names_fields() -> None:
    with pytest.raises(InvalidArgument, match=r"^sandbox_id: .*not a sandbox id"):
        validation.sandbox_id("../../etc")
    with pytest.raises(InvalidArgument, match=r"sandbox_id: is required"):
        validation.sandbox_id("")
    assert validation.sandbox_id("sbx_" + "0" * 20)
    with pytest.raises(InvalidArgument, match=r"^template: "):
        validation.template("../base")
    assert validation.template("") == "base"
    with pytest.raises(InvalidArgument, match=r"timeout_seconds: must be at least 1"):
        validation.timeout(-5, 100)
    with pytest.raises(InvalidArgument, match=r"timeout_seconds: 101 s is above"):
        validation.timeout(101, 100)
    with pytest.raises(InvalidArgument, match=r"^metadata: .*bytes in total"):
        validation.metadata({"k": "v" * 20000}, 64, 16384)
    with pytest.raises(InvalidArgument, match=r"^metadata: 65 entries"):
        validation.metadata({str(i): "" for i in range(65)}, 64, 16384)
    with pytest.raises(InvalidArgument, match=r"^envs\['1BAD'\]"):
        validation.envs({"1BAD": "x"})
    with pytest.raises(InvalidArgument, match=r"^network.allow_out\[1\]"):
        validation.network_rules(["10.0.0.0/8", "not a domain!"], "network.allow_out")
    assert validation.network_rules(["example.com", "1.2.3.4"], "network.allow_out")
    with pytest.raises(InvalidArgument, match=r"^memory_mb"):
        validation.resources(1, 16, 1024)
    with pytest.raises(InvalidArgument, match=r"^volume_mount_path: 'rel' must be an absolute"):
        validation.volume("vol_aaaaaaaaaaaa", "rel")
    with pytest.raises(InvalidArgument, match=r"^port"):
        validation.port(70000)


# -- events -----------------------------------------------------------------


def test_event_bus_filters_orders_and_bounds() -> None:
    async def main() -> None:
        bus = EventBus(queue_size=3)
        seen: list[Event] = []
        bus.add_hook(seen.append)
        async with bus.subscribe() as everything, bus.subscribe("sbx_a") as only_a:
            for i in range(5):
                bus.publish(
                    Event(
                        "sbx_a" if i % 2 == 0 else "sbx_b",
                        EventType.CREATED,
                        Reason.USER,
                        message=str(i),
                    )
                )
            got = [everything.queue.get_nowait().message for _ in range(everything.queue.qsize())]
            assert got == ["2", "3", "4"] and everything.dropped == 2
            got_a = [only_a.queue.get_nowait().message for _ in range(only_a.queue.qsize())]
            assert got_a == ["0", "2", "4"]
        assert len(seen) == 5
        assert not bus._subs

    asyncio.run(main())


def test_config_object_validates_directly() -> None:
    c = Config()
    c.max_sandboxes = 0
    with pytest.raises(ConfigError, match=r"max_sandboxes"):
        c.validate()
    assert time.time() > 0
