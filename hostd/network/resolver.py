"""The sandbox's DNS resolver: one dnsmasq inside each sandbox namespace.

It listens on the guest's gateway, forwards to the configured upstream and,
through dnsmasq's ``nftset`` support (dnsmasq >= 2.87; bookworm has 2.89),
puts the answers for allowed and denied domains into the sandbox's nft sets
before the guest sees them. In allow-list mode it forwards only queries for
allowed domains (others get REFUSED), so DNS cannot be used to reach or leak
to other names; when the policy lets nothing out it forwards nothing and
answers every query REFUSED at once (rather than leaving the guest to time
out). Running it in the namespace keeps each sandbox's sets and
rules in that namespace, and a policy update restarts only that resolver.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from .nft import ALLOW_DNS_SET, DENY_DNS_SET, NETNS_DIR
from .policy import EgressPolicy


class ResolverError(RuntimeError):
    """dnsmasq did not start; the message carries its error output."""


def render_conf(
    *,
    table: str,
    policy: EgressPolicy,
    listen: str,
    upstream: str,
    pid_file: Path,
) -> str:
    lines = [
        "no-resolv",
        "no-hosts",
        "no-poll",
        "bind-interfaces",
        f"listen-address={listen}",
        "cache-size=0",  # every answer passes through nftset, even repeated ones
        "user=root",  # keeps CAP_NET_ADMIN for nftset inside the namespace
        f"pid-file={pid_file}",
        "log-facility=/dev/null",
    ]
    if policy.blocks_everything:
        pass  # no server: every query is answered REFUSED here, none leaves
    elif policy.allowlist_mode:
        for d in policy.allow_domains:
            if upstream:
                lines.append(f"server=/{d}/{upstream}")
    elif upstream:
        lines.append(f"server={upstream}")
    # dnsmasq applies only the most specific nftset line to a name, so each
    # line carries the sets of the domain and of every listed parent domain
    # (a denied parent still denies an allowed subdomain).
    allow, deny = policy.allow_domains, policy.deny_domains
    for d in dict.fromkeys([*allow, *deny]):
        targets = []
        if any(_within(d, a) for a in allow):
            targets.append(f"4#inet#{table}#{ALLOW_DNS_SET}")
        if any(_within(d, x) for x in deny):
            targets.append(f"4#inet#{table}#{DENY_DNS_SET}")
        lines.append(f"nftset=/{d}/{','.join(targets)}")
    return "\n".join(lines) + "\n"


def _within(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def _pid_of(pid_file: Path, conf: Path) -> int | None:
    """The pid in pid_file if that process is our dnsmasq (not a reused pid)."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(conf).encode() in cmdline else None


async def start(netns: str, conf: Path, pid_file: Path) -> int:
    """Starts dnsmasq in netns; returns once it listens (it daemonizes after binding)."""
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={NETNS_DIR}/{netns}",
        "dnsmasq",
        f"--conf-file={conf}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # outlives a hostd restart like the VM does
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ResolverError(
            f"dnsmasq in {netns} failed: {(err or out).decode(errors='replace').strip()}"
        )
    pid = _pid_of(pid_file, conf)
    if pid is None:
        raise ResolverError(f"dnsmasq in {netns} wrote no pid to {pid_file}")
    return pid


def running(conf: Path, pid_file: Path) -> bool:
    return _pid_of(pid_file, conf) is not None


def _gone(pid: int, pid_file: Path, conf: Path) -> bool:
    return _pid_of(pid_file, conf) != pid or not os.path.exists(f"/proc/{pid}")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def stop(conf: Path, pid_file: Path, grace: float = 2.0) -> None:
    """Stops the dnsmasq of conf (if running) and waits until it is gone."""
    pid = _pid_of(pid_file, conf)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while not _gone(pid, pid_file, conf):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + grace
        await asyncio.sleep(0.01)
    _unlink(pid_file)
