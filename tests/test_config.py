"""Configuration: every bad input is an error naming key and file (or variable), all problems at
once; environment overrides; secrets only from the environment and never printed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from comms.config import MASK, load_settings
from comms.errors import ConfigError
from comms.wording import plural

Cli = Callable[..., Any]


def problems(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "comms.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_settings(path, env=env or {})
    assert exc.value.message == (
        f"The configuration has {plural(len(exc.value.problems), 'problem')}; fix them and run "
        "`comms config check`:")
    return [p.replace(str(path), "FILE") for p in exc.value.problems]


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = load_settings(None, env={})
    assert s.source == "built-in defaults"
    assert s.partner.licence_threshold == 25
    assert s.partner.support_url == "https://admin.microsoft.com/#/support"
    assert s.partner.billing_url == "https://go.microsoft.com/fwlink/p/?linkid=842054"
    assert s.partner.invitation_link.endswith(
        "partnerId=00000000-0000-0000-0000-000000000000&msppId=0&DAP=false"
        "#/BillingAccounts/partner-invitation")


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "comms.example.toml"
    s = load_settings(example, env={})
    assert s.source == str(example)
    assert s.senders[0].address == "transition@fabrikam.example"


def test_typo_in_a_key_names_key_and_file(tmp_path: Path) -> None:
    assert problems(tmp_path, '[partner]\nnmae = "Fabrikam"\n') == [
        "FILE: [partner] nmae: unknown key (check its spelling)"]


def test_typo_in_a_top_level_key(tmp_path: Path) -> None:
    assert problems(tmp_path, 'campain_file = "x.toml"\n') == [
        "FILE: campain_file: unknown key (check its spelling)"]


def test_typo_in_a_section_name(tmp_path: Path) -> None:
    assert problems(tmp_path, "[partnr]\nname = 'X'\n") == [
        "FILE: partnr: unknown key (check its spelling)"]


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    assert problems(tmp_path, '[partner]\nlicence_threshold = "many"\n') == [
        "FILE: [partner] licence_threshold: Input should be a valid integer, unable to parse "
        "string as an integer (got 'many')"]


def test_bad_values_in_a_list_section(tmp_path: Path) -> None:
    toml = '[[senders]]\naddress = "nobody"\n[[senders]]\naddress = "a@fabrikam.example"\n' \
           "messages_per_minute = 0\n"
    assert problems(tmp_path, toml) == [
        "FILE: [senders[0]] address: 'nobody' is not a mailbox address (name@domain) "
        "(got 'nobody')",
        "FILE: [senders[1]] messages_per_minute: Input should be greater than or equal to 1 "
        "(got 0)",
    ]


INVITATION = ("https://admin.microsoft.com/Adminportal/Home?invType=ResellerRelationship"
              "&partnerId={partner_id}&msppId=0&DAP=%s#/BillingAccounts/partner-invitation")


@pytest.mark.parametrize("dap", ["true", "TRUE", "True"])
def test_an_invitation_link_asking_for_delegated_admin_is_refused(
    tmp_path: Path, dap: str
) -> None:
    """The invitation email says the link asks for no delegated admin permissions."""
    url = INVITATION % dap
    assert problems(tmp_path, f'[partner]\ninvitation_url = "{url}"\n') == [
        f"FILE: [partner] invitation_url: requests delegated admin permissions (DAP={dap}); "
        "the emails tell customers the link asks for none. Use DAP=false, as the default "
        "link does, and ask for admin access separately (GDAP) if you need it "
        f"(got {url!r})"]
    with pytest.raises(ConfigError, match=r"invitation_url: requests delegated admin"):
        load_settings(None, env={"COMMS_PARTNER_INVITATION_URL": url.replace("DAP=", "dap=")})


def test_an_invitation_link_without_delegated_admin_is_accepted(tmp_path: Path) -> None:
    s = load_settings(None, env={"COMMS_PARTNER_INVITATION_URL": INVITATION % "FALSE"})
    assert s.partner.invitation_asks_no_dap is True
    assert load_settings(None, env={}).partner.invitation_asks_no_dap is True  # the default
    no_param = INVITATION.replace("&DAP=%s", "")
    s = load_settings(None, env={"COMMS_PARTNER_INVITATION_URL": no_param})
    assert s.partner.invitation_asks_no_dap is False  # accepted; the emails claim nothing


@pytest.mark.parametrize("host", ["partner.fabrikam.example", "admin.microsoft.com.evil.example",
                                  "aka.ms"])
def test_an_invitation_link_that_does_not_open_the_admin_center_is_refused(
    tmp_path: Path, host: str
) -> None:
    """The emails say the link opens admin.microsoft.com: a tracking or short link is refused."""
    url = (INVITATION % "false").replace("admin.microsoft.com", host, 1)
    [problem] = problems(tmp_path, f'[partner]\ninvitation_url = "{url}"\n')
    assert problem.startswith(f"FILE: [partner] invitation_url: opens {host}; the emails tell "
                              "customers the link opens admin.microsoft.com"), problem
    ok = load_settings(None, env={"COMMS_PARTNER_INVITATION_URL": INVITATION % "false"})
    assert ok.partner.invitation_url.startswith("https://admin.microsoft.com/")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    toml = ('[partner]\nsupport_url = "http://insecure.example"\n'
            '[defaults]\ntime_zone = "Mars/Base"\n[delivery]\ntransport = "smtp"\n')
    assert problems(tmp_path, toml) == [
        "FILE: [partner] support_url: must be an https:// link, got 'http://insecure.example' "
        "(got 'http://insecure.example')",
        "FILE: [defaults] time_zone: unknown time zone 'Mars/Base'; use an IANA name such as "
        "Europe/London (got 'Mars/Base')",
        "FILE: [delivery] transport: Input should be 'graph' or 'outbox_dir' (got 'smtp')",
    ]


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "comms.toml"
    path.write_text("[partner\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_settings(path, env={})
    assert str(exc.value).startswith(f"{path} is not valid TOML: ")


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(tmp_path / "nope.toml", env={})
    assert str(exc.value) == (
        f"Config file {tmp_path / 'nope.toml'} does not exist. Create one with `comms init`.")


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "comms.toml"
    path.write_text("[partner]\nlicence_threshold = 20\nname = 'From File'\n")
    s = load_settings(path, env={"COMMS_PARTNER_LICENCE_THRESHOLD": "30",
                                 "COMMS_DATABASE_URL": "sqlite:///x.db"})
    assert (s.partner.licence_threshold, s.partner.name, s.database_url()) == (
        30, "From File", "sqlite:///x.db")


def test_bad_environment_values_name_the_variable(tmp_path: Path) -> None:
    env = {"COMMS_PARTNER_LICENCE_THRESHOLD": "lots", "COMMS_PARTNR_NAME": "x",
           "COMMS_GRAPH_TENANTID": "y"}
    assert problems(tmp_path, "", env) == [
        "environment variable COMMS_GRAPH_TENANTID: graph has no setting 'tenantid'",
        "environment variable COMMS_PARTNR_NAME is not a comms setting (expected "
        "COMMS_<SECTION>_<KEY>, sections: partner, graph, database, templates, defaults, "
        "delivery, sync, tenant)",
        "environment variable COMMS_PARTNER_LICENCE_THRESHOLD: [partner] licence_threshold: "
        "Input should be a valid integer, unable to parse string as an integer (got 'lots')",
    ]


@pytest.mark.parametrize(("written", "link"), [
    ("+44 20 7946 0000", "tel:+442079460000"),
    # "(0)" is the trunk prefix, not dialled after a country code: +49 (0)30 ... -> +4930...
    ("+49 (0)30 1234567", "tel:+49301234567"),
    ("(030) 1234567", "tel:0301234567"),
])
def test_the_support_phone_link_dials_the_number_as_written(written: str, link: str) -> None:
    assert load_settings(env={"COMMS_PARTNER_SUPPORT_PHONE": written}).partner.phone_link == link


def test_a_support_phone_that_cannot_be_dialled_is_refused(tmp_path: Path) -> None:
    got = problems(tmp_path, "", {"COMMS_PARTNER_SUPPORT_PHONE": "0800 FABRIKAM"})
    assert got == [
        "environment variable COMMS_PARTNER_SUPPORT_PHONE: [partner] support_phone: must be a "
        "phone number as people dial it, such as +44 20 7946 0000 (digits, spaces, + first, "
        "- ( ) . /): the emails link it as tel: (got '0800 FABRIKAM')"]


def test_secret_in_the_file_is_refused(tmp_path: Path) -> None:
    toml = '[graph]\nclient_secret = "s3cret"\nprivate_key_file = "/keys/app.pem"\n'
    assert problems(tmp_path, toml) == [
        "FILE: [graph] client_secret must not be in a config file; set "
        "COMMS_GRAPH_CLIENT_SECRET in the environment instead",
        "FILE: [graph] private_key_file must not be in a config file; set "
        "COMMS_GRAPH_PRIVATE_KEY_FILE in the environment instead",
    ]


def test_secret_from_environment_or_file(tmp_path: Path) -> None:
    s = load_settings(None, env={"COMMS_GRAPH_CLIENT_SECRET": "from-env"})
    assert s.graph.client_secret == "from-env"
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("from-file\n")
    s = load_settings(None, env={"COMMS_GRAPH_CLIENT_SECRET_FILE": str(secret_file)})
    assert s.graph.client_secret == "from-file"
    with pytest.raises(ConfigError) as exc:
        load_settings(None, env={"COMMS_GRAPH_CLIENT_SECRET_FILE": str(tmp_path / "none")})
    assert exc.value.problems == [
        f"COMMS_GRAPH_CLIENT_SECRET_FILE: cannot read {tmp_path / 'none'}: No such file or "
        "directory"]


def test_config_show_masks_secrets(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET", "hunter2-very-secret")
    monkeypatch.setenv("COMMS_GRAPH_PRIVATE_KEY_FILE", "/keys/app-key.pem")
    monkeypatch.setenv("COMMS_DATABASE_URL", "postgresql://comms:db-password@db.internal/comms")
    text = cli("config", "show")
    assert text.exit_code == 0
    as_json = cli("config", "show", "--json")
    assert as_json.exit_code == 0
    for out in (text.stdout, as_json.stdout):
        assert "hunter2" not in out
        assert "app-key.pem" not in out
        assert "db-password" not in out
    assert f'client_secret = "{MASK}"' in text.stdout
    data = json.loads(as_json.stdout)
    assert data["graph"]["client_secret"] == MASK
    assert data["graph"]["private_key_file"] == MASK
    assert data["database"]["url"] == f"postgresql://comms:{MASK}@db.internal/comms"


def test_config_check_reports_every_problem(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "comms.toml"
    path.write_text('[partner]\nnmae = "x"\n[graph]\nclient_secret = "s"\n')
    result = cli("--config", str(path), "config", "check")
    assert result.exit_code == 3
    assert result.stderr == (
        "Error: The configuration has 2 problems; fix them and run `comms config check`:\n"
        f"  - {path}: [graph] client_secret must not be in a config file; set "
        "COMMS_GRAPH_CLIENT_SECRET in the environment instead\n"
        f"  - {path}: [partner] nmae: unknown key (check its spelling)\n"
    )


PARTNER_ID = "7e570000-0000-4000-8000-0000000000aa"


def test_the_starter_branding_stops_a_real_send_and_is_listed_by_config_check(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partner that set its id and name but kept the starter footer, signature and postal
    address would send every customer an email naming Fabrikam, the example partner."""
    from comms.config import partner_problem
    from comms.errors import ConfigError
    from comms.services import preflight

    own = {"COMMS_PARTNER_ID": PARTNER_ID, "COMMS_PARTNER_NAME": "Contoso Partners"}
    problem = partner_problem(load_settings(env=own))
    assert problem is not None and problem.startswith(
        "[partner] signature, postal_address, opt_out_text, website, logo_url, reply_to are "
        "still the starter config's, written for Fabrikam")
    with pytest.raises(ConfigError, match=r"Nothing was queued or sent: \[partner\] signature"):
        preflight.require_partner(load_settings(env=own))
    branded = {**own, **{f"COMMS_PARTNER_{k.upper()}": v for k, v in {
        "signature": "The Contoso team", "postal_address": "Contoso, 2 Road, Leeds",
        "opt_out_text": "Reply 'stop' to Contoso.", "website": "https://contoso.example",
        "logo_url": "https://contoso.example/logo.png",
        "reply_to": "move@contoso.example"}.items()}}
    assert partner_problem(load_settings(env=branded)) is None
    one_left = {k: v for k, v in branded.items() if k != "COMMS_PARTNER_SIGNATURE"}
    assert (partner_problem(load_settings(env=one_left)) or "").startswith(
        "[partner] signature is still the starter config's")
    # The demo and tests: the sandbox (loopback) or the outbox folder send nobody anything.
    for extra in ({"COMMS_GRAPH_BASE_URL": "https://127.0.0.1:8443/v1.0"},
                  {"COMMS_DELIVERY_TRANSPORT": "outbox_dir"}):
        assert partner_problem(load_settings(env={**own, **extra})) is None, extra
    # `templates check` asks about the id only (the branding is the config's business).
    assert partner_problem(load_settings(env=own), branding=False) is None
    for k, v in own.items():
        monkeypatch.setenv(k, v)
    result = cli("config", "check")
    assert result.exit_code == 3
    assert "are still the starter config's" in " ".join(result.stderr.split())
