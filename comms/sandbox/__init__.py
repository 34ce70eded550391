"""A local Microsoft Graph + Microsoft identity platform emulator over HTTPS on loopback.

Used by the tests and by ``comms sandbox`` / ``comms demo``; product code never imports it.
See ``server.Sandbox`` for the API, ``graph`` and ``identity`` for what is emulated and
``state`` for Exchange's limits and the fault knobs.
"""

from comms.sandbox.server import Sandbox
from comms.sandbox.state import Faults

__all__ = ["Faults", "Sandbox"]
