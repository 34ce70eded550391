"""The partner tenant's external-recipient budget (TERRL) as `comms status` and the report show
it: what comms used in the rolling day (``pacing.tenant_usage``, the dispatcher's own count), its
share, Exchange's cap, and when the oldest counted recipients age out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from sqlmodel import Session

from comms.config import Settings
from comms.pacing import TenantBudget, tenant_usage
from comms.services.calendar import aware_utc as _aware

__all__ = ["TenantBudgetStatus", "tenant_budget"]


@dataclass(frozen=True)
class TenantBudgetStatus:
    """The partner tenant's external-recipient budget (TERRL): what comms used in the rolling
    day, its share, Exchange's cap, and when the oldest counted recipients age out."""

    used: int
    budget: int
    cap: int
    share: float
    licences: int
    window_hours: float  # 24; shorter under [delivery] time_scale (tests, the demo)
    frees_at: datetime | None  # None: nothing counted in the window

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.used)

    @property
    def full(self) -> bool:
        return self.used >= self.budget

    def line(self, tz: ZoneInfo) -> str:
        """One line for the terminal: used vs budget vs cap, and when it frees up."""
        window = ("24 hours" if round(self.window_hours, 3) == 24
                  else f"{self.window_hours:g} hours (scaled)")
        text = (f"Tenant budget: {self.used:,} of {self.budget:,} external recipients used in "
                f"the last {window} ({self.share:.0%} of Exchange's {self.cap:,}/day cap)")
        if self.frees_at is not None:
            when = self.frees_at.astimezone(tz).strftime("%Y-%m-%d %H:%M")
            text += (f"; full: sending waits until {when}" if self.full
                     else f"; the oldest free up at {when}")
        return text



def tenant_budget(session: Session, settings: Settings, now: datetime) -> TenantBudgetStatus:
    """The tenant budget as the dispatcher sees it (``pacing.tenant_usage``) at ``now``."""
    budget = TenantBudget.of(settings)
    used, frees_at = tenant_usage(session, budget, now=_aware(now))
    if frees_at is not None and frees_at.tzinfo is None:
        frees_at = frees_at.replace(tzinfo=UTC)  # SQLite returns naive UTC
    t = settings.tenant
    return TenantBudgetStatus(used=used, budget=t.budget, cap=t.cap, share=t.share,
                              licences=t.licences,
                              window_hours=budget.day.total_seconds() / 3600, frees_at=frees_at)
