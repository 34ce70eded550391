"""Choose the transport the configuration asks for (``[delivery] transport``)."""

from __future__ import annotations

from comms.config import Settings
from comms.delivery.base import Transport
from comms.delivery.graph import GraphTransport
from comms.delivery.outbox_dir import OutboxDirTransport


def make_transport(settings: Settings) -> GraphTransport | OutboxDirTransport:
    """The configured transport; both also implement ``Reconciler`` (``find_sent``).

    Building it does not touch the network: the Graph transport gets its token on first use.
    """
    if settings.delivery.transport == "outbox_dir":
        return OutboxDirTransport(settings)
    return GraphTransport(settings)


__all__ = ["Transport", "make_transport"]
