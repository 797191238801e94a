"""hostd's configuration: one typed, strict object.

Sources, later wins: built-in defaults -> TOML file (`/etc/moru/hostd.toml`
if present, or `--config PATH`) -> `MORU_*` environment variables ->
command-line flags. Unknown keys are errors with a hint, so a typo never
silently falls back to a default.

Environment names: `MORU_<KEY>` for top-level keys and
`MORU_<SECTION>_<KEY>` for sections, upper case (e.g. `MORU_MAX_SANDBOXES=8`,
`MORU_NETWORK_ENABLED=false`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = Path("/etc/moru/hostd.toml")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and a hint."""


@dataclass
class NetworkConfig:
    """Sandbox networking (hostd/network/): tap in a netns, NAT, egress policy, port proxy.

    Mirrors `hostd.network.config.NetworkConfig`; empty strings mean "the
    networking module's default" (e.g. the default route's interface).
    """

    enabled: bool = True
    # Interface NAT sends guest traffic out of; empty: the default route's.
    uplink: str = ""
    # DNS server the sandboxes' resolver forwards to; empty: the host's.
    dns_upstream: str = ""
    # Addresses for sandbox links are carved from this pool.
    pool_cidr: str = "10.200.0.0/16"
    proxy_listen: str = "127.0.0.1:50070"
    proxy_domain: str = "localhost"
    # Names of namespaces/nftables tables, and of host-side veths (<= 5
    # chars): two hostd instances on one machine must differ in both.
    name_prefix: str = "moru"
    veth_prefix: str = "mv"
    run_dir: str = "/run/moru/net"
    # Per sandbox: new connections and DNS queries per second, and bursts
    # above that rate; packets over the limit are dropped. 0: no limit.
    new_conn_rate: int = 200
    new_conn_burst: int = 400
    dns_rate: int = 50
    dns_burst: int = 100

    def for_network_module(self) -> Any:
        """The networking module's own config object (which validates it)."""
        from hostd.network.config import NetworkConfig as ModuleConfig

        kwargs: dict[str, Any] = {
            k: v for k, v in dataclasses.asdict(self).items() if v != "" or k == "uplink"
        }
        if not self.uplink:
            kwargs.pop("uplink")
        kwargs["run_dir"] = Path(self.run_dir)
        try:
            return ModuleConfig(**kwargs)
        except ValueError as e:
            raise ConfigError(f"network: {e}") from None


@dataclass(frozen=True)
class WarmPoolEntry:
    """One `warm_pool` key: a template and shape (0: the template's default), and a count."""

    template: str
    vcpus: int
    memory_mb: int
    disk_mb: int
    count: int

    @classmethod
    def parse(cls, key: str, count: int) -> WarmPoolEntry:
        parts = key.split(":")
        name = f"warm_pool.{key}"
        if not parts[0] or len(parts) > 4:
            raise ConfigError(f"{name}: expected TEMPLATE or TEMPLATE:VCPUS:MEMORY_MB:DISK_MB")
        try:
            nums = [int(p) for p in parts[1:]] + [0] * (4 - len(parts))
        except ValueError:
            raise ConfigError(f"{name}: VCPUS, MEMORY_MB and DISK_MB must be integers") from None
        if min(nums) < 0 or count < 0:
            raise ConfigError(f"{name}: numbers must not be negative")
        return cls(parts[0], nums[0], nums[1], nums[2], count)


@dataclass
class Config:
    # gRPC listen address; a unix socket (created mode 0600) by default.
    listen: str = "unix:/run/moru/hostd.sock"
    # Optional extra TCP listener "host:port"; needs tls_cert and tls_key.
    tcp_listen: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # When set, every call must carry `authorization: Bearer <api_key>`.
    api_key: str = ""
    state_dir: str = "/var/lib/moru"
    # Empty: $MORU_IMAGES_DIR, else /var/lib/moru/images.
    images_dir: str = ""
    default_timeout_seconds: int = 300
    max_timeout_seconds: int = 24 * 3600
    max_sandboxes: int = 64
    # Guest memory all sandboxes may use together; 0: 80% of the host's RAM.
    memory_budget_mb: int = 0
    # "auto" (KVM only where usable, else TCG), "kvm" or "tcg".
    accel: str = "auto"
    # Name of hostd's cgroup subtree; each sandbox gets <root>/<sandbox_id>.
    cgroup_root: str = "moru"
    # CPUs kept for hostd: all sandboxes together get the host's CPUs minus
    # this (a sandbox's quota is its vcpus, capped to that). 0: no reserve.
    cpu_reserve_cores: float = 0.25
    # Prometheus endpoint "host:port"; empty: off.
    metrics_listen: str = ""
    # Bytes of each guest's serial console kept on disk.
    console_log_bytes: int = 1 << 20
    # Create fails (and cleans up) when the guest is not ready by then.
    create_deadline_seconds: float = 60.0
    # Guest metrics sampling period and how many samples are kept.
    metrics_interval_seconds: float = 5.0
    metrics_history: int = 720
    # Health checks (hostd/health.py): how often each running sandbox is
    # checked (QEMU, vsock backend, guestd answering); how long guestd may go
    # without answering before the sandbox is marked error; how long a
    # sandbox stays listed in state error before it is killed.
    health_interval_seconds: float = 2.0
    guest_unhealthy_seconds: float = 60.0
    error_kill_seconds: float = 30.0
    # Templates (comma-separated) to keep a ready snapshot of: hostd boots each
    # once in the background (after start, and again after a rebuild) and saves
    # it with guestd waiting for Init; Creates with the template's defaults
    # restore it instead of booting. Empty: off. See docs/persistence.md.
    ready_snapshot_templates: str = ""
    # How often to look for rebuilt templates (and stale snapshots to delete).
    ready_snapshot_check_seconds: float = 60.0
    # Bound on the boot of a snapshot's VM, and on a Create's snapshot path
    # before it falls back to a cold boot.
    ready_snapshot_boot_seconds: float = 600.0
    ready_snapshot_restore_seconds: float = 120.0
    # Pause saves the VM's memory to disk and ends its processes (resume restores
    # it); false: pause in place (vCPUs stopped, memory kept). VMs started
    # without the PCI vsock port (older hostd) are always paused in place.
    pause_to_disk: bool = True
    # Warm pool: sandboxes kept prepared (booted or restored, network and cgroup
    # up, guestd answering) so a matching Create only claims one. Keys are a
    # template name (its default shape) or TEMPLATE:VCPUS:MEMORY_MB:DISK_MB
    # (trailing parts optional, 0 = the template's default); values are how
    # many to keep. TOML `warm_pool = {base = 2}`, env `MORU_WARM_POOL=base=2`.
    # Empty: off. See docs/hostd.md ("Warm pool").
    warm_pool: dict[str, int] = field(default_factory=dict)
    # A member older than this is destroyed and replaced (fresh guest state).
    warm_pool_max_age_seconds: float = 3600.0
    # Longest wait between refill attempts after failures (doubling from 1 s).
    warm_pool_backoff_max_seconds: float = 60.0
    max_metadata_entries: int = 64
    max_metadata_bytes: int = 16 * 1024
    log_level: str = "info"
    log_json: bool = False
    network: NetworkConfig = field(default_factory=NetworkConfig)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def images_path(self) -> Path:
        if self.images_dir:
            return Path(self.images_dir)
        from images.manifest import images_dir

        return images_dir()

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_path / "sandboxes"

    @property
    def db_path(self) -> Path:
        return self.state_path / "hostd.db"

    def warm_pool_entries(self) -> list[WarmPoolEntry]:
        """`warm_pool` parsed; ConfigError naming the key for a malformed one."""
        return [WarmPoolEntry.parse(k, v) for k, v in self.warm_pool.items()]

    def validate(self) -> Config:
        """Checks cross-field rules; returns self so calls chain."""
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ConfigError(f"accel: {self.accel!r} is not one of auto, kvm, tcg")
        if not 0 < self.default_timeout_seconds <= self.max_timeout_seconds:
            raise ConfigError(
                "default_timeout_seconds: must be > 0 and <= max_timeout_seconds"
                f" ({self.max_timeout_seconds})"
            )
        if self.tcp_listen and not (self.tls_cert and self.tls_key):
            raise ConfigError("tcp_listen: needs tls_cert and tls_key (TCP is TLS-only)")
        if self.max_sandboxes < 1:
            raise ConfigError("max_sandboxes: must be >= 1")
        ncpu = os.cpu_count() or 1
        if not 0 <= self.cpu_reserve_cores < ncpu:
            raise ConfigError(
                f"cpu_reserve_cores: {self.cpu_reserve_cores} is outside 0..{ncpu} (host CPUs)"
            )
        if self.listen and not self.listen.startswith("unix:"):
            raise ConfigError("listen: must be unix:PATH (use tcp_listen for TCP with TLS)")
        if not self.listen and not self.tcp_listen:
            raise ConfigError("listen: set listen or tcp_listen, or hostd is unreachable")
        if min(self.ready_snapshot_check_seconds, self.ready_snapshot_boot_seconds,
               self.ready_snapshot_restore_seconds) <= 0:
            raise ConfigError("ready_snapshot_*_seconds: must be positive")
        if self.metrics_interval_seconds <= 0 or self.metrics_history < 1:
            raise ConfigError("metrics_interval_seconds and metrics_history must be positive")
        if self.health_interval_seconds <= 0 or self.guest_unhealthy_seconds <= 0:
            raise ConfigError("health_interval_seconds and guest_unhealthy_seconds must be > 0")
        if self.error_kill_seconds < 0:
            raise ConfigError("error_kill_seconds must be >= 0 (0: kill at once)")
        self.warm_pool_entries()
        if min(self.warm_pool_max_age_seconds, self.warm_pool_backoff_max_seconds) <= 0:
            raise ConfigError("warm_pool_*_seconds: must be positive")
        return self


def _hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"


def _coerce(name: str, tp: Any, value: Any, from_text: bool) -> Any:
    """Checks (or, for env/flags, parses) one value against its annotated type."""
    if tp is bool:
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if typing.get_origin(tp) is dict:
        return _coerce_counts(name, value, from_text)
    raise ConfigError(f"{name}: unsupported type {tp!r}")


def _coerce_counts(name: str, value: Any, from_text: bool) -> dict[str, int]:
    """A table of name -> count; as text `a=2,b:1:256=1` (env and flags)."""
    if from_text and isinstance(value, str):
        table: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in value.split(","))):
            key, sep, num = item.partition("=")
            if not sep:
                raise ConfigError(f"{name}: expected NAME=COUNT[,NAME=COUNT...], got {item!r}")
            table[key.strip()] = num.strip()
        value = table
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table like {{base = 2}}, got {value!r}")
    return {str(k): _coerce(f"{name}.{k}", int, v, from_text) for k, v in value.items()}


def _apply(obj: Any, data: dict[str, Any], prefix: str, from_text: bool) -> None:
    hints = typing.get_type_hints(type(obj))
    known = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown key {name!r}{_hint(key, known)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a [{name}] table")
            _apply(getattr(obj, key), value, f"{name}.", from_text)
        else:
            if isinstance(tp, types.UnionType):
                raise ConfigError(f"{name}: unsupported type")
            setattr(obj, key, _coerce(name, tp, value, from_text))


def _env_overrides(environ: typing.Mapping[str, str]) -> dict[str, Any]:
    """MORU_KEY / MORU_SECTION_KEY -> nested dict; unknown MORU_* names that look like ours fail."""
    out: dict[str, Any] = {}
    top = {f.name for f in dataclasses.fields(Config)}
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name == "network"}
    for env, value in environ.items():
        if not env.startswith("MORU_"):
            continue
        key = env[5:].lower()
        placed = False
        for sec in sections:
            if key.startswith(sec + "_"):
                out.setdefault(sec, {})[key[len(sec) + 1 :]] = value
                placed = True
                break
        if not placed and key in top and key not in sections:
            out[key] = value
        # Other MORU_* variables (MORU_HOSTD, MORU_API_KEY for the SDK,
        # MORU_IMAGES_DIR for images) belong to other tools; ignore them.
    return out


def load(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> Config:
    """Builds the config: defaults, TOML file, MORU_* env, then `overrides` (flags)."""
    cfg = Config()
    file = (
        path
        if path is not None
        else (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None)
    )
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{file}: {e}") from None
        try:
            _apply(cfg, data, "", from_text=False)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None
    _apply(cfg, _env_overrides(os.environ if environ is None else environ), "", from_text=True)
    if overrides:
        nested: dict[str, Any] = {}
        for key, value in overrides.items():
            if "." in key:
                sec, sub = key.split(".", 1)
                nested.setdefault(sec, {})[sub] = value
            else:
                nested[key] = value
        _apply(cfg, nested, "", from_text=True)
    return cfg.validate()
