"""RFC 5322 messages (multipart/alternative: text, then HTML) from an ``OutgoingEmail``.

Used by the outbox-folder transport, by `comms preview -f eml` and by the sandbox's record of
what it accepted, so a file written by any of them opens the same way in any mail client.
Internationalised domains are written in IDNA (punycode) here; the Graph JSON keeps Unicode.
"""

from __future__ import annotations

from datetime import datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

import idna

from comms.delivery.base import SEND_ID_HEADER, Address, OutgoingEmail


def header_domain(domain: str) -> str:
    """An internationalised domain as mail headers carry it: IDNA (punycode), so
    ``bücher.de`` is ``xn--bcher-kva.de``. Without it the email package writes an encoded word
    into the domain (``=?utf-8?q?b=C3=BCcher?=.de``) that no mail server delivers. IDNA 2008
    with UTS 46 mapping, as registries and browsers use (``ß`` stays ``ß``)."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        # Not a valid IDN: leave it for the mail server to refuse rather than guess.
        return domain


def _addr(a: Address) -> HeaderAddress:
    user, _, domain = a.address.rpartition("@")
    return HeaderAddress(display_name=a.name, username=user, domain=header_domain(domain))


def build_eml(email: OutgoingEmail, *, date: datetime, sender_name: str = "") -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = _addr(Address(email.sender, sender_name))
    msg["To"] = [_addr(a) for a in email.to]
    if email.cc:
        msg["Cc"] = [_addr(a) for a in email.cc]
    if email.reply_to:
        msg["Reply-To"] = [_addr(a) for a in email.reply_to]
    msg["Subject"] = email.subject
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = make_msgid(idstring=email.send_id,
                                   domain=header_domain(email.sender.rpartition("@")[2]))
    msg[SEND_ID_HEADER] = email.send_id
    for name, value in email.headers:
        if name.lower() != SEND_ID_HEADER:
            msg[name] = value
    msg.set_content(email.text, subtype="plain", charset="utf-8")
    msg.add_alternative(email.html, subtype="html", charset="utf-8")
    return msg.as_bytes()
