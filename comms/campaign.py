"""The campaign definition: stages, allowed moves, the message on entering each stage, reminders,
escalation and the send window. Loaded from ``config/campaign.toml`` (or ``campaign_file``) and
validated like the main config: unknown keys and wrong types are errors naming key and file.
"""

from __future__ import annotations

import re
import tomllib
from datetime import date, time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from comms.errors import CampaignError
from comms.paths import builtin_config_dir

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ROLES = ("primary", "billing", "technical")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Reminders(_Model):
    """Reminders while a customer stays in a stage: first after N days, then every M, at most K."""

    message: str
    first_after_days: float = Field(gt=0)
    every_days: float = Field(gt=0)
    max: int = Field(ge=0)
    # After this many reminders, cc the account manager and send them an internal note.
    escalate_after: int | None = Field(default=None, ge=1)
    escalation_message: str = "account_manager_alert"


class Stage(_Model):
    name: str
    description: str = ""
    on_enter: str | None = None
    next: tuple[str, ...] = ()
    reminders: Reminders | None = None
    # How long a customer is expected to stay here before `comms status` calls it stuck.
    expected_days: float | None = Field(default=None, gt=0)
    # Final stage: nothing follows, nothing is sent after the on_enter message.
    final: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"stage name {v!r} must be lower_snake_case")
        return v


class SendWindow(_Model):
    """Local business hours in the customer's time zone."""

    days: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri")
    start: time = time(9, 0)
    end: time = time(17, 0)
    holidays: tuple[date, ...] = ()

    @field_validator("days")
    @classmethod
    def _days(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [d for d in v if d not in WEEKDAYS]
        if bad:
            raise ValueError(f"unknown weekday(s) {bad}; use {', '.join(WEEKDAYS)}")
        if not v:
            raise ValueError("at least one weekday is required")
        return v

    @model_validator(mode="after")
    def _order(self) -> SendWindow:
        if self.start >= self.end:
            raise ValueError(f"window start {self.start} must be before end {self.end}")
        return self

    @property
    def weekday_numbers(self) -> frozenset[int]:
        return frozenset(WEEKDAYS.index(d) for d in self.days)


class Campaign(_Model):
    name: str = "csp-transition"
    initial_stage: str = "imported"
    window: SendWindow = SendWindow()
    # Contact roles that receive customer messages, in order of preference; if a customer has
    # none of these roles, all its contacts receive them.
    recipients: tuple[str, ...] = ("primary", "billing")
    stages: tuple[Stage, ...]

    @field_validator("recipients")
    @classmethod
    def _roles(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [r for r in v if r not in ROLES]
        if bad:
            raise ValueError(f"unknown role(s) {bad}; use {', '.join(ROLES)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Campaign:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")
        if self.initial_stage not in names:
            raise ValueError(f"initial_stage {self.initial_stage!r} is not a stage ({names})")
        for s in self.stages:
            unknown = [n for n in s.next if n not in names]
            if unknown:
                raise ValueError(f"stage {s.name!r}: next names unknown stage(s) {unknown}")
        return self

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def has_stage(self, name: str) -> bool:
        return name in self.stage_names

    def messages(self) -> list[str]:
        """Every message name the campaign can send, in stage order."""
        out: list[str] = []
        for s in self.stages:
            for m in (s.on_enter, s.reminders.message if s.reminders else None):
                if m and m not in out:
                    out.append(m)
            if s.reminders and s.reminders.escalate_after and (
                s.reminders.escalation_message not in out
            ):
                out.append(s.reminders.escalation_message)
        return out


def default_campaign_path() -> Path:
    return builtin_config_dir() / "campaign.toml"


def load_campaign(path: str | Path | None = None) -> Campaign:
    p = Path(path) if path else default_campaign_path()
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as exc:
        raise CampaignError(f"Campaign file {p} does not exist.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CampaignError(f"{p} is not valid TOML: {exc}") from exc
    try:
        return Campaign.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(root)"
            msg = err["msg"].replace("Extra inputs are not permitted", "unknown key")
            problems.append(f"{p}: {loc}: {msg.removeprefix('Value error, ')}")
        raise CampaignError(
            f"The campaign definition has {len(problems)} problem(s):", problems=problems
        ) from exc
