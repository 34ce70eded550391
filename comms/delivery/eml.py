"""RFC 5322 messages (multipart/alternative: text, then HTML) from an ``OutgoingEmail``.

Used by the outbox-folder transport and by the sandbox's record of what it accepted, so a file
written by either opens the same way in any mail client.
"""

from __future__ import annotations

from datetime import datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from comms.delivery.base import SEND_ID_HEADER, Address, OutgoingEmail


def _addr(a: Address) -> HeaderAddress:
    user, _, domain = a.address.partition("@")
    return HeaderAddress(display_name=a.name, username=user, domain=domain)


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
    msg["Message-ID"] = make_msgid(idstring=email.send_id, domain=email.sender.partition("@")[2])
    msg[SEND_ID_HEADER] = email.send_id
    for name, value in email.headers:
        if name.lower() != SEND_ID_HEADER:
            msg[name] = value
    msg.set_content(email.text, subtype="plain", charset="utf-8")
    msg.add_alternative(email.html, subtype="html", charset="utf-8")
    return msg.as_bytes()
