"""Every Python example of /work/shared/spec/sandbox-operations.md, run as written.

Each example is the spec's text verbatim. Only placeholders that cannot work
literally are substituted: the made-up id "sbx_abc123..." becomes a real
sandbox's id, and examples that continue an earlier one get that `sandbox`.
The SDK finds the test hostd through MORU_HOSTD / MORU_API_KEY, as users' code
does. Every sandbox an example leaves running is killed after the test.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from moru import Sandbox

pytestmark = pytest.mark.vm

FAKE_ID = '"sbx_abc123..."'


def run_example(
    code: str, ns: dict[str, Any] | None = None, sandbox_id: str | None = None
) -> dict[str, Any]:
    src = textwrap.dedent(code)
    if sandbox_id is not None:
        src = src.replace(FAKE_ID, repr(sandbox_id))
    env: dict[str, Any] = {"__name__": "spec_example", "Sandbox": Sandbox, **(ns or {})}
    exec(compile(src, "<spec example>", "exec"), env)
    return env


@pytest.fixture
def reap(hostd: Any) -> Iterator[None]:
    """Kills the sandboxes a test created (examples often leave theirs running)."""
    before = {i.sandbox_id for i in Sandbox.list()}
    yield
    for info in Sandbox.list():
        if info.sandbox_id not in before:
            Sandbox.kill(info.sandbox_id)


def test_create_default_and_specific_template(
    reap: None, capsys: pytest.CaptureFixture[str]
) -> None:
    env = run_example(
        """
        from moru import Sandbox

        # Default 'base' template
        sandbox = Sandbox.create()
        """
    )
    assert env["sandbox"].get_info().template_id == "base"
    assert env["sandbox"].commands.run("echo ok").stdout == "ok\n"


def test_create_python_template(reap: None) -> None:
    env = run_example(
        """
        # Specific template
        sandbox = Sandbox.create("python")
        """
    )
    assert env["sandbox"].get_info().template_id == "python"
    assert env["sandbox"].commands.run("python3 -c 'print(6*7)'").stdout == "42\n"


def test_create_with_all_options(use_net_hostd: Any, reap: None) -> None:
    # The spec's placeholder volume id stands for a volume made beforehand.
    import grpc

    from moru_proto.host.v1 import volume_pb2, volume_pb2_grpc

    with grpc.insecure_channel(f"unix:{use_net_hostd.sock}") as ch:
        vol = volume_pb2_grpc.VolumeServiceStub(ch).Create(
            volume_pb2.CreateVolumeRequest(name="spec-example", size_mb=64),
            metadata=use_net_hostd.md(),
            timeout=60,
        )
    env = run_example(
        """
        sandbox = Sandbox.create(
            template="python",
            timeout=600,              # 10 minutes (seconds)
            metadata={"project": "my-agent", "user_id": "123"},
            envs={"API_KEY": "secret", "DEBUG": "true"},
            allow_internet_access=True,
            secure=True,
            volume_id="vol_abc123",
            volume_mount_path="/workspace",
            network={
                "allow_out": ["api.openai.com"],
                "deny_out": ["internal.company.com"],
            }
        )
        """.replace("vol_abc123", vol.volume_id)
    )
    sbx = env["sandbox"]
    info = sbx.get_info()
    assert info.metadata == {"project": "my-agent", "user_id": "123"}
    assert 590 <= (info.end_at - info.started_at).total_seconds() <= 610
    assert sbx.commands.run("echo $API_KEY $DEBUG").stdout == "secret true\n"
    assert sbx.files.exists("/workspace")
    mounts = sbx.commands.run("cat /proc/mounts").stdout
    assert " /workspace " in mounts, mounts


def test_connect_by_id(reap: None, capsys: pytest.CaptureFixture[str]) -> None:
    existing = Sandbox.create()
    env = run_example(
        """
        from moru import Sandbox

        # Connect by ID
        sandbox = Sandbox.connect("sbx_abc123...")

        # Check if still running
        if sandbox.is_running():
            result = sandbox.commands.run("echo 'Reconnected!'")
        """,
        sandbox_id=existing.sandbox_id,
    )
    assert env["result"].stdout == "Reconnected!\n"


def test_session_recovery_pattern(
    reap: None, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = run_example(
        """
        import json
        from moru import Sandbox

        # Save sandbox ID
        sandbox = Sandbox.create()
        with open("session.json", "w") as f:
            json.dump({"sandbox_id": sandbox.sandbox_id}, f)

        # Later, reconnect
        with open("session.json") as f:
            data = json.load(f)
        sandbox = Sandbox.connect(data["sandbox_id"])
        """
    )
    assert env["sandbox"].commands.run("hostname").exit_code == 0


def test_sandbox_information_and_metrics(reap: None, capsys: pytest.CaptureFixture[str]) -> None:
    env = run_example(
        """
        sandbox = Sandbox.create()

        # Basic properties
        print(sandbox.sandbox_id)      # "sbx_abc123..."

        # Detailed info
        info = sandbox.get_info()
        print(f"Template: {info.template_id}")
        print(f"Started: {info.started_at}")
        print(f"Ends: {info.end_at}")
        print(f"State: {info.state}")
        print(f"CPUs: {info.cpu_count}")
        print(f"Memory: {info.memory_mb} MB")
        """
    )
    out = capsys.readouterr().out
    assert "Template: base" in out and "State: running" in out
    info = env["info"]
    assert info.started_at.tzinfo is not None and info.end_at > info.started_at
    assert info.cpu_count >= 1 and info.memory_mb >= 64
    # Metrics are sampled every second by the test hostd; wait for one.
    from hostd_framework import wait_for

    wait_for(lambda: env["sandbox"].get_metrics(), 30, 0.5, "a metrics sample")
    run_example(
        """
        metrics = sandbox.get_metrics()
        for m in metrics:
            print(f"CPU: {m.cpu_used_pct:.1f}%")
            print(f"Memory: {m.mem_used / 1024 / 1024:.0f} MB / {m.mem_total / 1024 / 1024:.0f} MB")
            print(f"Disk: {m.disk_used / 1024 / 1024:.0f} MB / {m.disk_total / 1024 / 1024:.0f} MB")
        """,
        {"sandbox": env["sandbox"]},
    )
    out = capsys.readouterr().out
    assert "CPU: " in out and " MB / " in out


def test_timeout_management(reap: None, capsys: pytest.CaptureFixture[str]) -> None:
    first = Sandbox.create()
    env = run_example(
        """
        # At creation (seconds)
        sandbox = Sandbox.create(timeout=600)  # 10 minutes

        # Extend later
        sandbox.set_timeout(1800)  # 30 minutes from now

        # Static method
        Sandbox.set_timeout("sbx_abc123...", 1800)
        """,
        sandbox_id=first.sandbox_id,
    )
    for sbx in (env["sandbox"], first):
        left = (sbx.get_info().end_at - sbx.get_info().started_at).total_seconds()
        assert left > 1700
    run_example(
        """
        from datetime import datetime

        info = sandbox.get_info()
        remaining = info.end_at - datetime.now(info.end_at.tzinfo)
        print(f"Expires in {remaining.total_seconds()} seconds")
        """,
        {"sandbox": env["sandbox"]},
    )
    secs = float(capsys.readouterr().out.split("Expires in ")[1].split()[0])
    assert 1700 < secs <= 1800


def test_keep_alive_pattern(reap: None) -> None:
    env = run_example(
        """
        import threading
        import time

        sandbox = Sandbox.create()

        def keep_alive():
            while True:
                try:
                    sandbox.set_timeout(600)  # Extend by 10 min
                    time.sleep(300)           # Check every 5 min
                except Exception:
                    break

        thread = threading.Thread(target=keep_alive, daemon=True)
        thread.start()
        """
    )
    from hostd_framework import wait_for

    sbx = env["sandbox"]
    wait_for(
        lambda: (sbx.get_info().end_at - sbx.get_info().started_at).total_seconds() > 550,
        30,
        0.2,
        "keep-alive extended the timeout",
    )


def test_kill_instance_static_and_context_manager(reap: None) -> None:
    a, b = Sandbox.create(), Sandbox.create()
    env = run_example(
        """
        # Instance method
        sandbox.kill()

        # Static method (by ID)
        Sandbox.kill("sbx_abc123...")

        # Context manager (auto-kill)
        with Sandbox.create() as sandbox:
            result = sandbox.commands.run("echo 'Hello'")
        # Automatically killed
        """,
        {"sandbox": a},
        sandbox_id=b.sandbox_id,
    )
    assert env["result"].stdout == "Hello\n"
    assert not a.is_running() and not b.is_running() and not env["sandbox"].is_running()


def test_graceful_shutdown(reap: None) -> None:
    sandbox = Sandbox.create()
    # The example SIGTERMs python3 processes; pkill exits 1 if there is none,
    # so start one first (as a real agent's sandbox would have).
    sandbox.commands.run("python3 -c 'import time; time.sleep(600)'", background=True, timeout=0)
    run_example(
        """
        # Stop processes gracefully before killing
        sandbox.commands.run("pkill -SIGTERM python3")
        time.sleep(2)
        sandbox.kill()
        """,
        {"sandbox": sandbox, "time": __import__("time")},
    )
    assert not sandbox.is_running()


def test_list_and_kill_multiple(reap: None, capsys: pytest.CaptureFixture[str]) -> None:
    dev = Sandbox.create(metadata={"project": "my-agent", "environment": "development"})
    prod = Sandbox.create(metadata={"project": "my-agent", "environment": "production"})
    other = Sandbox.create(metadata={"project": "other"})
    run_example(
        """
        # List all running sandboxes
        for info in Sandbox.list():
            print(f"{info.sandbox_id}: {info.state}")

        # With filters
        for info in Sandbox.list(metadata={"project": "my-agent"}):
            print(info.sandbox_id)
        """
    )
    lines = capsys.readouterr().out.splitlines()
    for s in (dev, prod, other):
        assert f"{s.sandbox_id}: running" in lines
    filtered = [ln for ln in lines if ":" not in ln]
    assert sorted(filtered) == sorted([dev.sandbox_id, prod.sandbox_id])
    run_example(
        """
        for info in Sandbox.list():
            if info.metadata.get("environment") == "development":
                Sandbox.kill(info.sandbox_id)
        """
    )
    assert not dev.is_running() and prod.is_running() and other.is_running()


def test_network_examples(
    use_net_hostd: Any, reap: None, capsys: pytest.CaptureFixture[str]
) -> None:
    env = run_example(
        """
        sandbox = Sandbox.create(allow_internet_access=False)
        """
    )
    assert env["sandbox"].get_info().allow_internet_access is False
    env = run_example(
        """
        sandbox = Sandbox.create(
            network={
                "allow_out": ["api.openai.com", "8.8.8.8/32"],
                "deny_out": [],
                "allow_public_traffic": True,
            }
        )
        """
    )
    net = env["sandbox"].get_info().network
    assert net is not None and "8.8.8.8/32" in net.allow_out
    env = run_example(
        """
        sandbox = Sandbox.create(
            network={
                "deny_out": ["internal.company.com"],
            }
        )
        """
    )
    net = env["sandbox"].get_info().network
    assert net is not None and net.deny_out == ["internal.company.com"]


# Expose Ports: tests/sdk/test_sdk_user_habits.py runs it verbatim and fetches
# `http://{host}/` from Python and curl, still serving 90 s later.


def test_environment_variables(reap: None) -> None:
    env = run_example(
        """
        sandbox = Sandbox.create(
            envs={
                "OPENAI_API_KEY": "sk-...",
                "DATABASE_URL": "postgres://...",
                "NODE_ENV": "production",
            }
        )

        result = sandbox.commands.run("echo $OPENAI_API_KEY")
        """
    )
    assert env["result"].stdout == "sk-...\n"
    env = run_example(
        """
        result = sandbox.commands.run(
            "echo $MY_VAR",
            envs={"MY_VAR": "Hello"}
        )
        """,
        {"sandbox": env["sandbox"]},
    )
    assert env["result"].stdout == "Hello\n"


def test_metadata(reap: None, capsys: pytest.CaptureFixture[str]) -> None:
    env = run_example(
        """
        sandbox = Sandbox.create(
            metadata={
                "user_id": "user_123",
                "project": "my-agent",
                "environment": "production",
                "session_id": "sess_abc",
            }
        )

        # List by metadata
        for info in Sandbox.list(metadata={"project": "my-agent"}):
            print(info.sandbox_id)
        """
    )
    assert capsys.readouterr().out.split() == [env["sandbox"].sandbox_id]


def test_pause_resume(reap: None) -> None:
    env = run_example(
        """
        sandbox = Sandbox.create()
        sandbox.files.write("/data/important.txt", "Preserve this!")

        # Pause - filesystem preserved
        sandbox.beta_pause()
        """
    )
    assert env["sandbox"].get_info().state == "paused"
    env = run_example(
        """
        # Later, resume
        sandbox = Sandbox.connect("sbx_abc123...")
        sandbox.connect()  # Resume from paused

        content = sandbox.files.read("/data/important.txt")  # Still there!
        """,
        sandbox_id=env["sandbox"].sandbox_id,
    )
    assert env["content"] == "Preserve this!"


def test_error_handling(hostd: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run_example(
        """
        from moru import Sandbox
        from moru.exceptions import (
            NotFoundException,
            TimeoutException,
            AuthenticationException,
        )

        try:
            sandbox = Sandbox.create("my-template")
        except AuthenticationException:
            print("Invalid API key")
        except NotFoundException:
            print("Template not found")
        except TimeoutException:
            print("Sandbox creation timed out")
        """
    )
    assert capsys.readouterr().out == "Template not found\n"


def test_env_points_at_test_hostd(hostd: Any) -> None:
    """Guard: the examples above really talk to the session's hostd."""
    assert os.environ["MORU_HOSTD"] == f"unix:{hostd.sock}"
