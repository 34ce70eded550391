"""The approval gate of waves: which customers' first message must wait for `comms wave approve`.

With ``require_approval = true`` in the campaign, a customer's *first* customer message (the step
that starts its wave) is queued only when one of its tags (waves) is approved and every message it
is about to get still has the content hash that was approved. Editing a template (or the partner
settings the templates read) after the approval changes the hash, so the wave is held again until
someone approves the new content. Customers without a tag belong to no wave and are held too:
nothing starts without an approval. Reminders and later stages are never held: the wave is
already running.

The content hash of a message covers every file of its template folder (all locales, so both
licence branches) plus the shared files next to the folders (layouts, partials) and the
``[partner]`` settings; it is what `comms wave proof` sends and what `approve` records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlmodel import Session, col

from comms.campaign import Campaign
from comms.config import Settings
from comms.domain import CustomerInfo, MessageStatus, PlannedMessage, SentMessage
from comms.render import Renderer
from comms.store.db import Database
from comms.store.wave_models import WaveEvent


class ContentHasher:
    """Content hashes of messages, from their template files (cached per invocation)."""

    def __init__(self, settings: Settings, renderer: Renderer) -> None:
        self.settings, self.renderer = settings, renderer
        self._cache: dict[str, str] = {}

    def message_hash(self, message: str) -> str:
        if message not in self._cache:
            h = hashlib.sha256(self.settings.partner.model_dump_json().encode())
            for name in sorted(self.renderer.template_names()):
                if "/" in name and not name.startswith(f"{message}/"):
                    continue  # another message's folder: its edits do not change this one
                h.update(name.encode() + b"\0")
                h.update(self.renderer.source_path(name).read_bytes() + b"\0")
            self._cache[message] = h.hexdigest()
        return self._cache[message]

    def hashes(self, messages: Iterable[str]) -> dict[str, str]:
        return {m: self.message_hash(m) for m in sorted(set(messages))}


def combined_hash(hashes: dict[str, str]) -> str:
    """One hash for a set of messages (what the audit trail shows)."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Approval:
    tag: str
    approved: bool
    by: str = ""
    at: object = None
    hashes: dict[str, str] = field(default_factory=dict)
    content_hash: str = ""


def approvals(session: Session, tags: Sequence[str] | None = None) -> dict[str, Approval]:
    """The current approval of each tag that was ever approved or held (newest act wins)."""
    q = sa.select(WaveEvent).where(col(WaveEvent.action).in_(("approve", "hold")))
    if tags is not None:
        q = q.where(col(WaveEvent.tag).in_(list(tags)))
    out: dict[str, Approval] = {}
    for (ev,) in session.execute(q.order_by(col(WaveEvent.id))).all():
        out[ev.tag] = Approval(
            tag=ev.tag, approved=ev.action == "approve", by=ev.by, at=ev.at,
            hashes=json.loads(ev.hashes_json) if ev.action == "approve" else {},
            content_hash=ev.content_hash,
        )
    return out


def is_starter(history: Sequence[SentMessage], campaign: Campaign) -> bool:
    """No customer message of the campaign was ever queued for this customer (withdrawn
    ones aside): its next customer message starts its wave."""
    customer_messages = set(campaign.messages()) - campaign.internal_messages()
    return not any(
        h.message in customer_messages and h.status != MessageStatus.WITHDRAWN for h in history
    )


class WaveGate:
    """Decides, per customer, whether its due messages wait for an approval."""

    def __init__(self, db: Database, settings: Settings, campaign: Campaign,
                 renderer: Renderer) -> None:
        self.campaign = campaign
        self.hasher = ContentHasher(settings, renderer)
        with db.session() as s:
            self.approvals = approvals(s)

    def holds(self, customer: CustomerInfo, history: Sequence[SentMessage],
              planned: Sequence[PlannedMessage]) -> bool:
        """True when these planned messages must not be queued yet."""
        if not planned or not is_starter(history, self.campaign):
            return False
        wanted = self.hasher.hashes(p.message for p in planned if not p.internal)
        for tag in customer.tags:
            a = self.approvals.get(tag)
            if a is not None and a.approved and all(
                a.hashes.get(m) == h for m, h in wanted.items()
            ):
                return False
        return True


def load_gate(db: Database, settings: Settings, campaign: Campaign,
              renderer: Renderer) -> WaveGate | None:
    """The gate for a run, or None when the campaign needs no approvals."""
    return WaveGate(db, settings, campaign, renderer) if campaign.require_approval else None
