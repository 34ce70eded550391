"""The campaign definition: stages, allowed moves, the message on entering each stage, reminders,
escalation and the send window. Loaded from ``config/campaign.toml`` (or ``campaign_file``) and
validated like the main config: unknown keys and wrong types are errors naming key and file.
"""

from __future__ import annotations

import re
import tomllib
from datetime import date, time
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from comms.errors import CampaignError
from comms.inbox.policy import InboxPolicy
from comms.paths import builtin_config_dir
from comms.sync.rules import SyncRules

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ROLES = ("primary", "billing", "technical")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# TOML has real numbers, so a quoted "3" or a `true` is a typo, not a number: no coercion.
Days = Annotated[float, Field(gt=0, strict=True)]
Count = Annotated[int, Field(ge=0, strict=True)]


def _message_name(v: str) -> str:
    # Message names are template folder names and outbox keys.
    if not _NAME.match(v):
        raise ValueError(
            f"message name {v!r} must be lower_snake_case (the name of its template folder)"
        )
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Reminders(_Model):
    """Reminders while a customer stays in a stage: first after N days, then every M, at most K."""

    message: str
    first_after_days: Days
    every_days: Days
    max: Count
    # From this reminder on, cc the account manager and send them an internal note.
    escalate_after: Annotated[int, Field(ge=1, strict=True)] | None = None
    escalation_message: str = "account_manager_alert"

    @field_validator("message", "escalation_message")
    @classmethod
    def _names(cls, v: str) -> str:
        return _message_name(v)

    @model_validator(mode="after")
    def _escalation_reachable(self) -> Reminders:
        if self.escalate_after is not None and self.escalate_after > self.max:
            raise ValueError(
                f"escalate_after = {self.escalate_after} is more than max = {self.max}, so the "
                "account manager would never be told; lower escalate_after or raise max"
            )
        return self


class Stage(_Model):
    name: str
    description: str = ""
    on_enter: str | None = None
    next: tuple[str, ...] = ()
    reminders: Reminders | None = None
    # How long a customer is expected to stay here before `comms status` calls it stuck.
    expected_days: Days | None = None
    # Final stage: nothing follows, nothing is sent after the on_enter message.
    final: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"stage name {v!r} must be lower_snake_case")
        return v

    @field_validator("on_enter")
    @classmethod
    def _on_enter(cls, v: str | None) -> str | None:
        return None if v is None else _message_name(v)

    @model_validator(mode="after")
    def _final(self) -> Stage:
        if self.final and self.next:
            raise ValueError(
                f"stage {self.name!r} is final but lists next = {list(self.next)}; "
                "remove next or set final = false"
            )
        if self.final and self.reminders is not None:
            raise ValueError(
                f"stage {self.name!r} is final, and final stages send no reminders; "
                "remove [stages.reminders] or set final = false"
            )
        if self.name in self.next:
            raise ValueError(f"stage {self.name!r} lists itself in next; remove it")
        return self


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

    def holidays_run_out(self, today: date) -> str | None:
        """A warning when holidays are configured but none is left after ``today``: the list
        is updated by hand every year, and a forgotten update sends mail on next year's
        holidays without a word."""
        if not self.holidays or max(self.holidays) > today:
            return None
        return (f"[window] holidays in the campaign lists no date after {today.isoformat()} "
                f"(the last is {max(self.holidays).isoformat()}): mail goes out on the coming "
                "year's holidays until you add them.")

    @model_validator(mode="after")
    def _order(self) -> SendWindow:
        if self.start >= self.end:
            raise ValueError(
                f"start {self.start} must be before end {self.end} (a window cannot cross "
                "midnight)"
            )
        return self

    @property
    def weekday_numbers(self) -> frozenset[int]:
        return frozenset(WEEKDAYS.index(d) for d in self.days)

    @property
    def minutes(self) -> float:
        """How long the window is open on a sending day."""
        return (self.end.hour * 60 + self.end.minute) - (self.start.hour * 60 + self.start.minute)


class Campaign(_Model):
    name: str = "csp-transition"
    initial_stage: str = "imported"
    window: SendWindow = SendWindow()
    # Contact roles that receive customer messages, in order of preference; if a customer has
    # none of these roles, all its contacts receive them.
    recipients: tuple[str, ...] = ("primary", "billing")
    # Entering this stage means the customer's CSP subscription is live: it starts the
    # double-billing clock (``csp_live_at``) that `comms status` and the report count.
    csp_live_stage: str = "awaiting_cancellation"
    # Waves (tags) need `comms wave approve` before their first customer message goes out.
    require_approval: Annotated[bool, Field(strict=True)] = False
    stages: tuple[Stage, ...]
    sync: SyncRules = SyncRules()  # stage sync: which observation moves which stage
    inbox: InboxPolicy = InboxPolicy()  # [inbox]: reading replies and bounces

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
        # The default names a stage of the built-in campaign; a campaign without it simply has
        # no go-live clock. Set explicitly, it must name one of the stages.
        if "csp_live_stage" in self.model_fields_set and self.csp_live_stage not in names:
            raise ValueError(f"csp_live_stage {self.csp_live_stage!r} is not a stage ({names})")
        for s in self.stages:
            unknown = [n for n in s.next if n not in names]
            if unknown:
                raise ValueError(f"stage {s.name!r}: next names unknown stage(s) {unknown}")
        # Rules written in the campaign's [sync] table must name its stages (a typo would make
        # sync observe and never move); the defaults name the built-in campaign's stages.
        for rule in sorted(self.sync.model_fields_set & {"relationship_accepted", "gdap_active",
                                                         "csp_active", "direct_inactive"}):
            target = self.sync.stage_for(rule)
            if target and target not in names:
                raise ValueError(f"[sync] {rule} = {target!r} is not a stage ({names}); name "
                                 "one of them, or \"\" to turn the rule off")
        # The outbox sends each (message, sequence) once per customer, so a message name used
        # twice would silently never go out the second time.
        used: dict[str, str] = {}
        for s in self.stages:
            uses = [(s.on_enter, "on_enter")]
            if s.reminders:
                uses.append((s.reminders.message, "reminders.message"))
                if s.reminders.escalate_after is not None:
                    uses.append((s.reminders.escalation_message, "reminders.escalation_message"))
            for msg, key in uses:
                if msg is None:
                    continue
                where = f"stage {s.name!r} {key}"
                if msg in used:
                    raise ValueError(
                        f"message {msg!r} is used twice ({used[msg]} and {where}); each message "
                        "is sent once per customer, so give each use its own name"
                    )
                used[msg] = where
        return self

    @cached_property  # asked for every customer a run plans; a campaign never changes
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    @property
    def completed_stages(self) -> tuple[str, ...]:
        """The stages in which a customer's transition is complete: those marked ``final``
        (``completed`` in the default campaign, whatever a campaign names it), else the last
        stage. The one definition of "completed" for `comms status` and the report: the
        "completed" card and every completion rate count customers in one of these now."""
        final = tuple(s.name for s in self.stages if s.final)
        return final or self.stage_names[-1:]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def has_stage(self, name: str) -> bool:
        return name in self.stage_names

    def internal_messages(self) -> frozenset[str]:
        """Notes to the account manager (escalation messages): never sent to a customer."""
        return frozenset(
            s.reminders.escalation_message for s in self.stages
            if s.reminders and s.reminders.escalate_after
        )

    def stage_of(self, message: str) -> str | None:
        """The stage whose entry, reminder or escalation sends ``message`` (None: no stage)."""
        for s in self.stages:
            r = s.reminders
            if message == s.on_enter or (r is not None and message in (
                r.message, r.escalation_message if r.escalate_after else None
            )):
                return s.name
        return None

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
    """The campaign shipped with comms (``config/campaign.toml``)."""
    return builtin_config_dir() / "campaign.toml"


def load_campaign(path: str | Path | None = None) -> Campaign:
    """Read and validate a campaign file (the built-in one when ``path`` is empty).

    Raises ``CampaignError`` listing every problem as ``FILE: WHERE: WHAT (got VALUE)``, where
    WHERE names the stage (``stages[2] 'invited': reminders.max``)."""
    p = Path(path) if path else default_campaign_path()
    try:
        data: dict[str, Any] = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as exc:
        raise CampaignError(
            f"Campaign file {p} does not exist; fix campaign_file (or COMMS_CAMPAIGN_FILE) "
            "or copy config/campaign.toml there."
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise CampaignError(f"{p} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CampaignError(f"{p} is not UTF-8 text; save it as UTF-8.") from exc
    except OSError as exc:
        raise CampaignError(f"Cannot read campaign file {p}: {exc.strerror}") from exc
    try:
        return Campaign.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].replace("Extra inputs are not permitted", "unknown key")
            msg = msg.removeprefix("Value error, ")
            got = err.get("input")
            shown = (
                "" if err["type"] in ("value_error", "missing") or isinstance(got, dict | list)
                else f" (got {got!r})"
            )
            problems.append(f"{p}: {_where(err['loc'], data)}: {msg}{shown}")
        raise CampaignError(
            f"The campaign definition has {len(problems)} problem(s); fix them and run "
            "`comms config check`:",
            problems=problems,
        ) from exc


def _where(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """``stages[2] 'invited': reminders.max`` for a pydantic error location."""
    if not loc:
        return "campaign"
    parts: list[str] = []
    head = ""
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        stages = data.get("stages")
        name = ""
        if isinstance(stages, list) and loc[1] < len(stages) and isinstance(stages[loc[1]], dict):
            name = str(stages[loc[1]].get("name", ""))
        head = f"stages[{loc[1]}]" + (f" {name!r}" if name else "")
        loc = loc[2:]
        if not loc:
            return head
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] = f"{parts[-1]}[{item}]"
            else:
                parts.append(f"[{item}]")
        else:
            parts.append(str(item))
    rest = ".".join(parts)
    return f"{head}: {rest}" if head else rest
