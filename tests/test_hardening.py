"""Issue 12 (rest): every failure one clear line and its exit code, customer data printed
literally, secrets never echoed, files owner-only, the report's CSP without 'unsafe-inline',
dependency floors past known CVEs and a constraints file that setup installs from."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import customer, queued

from comms.config import Settings, mask_url, unencoded_credentials
from comms.errors import DatabaseError
from comms.store.db import Database, open_database

REPO = Path(__file__).resolve().parent.parent

HOSTILE_NAME = "[/x]K1 [link=http://evil.example]click[/link] \x1b]8;;http://evil\x07x\x1b[31mred"
HOSTILE_KEY = "K[bold]1\x1b[2J"


def _one_line_error(result: object, code: int, *needles: str) -> str:
    out = result.stdout + result.stderr  # type: ignore[attr-defined]
    assert result.exit_code == code, out  # type: ignore[attr-defined]
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, out
    return out


# -- 1. dependency floors and the lock ------------------------------------------------------

def _floors() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project = data["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["sandbox"])
    out = {}
    for req in reqs:
        m = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9.]+)", req)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def _v(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def test_dependency_floors_are_past_known_cves() -> None:
    floors = _floors()
    assert _v(floors["jinja2"]) >= (3, 1, 6)
    assert _v(floors["requests"]) >= (2, 32, 4)
    assert _v(floors["urllib3"]) >= (2, 5)
    assert _v(floors["cryptography"]) >= (42, 0, 4)
    assert _v(floors["pyjwt"]) >= (2, 12)
    main = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(d.startswith(("pyjwt", "trustme")) for d in main["dependencies"])
    assert "comms[sandbox]" in main["optional-dependencies"]["dev"]


def test_constraints_pin_every_dependency_at_or_above_its_floor() -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    for name, floor in _floors().items():
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert _v(pins[name]) >= _v(floor), (name, pins[name], floor)
    run = (REPO / "scripts" / "run.py").read_text(encoding="utf-8")
    assert '"-c", "constraints.txt"' in run
    assert "constraints.txt" in run and "_install_key" in run


def test_product_code_never_imports_the_sandbox_libraries() -> None:
    for path in (REPO / "comms").rglob("*.py"):
        if "sandbox" in path.relative_to(REPO / "comms").parts:
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from) (jwt|trustme)\b", text, re.M), path


# -- 2. every failure a clear line and its exit code ----------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_postgres_is_one_line_without_password(cli, monkeypatch) -> None:
    url = f"postgresql://comms:s3cretPW@127.0.0.1:{_closed_port()}/comms"
    monkeypatch.setenv("COMMS_DATABASE_URL", url)
    out = _one_line_error(cli("customers", "list"), 1, "Cannot use the database at 127.0.0.1:",
                          "COMMS_DATABASE_URL")
    assert "s3cretPW" not in out


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_config_file_not_utf8(cli, tmp_path: Path, encoding: str) -> None:
    cfg = tmp_path / "comms.toml"
    cfg.write_bytes('[partner]\nname = "Fabrikäm"\n'.encode(encoding))
    _one_line_error(cli("--config", str(cfg), "config", "show"), 3, str(cfg),
                    "save it as UTF-8")


def test_secret_file_not_utf8_never_shows_content(cli, tmp_path: Path, monkeypatch) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes("sëcret-value".encode("utf-16"))
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET_FILE", str(secret))
    out = _one_line_error(cli("config", "check"), 3, "COMMS_GRAPH_CLIENT_SECRET_FILE",
                          str(secret), "save it as UTF-8")
    assert "cret-value" not in out


def _ledger_with_customer(db: Database) -> None:
    customer(db, "C1")


@pytest.mark.parametrize("command", [["customers", "export"], ["outbox", "export"]])
def test_export_to_a_directory_or_missing_folder(cli, db: Database, tmp_path: Path,
                                                 command: list[str]) -> None:
    _ledger_with_customer(db)
    folder = tmp_path / "out"
    folder.mkdir()
    _one_line_error(cli(*command, str(folder)), 1, "is a directory")
    missing = tmp_path / "nope" / "x.csv"
    _one_line_error(cli(*command, str(missing)), 1, "does not exist")


def test_preview_out_to_a_directory(cli, db: Database, tmp_path: Path) -> None:
    _ledger_with_customer(db)
    folder = tmp_path / "out"
    folder.mkdir()
    result = cli("preview", "C1", "-m", "partner_invitation", "--out", str(folder))
    _one_line_error(result, result.exit_code, "is a directory")
    assert result.exit_code in (1, 2)


def test_backup_onto_a_directory(cli, db: Database, tmp_path: Path) -> None:
    folder = tmp_path / "backups"
    folder.mkdir()
    if not db.is_sqlite:  # PostgreSQL: one clear line pointing to pg_dump, never a traceback
        _one_line_error(cli("db", "backup", str(folder)), 1, "pg_dump")
        return
    _one_line_error(cli("db", "backup", str(folder)), 1, "is a directory", "file name")
    _one_line_error(cli("db", "backup", str(folder), "--force"), 1, "is a directory")


def test_report_now_at_the_end_of_time(cli, db: Database, tmp_path: Path) -> None:
    _ledger_with_customer(db)
    result = cli("report", "--now", "9999-12-31", "--out", str(tmp_path / "r.html"))
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    assert result.exit_code in (0, 2), out
    if result.exit_code == 2:
        assert "--now" in out


@pytest.fixture
def full_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a 64 KiB tmpfs (root can mount one; CI runs as root)."""
    target = tmp_path / "full"
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_export_to_a_full_disk_keeps_the_old_file(cli, db: Database, full_folder: Path) -> None:
    for i in range(400):
        customer(db, f"K{i:04d}", name="Contoso " + "x" * 200)
    target = full_folder / "customers.csv"
    target.write_text("previous export\n", encoding="utf-8")
    _one_line_error(cli("customers", "export", str(target)), 1, "disk is full")
    assert target.read_text(encoding="utf-8") == "previous export\n"
    assert [p.name for p in full_folder.iterdir()] == ["customers.csv"]


# -- 3. customer data printed literally -----------------------------------------------------

def test_hostile_customer_data_is_printed_literally(cli, db: Database) -> None:
    # Data from an older version (the importer now refuses control characters).
    cid = customer(db, HOSTILE_KEY, name=HOSTILE_NAME)
    queued(db, cid, to="it@contoso.example")
    outputs = [
        cli("customers", "list"),
        cli("customers", "show", HOSTILE_KEY),
        cli("outbox", "list"),
        cli("customers", "set-stage", HOSTILE_KEY, "approved", "--force", "--note", "t",
            "--yes"),
    ]
    for result in outputs:
        out = result.stdout + result.stderr
        assert "Traceback" not in out
        assert "\x1b" not in out and "\x07" not in out, repr(out)
    listing = outputs[0].stdout
    assert "\\x1b" in listing
    shown = outputs[1].stdout
    assert "[/x]K1" in shown and "[link=http://evil.example]click[/link]" in shown
    assert "\\x1b]8;;http://evil\\x07" in shown
    assert "K[bold]1\\x1b[2J" in outputs[3].stdout


def test_status_shows_hostile_names_literally(cli, db: Database) -> None:
    customer(db, HOSTILE_KEY, name=HOSTILE_NAME, licences=500, stage="invited")
    result = cli("status")
    out = result.stdout + result.stderr
    assert result.exit_code == 0, out
    assert "\x1b" not in out and "\x07" not in out


def test_visible_helper() -> None:
    from comms.cli.common import safe, visible

    assert visible("a\x1b[31mb\x07\u202ec") == "a\\x1b[31mb\\x07\\u202ec"
    assert safe("[link=x]y") == "\\[link=x]y"


# -- 4. secrets and files -------------------------------------------------------------------

@pytest.mark.parametrize("text, secret", [
    ('[graph]\nclient_secrets = "TopSecretValue1"\n', "TopSecretValue1"),
    ('[database]\nurll = "postgresql://u:PASSWORD9@h/db"\n', "PASSWORD9"),
])
def test_misspelled_key_never_echoes_its_value(cli, tmp_path: Path, text: str,
                                               secret: str) -> None:
    cfg = tmp_path / "comms.toml"
    cfg.write_text(text, encoding="utf-8")
    out = _one_line_error(cli("--config", str(cfg), "config", "check"), 3,
                          "unknown key (check its spelling)")
    assert secret not in out


def test_wrong_type_value_masks_url_credentials(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "comms.toml"
    cfg.write_text('[graph]\nbase_url = "http://u:PASSWORD7@graph.example"\n', encoding="utf-8")
    out = _one_line_error(cli("--config", str(cfg), "config", "check"), 3, "base_url")
    assert "PASSWORD7" not in out


def test_config_show_masks_credentials_in_every_url(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COMMS_DATABASE_URL", "postgresql://u:DbPass1@db.example/comms")
    monkeypatch.setenv("COMMS_GRAPH_BASE_URL", "https://app:GraphPass2@graph.example/v1.0")
    monkeypatch.setenv("COMMS_SYNC_PARTNER_CENTER_URL",
                       "https://pc.example/?password=QueryPass3&x=1")
    result = cli("config", "show")
    assert result.exit_code == 0, result.output
    for secret in ("DbPass1", "GraphPass2", "QueryPass3"):
        assert secret not in result.stdout
    assert "graph.example" in result.stdout and "x=1" in result.stdout


def test_mask_url_keeps_the_host() -> None:
    assert mask_url("postgresql://u:p/a@ss@h:5432/db") == "postgresql://u:********@h:5432/db"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"


@pytest.mark.parametrize("password", ["s3cr?t-Pw", "pa#ss-Pw", "Tr0ub4dor@Horse-Battery-77",
                                      "a/b?c#d@e:f"])
def test_mask_url_hides_everything_up_to_the_last_at(password: str) -> None:
    """An un-encoded "?" or "#" in a password ended the masking early (the rest was shown)."""
    masked = mask_url(f"postgresql://comms:{password}@db.example:5432/comms?sslmode=require")
    assert masked == "postgresql://comms:********@db.example:5432/comms?sslmode=require"
    assert mask_url("sqlite:////home/ann@corp/comms.db") == "sqlite:////home/ann@corp/comms.db"
    assert mask_url("postgresql://comms@db.example:5432/comms") == \
        "postgresql://comms@db.example:5432/comms"
    # An "@" in the query is not part of the credentials: such a URL is neither refused nor
    # masked beyond its password.
    query_at = "postgresql://comms:pw@db.example/comms?sslrootcert=/etc/ssl/ca@corp.pem"
    assert mask_url(query_at) == (
        "postgresql://comms:********@db.example/comms?sslrootcert=/etc/ssl/ca@corp.pem")
    assert not unencoded_credentials(query_at)
    assert unencoded_credentials(f"postgresql://comms:{password}@db.example/comms?a=b@c")


def _pieces(password: str, out: str) -> list[str]:
    """The pieces of ``password`` (split where a URL parser would) that ``out`` shows."""
    return [p for p in {password, *re.split("[@?#/]", password)} if len(p) >= 4 and p in out]


@pytest.mark.parametrize("password", ["s3cr?t-Pw", "pa#ss-Pw", "Tr0ub4dor@Horse-Battery-77",
                                      "pa/ss-Pw"])
def test_a_database_url_with_unencoded_credentials_is_refused_without_echoing_it(
        cli, tmp_path: Path, monkeypatch, password: str) -> None:
    url = f"postgresql://comms:{password}@127.0.0.1:1/comms"
    monkeypatch.setenv("COMMS_DATABASE_URL", url)
    for args in (("config", "show"), ("config", "show", "--json"), ("customers", "list")):
        out = _one_line_error(cli(*args), 3, "COMMS_DATABASE_URL: [database] url",
                              "percent-encode", "'@' as %40")
        assert not _pieces(password, out) and "127.0.0.1" not in out, out
    cfg = tmp_path / "comms.toml"
    cfg.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    monkeypatch.delenv("COMMS_DATABASE_URL")
    out = _one_line_error(cli("--config", str(cfg), "config", "check"), 3,
                          f"{cfg}: [database] url", "percent-encode")
    assert not _pieces(password, out), out
    encoded = url.replace(password, password.replace("@", "%40").replace("?", "%3F")
                          .replace("#", "%23").replace("/", "%2F"))
    monkeypatch.setenv("COMMS_DATABASE_URL", encoded)
    shown = cli("config", "show")
    assert shown.exit_code == 0 and "postgresql://comms:********@127.0.0.1:1/comms" in \
        shown.stdout, shown.output


def test_a_database_error_shows_no_piece_of_the_password() -> None:
    """Given directly (the config refuses it), a password with an un-encoded "@" is read by
    the driver as part of the host: "failed to resolve host 'Horse-Battery-77@127.0.0.1'"."""
    pytest.importorskip("psycopg")
    with pytest.raises(DatabaseError) as err:
        open_database("postgresql://comms:Tr0ub4dor@Horse-Battery-77@127.0.0.1:1/comms")
    assert "Horse-Battery-77" not in str(err.value) and "Tr0ub4dor" not in str(err.value)
    assert "Cannot use the database at 127.0.0.1:1/comms" in str(err.value)


def test_config_check_warns_on_readable_credentials_and_shows_budget(
        cli, tmp_path: Path, monkeypatch) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n", encoding="utf-8")
    key.chmod(0o644)
    secret = tmp_path / "secret.txt"
    secret.write_text("s", encoding="utf-8")
    secret.chmod(0o640)
    cache = tmp_path / "cache.json"
    cache.write_text("{}", encoding="utf-8")
    cache.chmod(0o600)
    monkeypatch.setenv("COMMS_GRAPH_PRIVATE_KEY_FILE", str(key))
    monkeypatch.setenv("COMMS_GRAPH_CLIENT_SECRET_FILE", str(secret))
    monkeypatch.setenv("COMMS_GRAPH_TOKEN_CACHE_FILE", str(cache))
    monkeypatch.setenv("COMMS_TENANT_LICENCES", "1000")
    monkeypatch.setenv("COMMS_TENANT_ACCEPTED_DOMAINS", "fabrikam.example,corp.example")
    result = cli("config", "check")
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    assert f"chmod 600 {key}" in out and "0644" in out
    assert f"chmod 600 {secret}" in out
    assert f"chmod 600 {cache}" not in out
    s = Settings.model_validate({"tenant": {"licences": 1000}})
    assert f"cap {s.tenant.cap:,}" in out and f"{s.tenant.budget:,}" in out
    assert "corp.example" in out


def test_ledger_backup_and_export_are_owner_only(cli, comms_home: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    old = os.umask(0o022)
    try:
        ledger = comms_home / "fresh" / "comms.db"
        monkeypatch.setenv("COMMS_DATABASE_URL", f"sqlite:///{ledger}")
        db = open_database(f"sqlite:///{ledger}")
        customer(db, "C1")
        db.dispose()
        for path in [ledger, *ledger.parent.glob("comms.db-*")]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert cli("db", "backup", str(tmp_path / "b.db")).exit_code == 0
        assert cli("customers", "export", str(tmp_path / "c.csv")).exit_code == 0
        assert cli("outbox", "export", str(tmp_path / "o.csv")).exit_code == 0
        assert cli("report", "--out", str(tmp_path / "r.html")).exit_code == 0
        for name in ("b.db", "c.csv", "o.csv", "r.html"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    finally:
        os.umask(old)


# -- 5. the report's Content-Security-Policy ------------------------------------------------

def test_report_csp_allows_only_its_own_script(cli, db: Database, tmp_path: Path) -> None:
    _ledger_with_customer(db)
    out = tmp_path / "report.html"
    result = cli("report", "--out", str(out))
    assert result.exit_code == 0, result.output
    html = out.read_text(encoding="utf-8")
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert csp
    policy = csp.group(1)
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";", 1)[0]
    assert "base-uri 'none'" in policy and "form-action 'none'" in policy
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy
