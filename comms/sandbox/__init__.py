"""A local Microsoft Graph + Microsoft identity platform emulator over HTTPS on loopback.

Used by the tests and by ``comms sandbox`` / ``comms demo``; product code never imports it.
See ``server.Sandbox`` for the API, ``graph`` and ``identity`` for what is emulated and
``state`` for Exchange's limits and the fault knobs.
"""

import importlib.util

from comms.errors import ConfigError

# pyjwt and trustme come with the `sandbox` extra (the dev extra includes it): a product
# install (`pip install comms`) stays lean, and `comms demo` says what to install.
_missing = [m for m in ("jwt", "trustme") if importlib.util.find_spec(m) is None]
if _missing:
    raise ConfigError(
        f"The local Graph sandbox (comms demo, comms sandbox) needs {', '.join(_missing)}: "
        "install the sandbox extra, e.g. `pip install 'comms[sandbox]'` (scripts/run.py setup "
        "does)."
    )

from comms.sandbox.server import Sandbox  # noqa: E402
from comms.sandbox.state import Faults  # noqa: E402

__all__ = ["Faults", "Sandbox"]
