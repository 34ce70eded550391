"""Stopping a run or a worker cleanly on SIGTERM (systemd, kill) or SIGINT (Ctrl-C).

The first signal sets an event: nothing new is claimed, requests already in flight finish and
their outcomes are recorded, slots are given back, the summary is printed and the process
exits 0. A second signal stops at once (exit 130 for SIGINT, as a shell expects); anything left
in `sending` is then recovered by the lease like after a crash.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def graceful_stop() -> Iterator[threading.Event]:
    """Within the block, SIGTERM/SIGINT set the yielded event instead of killing the process."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # asked twice: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
