"""`moru-hostd` with hostd.observability wired in, for tests and benchmarks.

Until hostd/server.py and hostd/cli.py call the observability package
themselves, this applies exactly the wiring docs/observability.md asks for
(interceptor first, `obs.serve(config.metrics_listen)` around the manager's
background work, `install_logging`) by wrapping their functions in this
process only. Once server.py mentions hostd.observability it runs
`moru-hostd` unchanged.

Usage: python tests/observability/hostd_obs.py --config FILE serve
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any


def wired() -> bool:
    import hostd.server

    return "observability" in inspect.getsource(hostd.server)


def patch() -> None:
    import grpc

    import hostd.server as srv
    from hostd.observability import Observability, install_logging
    from hostd.sandboxes import SandboxManager

    state: dict[str, Any] = {}
    build = srv.build_manager

    def build_manager(config: Any, bus: Any = None) -> Any:
        mgr = build(config, bus)
        state["obs"] = Observability(mgr, images_dir=config.images_path)
        state["listen"] = config.metrics_listen
        return mgr

    make_server = grpc.aio.server

    def server(*a: Any, interceptors: Any = None, **kw: Any) -> Any:
        ics = list(interceptors or [])
        if "obs" in state:
            ics.insert(0, state["obs"].interceptor)
        kw["interceptors"] = ics
        return make_server(*a, **kw)

    mgr_run = SandboxManager.run

    async def run(self: Any) -> None:
        obs = state["obs"]
        async with obs.serve(state["listen"]):
            await mgr_run(self)

    srv_run = srv.run

    def run_server(config: Any, ready: Callable[[], None] | None = None) -> None:
        install_logging(config.log_level, config.log_json)
        srv_run(config, ready)

    srv.build_manager = build_manager
    grpc.aio.server = server
    SandboxManager.run = run  # type: ignore[method-assign]
    srv.run = run_server


def main() -> int:
    if not wired():
        patch()
    from hostd.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
