"""hostd observability: Prometheus metrics, RPC timing, console watch, structured logs.

Public surface (everything else is internal):

- `Observability(mgr, images_dir=..., bus=...)`: `.interceptor`, `.serve(listen)`,
  `.observe_lifecycle(op, s)`, `.observe_guest_call(method, code, s)`,
  `.registry`, `.readiness()`.
- `ObservabilityInterceptor(observe)`: a grpc.aio server interceptor.
- `install_logging(level, json_format)`, `sandbox_context(sandbox_id)`.

See docs/observability.md for every metric and how to wire it in.
"""

from hostd.observability.core import Observability
from hostd.observability.http import Check, MetricsServer
from hostd.observability.interceptor import ObservabilityInterceptor
from hostd.observability.logs import install_logging, sandbox_context, sandbox_id_var
from hostd.observability.prometheus import Metrics

__all__ = [
    "Check",
    "Metrics",
    "MetricsServer",
    "Observability",
    "ObservabilityInterceptor",
    "install_logging",
    "sandbox_context",
    "sandbox_id_var",
]
