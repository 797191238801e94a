"""The package's public surface is exactly what hostd's server and docs use."""

from __future__ import annotations

import hostd.observability as obs


def test_all_is_the_public_surface() -> None:
    assert sorted(obs.__all__) == [
        "Check",
        "Metrics",
        "MetricsServer",
        "Observability",
        "ObservabilityInterceptor",
        "install_logging",
        "sandbox_context",
        "sandbox_id_var",
    ]
    for name in obs.__all__:
        assert getattr(obs, name) is not None
