"""`comms sandbox`: run the local Microsoft Graph + identity emulator in the foreground."""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import typer

from comms.cli import common
from comms.errors import ConfigError, UsageError
from comms.paths import home_dir

if TYPE_CHECKING:
    from comms.sandbox import Sandbox


def sandbox(
    port: int = typer.Option(8443, "--port", help="Loopback port to listen on (0: any free)."),
    state_dir: Path = typer.Option(
        None, "--state-dir",
        help="Where the CA, app credentials, sent.jsonl and .eml files go "
        "(default: $COMMS_HOME/sandbox).",
    ),
    time_scale: float = typer.Option(
        1.0, "--time-scale", min=0.0001,
        help="Scale Exchange's time windows: 0.01 makes a 'minute' 0.6 s.",
    ),
    messages_per_minute: int = typer.Option(30, "--messages-per-minute", min=1,
                                            help="Per-mailbox message rate limit."),
    max_concurrent: int = typer.Option(4, "--max-concurrent", min=1,
                                       help="Per-mailbox requests in flight."),
    recipients_per_day: int = typer.Option(10_000, "--recipients-per-day", min=1,
                                           help="Per-mailbox recipients per rolling day."),
    error_rate: float = typer.Option(0.0, "--error-rate", min=0.0, max=1.0,
                                     help="Share of sendMail answered 503/504, not accepted."),
    latency: float = typer.Option(0.0, "--latency", min=0.0,
                                  help="Seconds added to every Graph request."),
    drop_rate: float = typer.Option(
        0.0, "--drop-rate", min=0.0, max=1.0,
        help="Share of sendMail accepted, then the connection dropped with no answer.",
    ),
    throttle_rate: float = typer.Option(0.0, "--throttle-rate", min=0.0, max=1.0,
                                        help="Share of sendMail answered 429, not accepted."),
    auth: str = typer.Option(
        "secret", "--auth",
        help="Credential the printed environment uses: secret, certificate or delegated.",
    ),
    auto_approve: bool = typer.Option(
        False, "--auto-approve-device-codes",
        help="Sign device-code logins in as the first sender without a browser step.",
    ),
) -> None:
    """Run a local Microsoft Graph + identity platform on https://127.0.0.1 until Ctrl-C.

    Registers the configured sender mailboxes and a demo app (client secret and certificate
    in the state dir), then prints the COMMS_* variables that point comms at it.
    """
    from comms.sandbox.demo_app import AUTH_KINDS

    if auth not in AUTH_KINDS:
        raise UsageError(f"--auth must be one of {', '.join(AUTH_KINDS)}, got {auth!r}.")
    senders = [s.address for s in common.app().settings.senders]
    sb = _start(state_dir or home_dir() / "sandbox", port, time_scale=time_scale,
                messages_per_minute=messages_per_minute, max_concurrent=max_concurrent,
                recipients_per_day=recipients_per_day, auto_approve_device_codes=auto_approve)
    sb.set_faults(error_rate=error_rate, latency=latency, drop_after_accept_rate=drop_rate,
                  throttle_rate=throttle_rate)
    _serve(sb, senders, auth)
    typer.echo("# comms sandbox stopped.")


def _start(folder: Path, port: int, **options: Any) -> Sandbox:
    from comms.sandbox import Sandbox

    try:
        sb = Sandbox(folder, port=port, **options)
        sb.start()
    except OSError as exc:
        raise ConfigError(
            f"Cannot start the sandbox on 127.0.0.1:{port}: {exc.strerror or exc}. "
            "Choose another port with --port (0 picks a free one)."
        ) from exc
    return sb


def _serve(sb: Sandbox, senders: list[str], auth: str) -> None:
    """Print the environment that points comms at ``sb``; serve until Ctrl-C or SIGTERM."""
    from comms.sandbox.demo_app import prepare_demo

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        demo = prepare_demo(sb, senders, auth=auth)
        typer.echo(f"# comms sandbox: Microsoft Graph at {sb.graph_url}, "
                   f"identity at {sb.authority}")
        typer.echo(f"# state: {sb.state_dir} (sent.jsonl, eml/); mailboxes: {', '.join(senders)}")
        if auth == "delegated":
            typer.echo(f"# device sign-in page: {sb.base_url}/devicelogin")
        typer.echo("# Point comms at it:")
        for name, value in demo.env.items():
            typer.echo(f"export {name}={shlex.quote(value)}")
        typer.echo("# Running; press Ctrl-C to stop.")
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sb.stop()


def register(app: typer.Typer) -> None:
    app.command("sandbox")(sandbox)
