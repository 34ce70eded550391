"""Sync freshness for `comms status`: when each source last checked, who cannot be verified,
and who needs attention (a CSP subscription or reseller relationship gone: no stage mail goes
to them while it lasts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select

from comms.store.db import Database
from comms.store.models import Customer
from comms.store.sync_models import ATTENTION, SyncCheck

SHOWN = 20


@dataclass(frozen=True)
class SyncFreshness:
    last_checked: dict[str, datetime]  # source -> latest check
    cannot_verify: list[tuple[str, str, str]]  # (key, source, why)
    attention: list[tuple[str, str, str]] = field(default_factory=list)  # (key, source, why)

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_checked": {k: v.isoformat() for k, v in self.last_checked.items()},
            "cannot_verify": [{"key": k, "source": s, "why": w} for k, s, w in self.cannot_verify],
            "needs_attention": [{"key": k, "source": s, "why": w}
                                for k, s, w in self.attention],
        }

    def lines(self) -> list[str]:
        if not self.last_checked:
            return ["Stage sync: never run (see docs/sync.md)."]
        out = ["Stage sync: last checked " + ", ".join(
            f"{src} {at:%Y-%m-%d %H:%M} UTC" for src, at in sorted(self.last_checked.items()))]
        for title, rows in (("Need attention: {} customer(s) (no stage mail goes to them):",
                             self.attention),
                            ("Cannot verify {} customer(s):", self.cannot_verify)):
            if rows:
                out.append(title.format(len(rows)))
                out += [f"  {k} ({s}): {w}" for k, s, w in rows[:SHOWN]]
                if len(rows) > SHOWN:
                    out.append(f"  … and {len(rows) - SHOWN} more (`comms sync --json`)")
        return out


def sync_freshness(db: Database) -> SyncFreshness:
    with db.session() as session:
        last = dict(session.exec(
            select(SyncCheck.source, sa.func.max(col(SyncCheck.checked_at)))
            .group_by(col(SyncCheck.source))).all())
        problems = session.exec(
            select(Customer.key, SyncCheck.source, SyncCheck.problem)
            .join(Customer, col(Customer.id) == col(SyncCheck.customer_id))
            .where(col(SyncCheck.problem) != "")
            .order_by(col(Customer.key), col(SyncCheck.source))).all()
    return SyncFreshness({k: v for k, v in last.items() if v is not None},
                         [(k, s, p) for k, s, p in problems if not p.startswith(ATTENTION)],
                         [(k, s, p.removeprefix(ATTENTION)) for k, s, p in problems
                          if p.startswith(ATTENTION)])
