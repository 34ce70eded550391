"""What a failed request proves about whether it left.

requests raises ``SSLError`` for every failure of the TLS layer: a certificate that does not
verify, but also a connection whose TLS stream breaks after the request was written (a bad
record MAC, an alert from a middlebox or proxy). Only the first proves that the handshake failed
and no byte of the request left; after the second the server may have acted on the request.
Likewise only a refused or timed-out connect proves that a ``ConnectionError`` came before the
request.
"""

from __future__ import annotations

import ssl

import requests
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError


def certificate_refused(exc: BaseException) -> bool:
    """True when certificate verification (trust or host name) failed anywhere in ``exc``:
    its ``args``, urllib3's ``reason``, its cause or context, at any depth."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):  # also ssl.CertificateError
            return True
        todo.extend(item.args)
        todo.extend((getattr(item, "reason", None), item.__cause__, item.__context__))
    return False


def never_left(exc: requests.exceptions.ConnectionError) -> bool:
    """True when the connection failed before any byte of the request was sent."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason: object = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, NewConnectionError | ConnectTimeoutError)


__all__ = ["certificate_refused", "never_left"]
