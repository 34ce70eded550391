"""The application context: everything a command needs, built once per invocation.

One object holds the settings, the ledger database, the campaign, the renderer, the clock and the
transport factory. Each part is built on first use (loading the campaign or opening the database
costs time a `comms --help` or `comms config show` should not pay), and ``close`` releases what
was opened. Services take the parts they need from it, never the whole context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from comms.campaign import Campaign, load_campaign
from comms.config import Settings, load_settings
from comms.outbox import Clock
from comms.services.calendar import parse_now
from comms.store.db import Database, open_database

if TYPE_CHECKING:
    from comms.delivery.base import Transport
    from comms.render import Renderer


def _default_transport_factory(settings: Settings) -> Transport:
    from comms.delivery.factory import make_transport

    return make_transport(settings)


@dataclass
class AppContext:
    """Settings, database, campaign, renderer, clock and transport factory of one invocation."""

    config_file: str | None = None
    transport_factory: Callable[[Settings], Transport] = _default_transport_factory
    _settings: Settings | None = field(default=None, repr=False)
    _database: Database | None = field(default=None, repr=False)
    _campaign: Campaign | None = field(default=None, repr=False)
    _renderer: Renderer | None = field(default=None, repr=False)
    _clock: Clock = field(default_factory=Clock, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_file)
        return self._settings

    @property
    def database(self) -> Database:
        """The ledger database, upgraded to the newest schema on first use."""
        if self._database is None:
            self._database = open_database(self.settings.database_url())
        return self._database

    @property
    def campaign(self) -> Campaign:
        if self._campaign is None:
            self._campaign = load_campaign(self.settings.campaign_file or None)
        return self._campaign

    @property
    def renderer(self) -> Renderer:
        if self._renderer is None:
            from comms.render import Renderer  # jinja2 + premailer: only when rendering

            self._renderer = Renderer(self.settings)
        return self._renderer

    @property
    def clock(self) -> Clock:
        return self._clock

    def simulate(self, now: str | None) -> Clock:
        """Shift the clock to start at ``now`` (an ``--now`` option); returns the clock."""
        start = parse_now(now, self.settings.defaults.time_zone)
        if start is not None:
            self._clock = Clock(start)
        return self._clock

    def at(self, now: str | None) -> datetime:
        """The moment an ``--now`` option names (exactly), or the real clock: what an import or
        a stage move records."""
        return parse_now(now, self.settings.defaults.time_zone) or datetime.now(UTC)

    def transport(self) -> Transport:
        """A new transport; the caller closes it."""
        return self.transport_factory(self.settings)

    def close(self) -> None:
        if self._database is not None:
            self._database.dispose()
        self._database = None
