"""Parallel creates on a real node: all succeed, limits hold, nothing leaks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import require_images
from hostd_framework import pb, running_hostd

pytestmark = pytest.mark.vm


def test_five_concurrent_creates_then_node_full() -> None:
    require_images()
    with running_hostd(max_sandboxes=5) as h:
        with ThreadPoolExecutor(5) as ex:
            infos = list(
                ex.map(lambda i: h.create(metadata={"i": str(i)}, memory_mb=256), range(5))
            )
        assert len({s.sandbox_id for s in infos}) == 5
        assert all(s.state == pb.SANDBOX_STATE_RUNNING for s in infos)
        with ThreadPoolExecutor(5) as ex:
            outs = list(ex.map(lambda s: h.run(s, f"echo {s.metadata['i']}"), infos))
        assert [o[1] for o in outs] == [f"{i}\n" for i in range(5)]
        # The sixth does not fit: refused before anything boots.
        with pytest.raises(grpc.RpcError) as ei:
            h.create(memory_mb=256)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sandboxes" in str(ei.value.details())
        with ThreadPoolExecutor(5) as ex:
            list(ex.map(lambda s: h.kill(s.sandbox_id), infos))
        assert h.list_all() == []
        assert h.check_clean() == []
