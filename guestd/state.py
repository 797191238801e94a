"""What Guest.Init told this guestd: env, identity and access token.

Shared by the Guest service (writes it), the process manager (reads env) and
the edge interceptor (checks the token). One object, owned by the server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class GuestState:
    guest_mode: bool = False  # running as the guest's agent (may set clock, hostname, power off)
    initialized: bool = False
    env: dict[str, str] = field(default_factory=dict)
    sandbox_id: str = ""
    template_id: str = ""
    hostname: str = ""
    access_token: str = ""
    started_monotonic: float = field(default_factory=time.monotonic)
