"""What every handler shares: state, tokens, addresses, and the stop signal."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from comms.sandbox.state import State
from comms.sandbox.tenants import Tenants
from comms.sandbox.tokens import KNOWN_GRAPH_RESOURCES, DeviceCode, TokenService


@dataclass
class Core:
    state: State
    tokens: TokenService
    tenant_id: str
    auto_approve_device_codes: bool
    tenants: Tenants
    base_url: str = ""  # known once the server is bound
    stopping: threading.Event = field(default_factory=threading.Event)
    devices: dict[str, DeviceCode] = field(default_factory=dict)
    devices_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.tenant_id}"

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def issuer(self) -> str:
        return f"{self.authority}/v2.0"

    def is_tenant(self, tenant: str) -> bool:
        """The partner tenant (or its aliases) or a customer tenant the sandbox knows."""
        low = tenant.lower()
        if low in (self.tenant_id.lower(), "organizations", "common"):
            return True
        return self.tenants.find(low) is not None

    def token_endpoints(self, tenant: str | None = None) -> list[str]:
        """Audiences a client assertion may name: the v2 and v1 token endpoints."""
        out: list[str] = []
        for name in (tenant or self.tenant_id, self.tenant_id, "organizations", "common"):
            out += [
                f"{self.base_url}/{name}/oauth2/v2.0/token",
                f"{self.base_url}/{name}/oauth2/token",
            ]
        return out

    def graph_resources(self) -> list[str]:
        """Resources whose ``/.default`` scope yields a Graph token here."""
        return [*KNOWN_GRAPH_RESOURCES, self.base_url, "00000003-0000-0000-c000-000000000000"]

    def graph_audiences(self) -> list[str]:
        auds = self.graph_resources()
        return auds + [a + "/" for a in auds]

    def sleep(self, seconds: float) -> None:
        """Wait, but wake at once when the sandbox stops (bounded shutdown)."""
        if seconds > 0:
            self.stopping.wait(seconds)
