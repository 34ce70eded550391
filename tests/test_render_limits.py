"""Template containment and resource limits: a hostile override folder can neither read files
outside the template folders nor hang or exhaust a run; every failure names the template."""

from __future__ import annotations

import ast
import os
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from comms.config import Settings
from comms.domain import ContactInfo, CustomerInfo, Observation
from comms.errors import TemplateError, UnknownTimeZone
from comms.render import Renderer, build_context

NOW = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
SETTINGS = Settings()
RENDER_PACKAGE = Path(__file__).resolve().parent.parent / "comms" / "render"


def customer(**kw: object) -> CustomerInfo:
    base = CustomerInfo(
        key="contoso", name="Contoso Ltd", licences=24, stage="awaiting_cancellation",
        stage_entered_at=NOW - timedelta(days=5), tenant_id="tenant-123",
        contacts=(ContactInfo("Ana Admin", "ana@contoso.example"),),
        csp_live_at=NOW - timedelta(days=5),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- containment -------------------------------------------------------------------------------


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "private" / "key.pem"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN PRIVATE KEY-----\nSECRET-KEY-MATERIAL\n", encoding="utf-8")
    return secret


def test_symlinked_partial_outside_the_folders_is_refused(tmp_path: Path) -> None:
    secret = _secret(tmp_path)
    folder = tmp_path / "tpl"
    body = write(folder, "kickoff/body.txt",
                 "{% extends layout %}\n{% block content %}\n{% include '_footer.txt' %}\n"
                 "{% endblock %}\n")
    (folder / "_footer.txt").symlink_to(secret)
    r = Renderer(SETTINGS, template_dir=folder)
    with pytest.raises(TemplateError) as info:
        r.render("kickoff", customer(), now=NOW)
    message = str(info.value)
    assert "SECRET-KEY-MATERIAL" not in message
    assert f"{body}:3: template '_footer.txt' resolves to {secret.resolve()}, outside the " \
        "template folders; comms refuses to read it" in message
    assert r.outside_folders() == [(folder / "_footer.txt", secret.resolve())]


def test_symlinked_message_file_and_folder_outside_are_refused(tmp_path: Path) -> None:
    secret = _secret(tmp_path)
    folder = tmp_path / "tpl"
    (folder / "kickoff").mkdir(parents=True)
    (folder / "kickoff" / "subject.txt").symlink_to(secret)
    # A linked folder pointing at "/" is not walked (it would list the whole disk).
    os.symlink("/", folder / "root")
    r = Renderer(SETTINGS, template_dir=folder)
    assert not any(n.startswith("root/") for n in r.template_names())
    with pytest.raises(TemplateError, match="outside the template folders") as info:
        r.render("kickoff", customer(), now=NOW)
    assert "SECRET-KEY-MATERIAL" not in str(info.value)


def test_symlinks_inside_the_folders_still_work(tmp_path: Path) -> None:
    folder = tmp_path / "tpl"
    real = write(folder, "shared/subject.txt", "Linked subject for {{ customer.name }}\n")
    (folder / "kickoff").mkdir()
    (folder / "kickoff" / "subject.txt").symlink_to(real)
    linked_root = tmp_path / "link-to-tpl"
    linked_root.symlink_to(folder)  # the configured folder itself may be a link
    r = Renderer(SETTINGS, template_dir=linked_root)
    assert r.render("kickoff", customer(), now=NOW).subject == "Linked subject for Contoso Ltd"
    assert r.outside_folders() == []


# --- resource limits ---------------------------------------------------------------------------

HOSTILE = {
    "nested loops": ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}"
                     "{% endfor %}", "time budget"),
    "big range": ("{% for i in range(100000) %}{% endfor %}", r"range\(\) of 100,000 items"),
    "string multiplication": ("{{ 'x' * 300000000 }}", "repeated 300,000,000 times"),
    "list multiplication": ("{{ [1, 2] * 300000000 }}", "repeated 300,000,000 times"),
    "power": ("{{ 9 ** 999999999 }}", "too large a number"),
    "doubling": ("{% set ns = namespace(s='xx') %}{% for i in range(60) %}"
                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}", "joined string"),
    "sum doubling": ("{% set ns = namespace(s='xx') %}{% for i in range(60) %}"
                     "{% set ns.s = ns.s + ns.s %}{% endfor %}", "the sum"),
    "padding method": ("{{ 'x'.ljust(300000000) }}", r"str\.ljust\(\) to a million"),
    "center filter": ("{{ 'x'|center(300000000) }}", r"\|center to a width"),
    "format width": ("{{ '%300000000s'|format('x') }}", "format width"),
    "percent width": ("{{ '%300000000s' % 'x' }}", "format width"),
    "str.format width": ("{{ '{:>300000000}'.format('x') }}", "format width"),
    "join": ("{{ (('x' * 900000).split('q') * 5000)|join }}", "joined string"),
    "recursion": ("{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
                  "time budget|maximum recursion"),
    "output": ("{% for i in range(5000) %}{{ 'y' * 900000 }}{% endfor %}",
               "output is over the limit"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_template_fails_with_its_name(tmp_path: Path, case: str) -> None:
    source, expected = HOSTILE[case]
    path = write(tmp_path, "kickoff/subject.txt", "Hello\n" + source + "\n")
    # A short budget keeps the test quick; the default (5 s) behaves the same, only later.
    r = Renderer(SETTINGS, template_dir=tmp_path, time_budget=0.3)
    with pytest.raises(TemplateError) as info:
        r.render("kickoff", customer(), now=NOW)
    message = str(info.value)
    # The output cap is checked between chunks, outside the template's own frames.
    assert message.startswith(f"{path}: " if case == "output" else f"{path}:2: ")
    assert re.search(expected, message), message


def test_ordinary_loops_and_arithmetic_still_work(tmp_path: Path) -> None:
    write(tmp_path, "kickoff/subject.txt",
          "{% for c in customer.contacts %}{{ c.name }}{% else %}nobody{% endfor %} "
          "{{ range(3)|join(',') }} {{ 'ab' * 2 }} {{ 2 ** 10 }} {{ '%05d' % 42 }} "
          "{{ 'a' ~ 'b' }} {{ [1] + [2] }}{% for i in range(2) %}{{ loop.index }}"
          "{{ '/' if not loop.last }}{% endfor %}\n")
    r = Renderer(SETTINGS, template_dir=tmp_path)
    assert r.render("kickoff", customer(), now=NOW).subject == (
        "Ana Admin 0,1,2 abab 1024 00042 ab [1, 2]1/2")


def test_lipsum_is_not_available(tmp_path: Path) -> None:
    write(tmp_path, "kickoff/subject.txt", "{{ lipsum(100000) }}\n")
    with pytest.raises(TemplateError, match="'lipsum' is undefined"):
        Renderer(SETTINGS, template_dir=tmp_path).render("kickoff", customer(), now=NOW)


# --- time zones ---------------------------------------------------------------------------------


def test_unknown_time_zone_in_the_ledger_names_the_customer() -> None:
    r = Renderer(SETTINGS)
    with pytest.raises(UnknownTimeZone) as info:
        r.render("kickoff", customer(time_zone="Europe/Lodnon"), now=NOW)
    assert "Customer 'contoso' has time zone 'Europe/Lodnon' in the ledger" in str(info.value)
    assert "Europe/London" in str(info.value)  # the suggestion


def test_time_zone_is_case_insensitive_and_dates_in_the_customer_zone() -> None:
    late = datetime(2026, 3, 10, 23, 30, tzinfo=UTC)
    ctx = build_context(SETTINGS, customer(time_zone="asia/tokyo"), message="m", now=late)
    assert ctx["today"] == datetime(2026, 3, 11).date()


# --- observed -----------------------------------------------------------------------------------


def test_observed_is_always_present_and_empty_without_an_observation() -> None:
    o = build_context(SETTINGS, customer(), message="m", now=NOW)["observed"]
    assert vars(o) == {"at": None, "source": "", "direct_active": False,
                       "direct_cancelled": False, "direct_status": "",
                       "assigned_licences": None}


@pytest.mark.parametrize(("status", "active", "cancelled"),
                         [("Enabled", True, False), ("Disabled", False, True),
                          ("", False, False)])
def test_observed_reflects_the_observation(status: str, active: bool, cancelled: bool) -> None:
    seen = Observation(at=NOW, source="partner_center", direct_status=status,
                       assigned_licences=12)
    o = build_context(SETTINGS, customer(), message="m", now=NOW, observation=seen)["observed"]
    assert (o.direct_active, o.direct_cancelled) == (active, cancelled)  # type: ignore[attr-defined]
    assert o.at == NOW and o.source == "partner_center"  # type: ignore[attr-defined]
    assert o.assigned_licences == 12  # type: ignore[attr-defined]


def test_templates_can_word_by_evidence(tmp_path: Path) -> None:
    write(tmp_path, "kickoff/subject.txt",
          "{% if observed.direct_active %}still active on {{ observed.at|date }}"
          "{% else %}may still be active{% endif %}\n")
    r = Renderer(SETTINGS, template_dir=tmp_path)
    assert r.render("kickoff", customer(), now=NOW).subject == "may still be active"
    seen = Observation(at=NOW, source="partner_center", direct_status="Enabled")
    assert r.render("kickoff", customer(), now=NOW, observation=seen).subject == \
        "still active on 10 March 2026"
    with pytest.raises(ValueError, match="aware"):
        Observation(at=datetime(2026, 1, 1))


# --- shape of the package -----------------------------------------------------------------------


def test_render_package_modules_and_functions_stay_small() -> None:
    for path in sorted(RENDER_PACKAGE.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert source.count("\n") <= 450, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 60, f"{path.name}:{node.lineno} {node.name} is {length} lines"
