"""Frozen message bodies, stored compactly: the one encoder and decoder of ``messages.body``.

An outbox row freezes the HTML and plain text it was rendered with (they are what was sent), and
most of that HTML is the campaign's markup and inlined CSS, identical from customer to customer.
Both parts go into one column, compressed with zlib and a preset dictionary: the default
campaign's emails rendered once for a sample customer (``body_dict_1.bin``, 32 KiB, the most
zlib can use). zlib alone makes the average message of the default campaign 2.8 KB (from 9.4
KB); with the dictionary, which already holds the markup every message repeats, 1.0 KB. Level 1
because the dictionary does most of the work and queueing pays for every byte compressed (see
docs/benchmarks.md). zlib is in the standard library: no new dependency.

Layout: one format byte (``1``: zlib + dictionary 1), then a zlib stream of: the HTML's UTF-8
length as 4 bytes big endian, the HTML, the text. The dictionary of a format never changes (a
test pins its hash): rows written years ago must still decode. Better dictionaries (changed
templates) become a new format byte with a new file, and ``decode`` keeps reading every older
one; it refuses what it does not know rather than guess.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import NamedTuple

from comms.errors import DatabaseError

FORMAT = 1
LEVEL = 1
_LEN = struct.Struct(">I")
_DICTIONARIES = {1: (Path(__file__).with_name("body_dict_1.bin")).read_bytes()}


class Bodies(NamedTuple):
    html: str
    text: str


# Setting a 32 KiB preset dictionary costs more than compressing a short body: the encoder
# starts from a copy of one that already has it (the output is byte for byte the same).
_PRIMED = zlib.compressobj(LEVEL, zdict=_DICTIONARIES[FORMAT])


def encode(html: str, text: str) -> bytes:
    """The stored form of an HTML + text body pair."""
    h = html.encode("utf-8")
    c = _PRIMED.copy()
    return (bytes((FORMAT,)) + c.compress(_LEN.pack(len(h)) + h + text.encode("utf-8"))
            + c.flush())


def decode(blob: bytes) -> Bodies:
    """Exactly the HTML and text that were given to ``encode``."""
    raw = bytes(blob)  # PostgreSQL drivers hand back memoryview
    zdict = _DICTIONARIES.get(raw[0]) if raw else None
    if zdict is None:
        kind = raw[0] if raw else "empty"
        raise DatabaseError(
            f"A stored message body has an unknown format ({kind!r}); it was written by a newer "
            "comms. Upgrade comms to read it."
        )
    try:
        d = zlib.decompressobj(zdict=zdict)
        data = d.decompress(raw[1:]) + d.flush()
    except zlib.error as exc:
        raise DatabaseError(
            f"A stored message body is damaged ({exc}); restore the ledger from a backup."
        ) from exc
    (n,) = _LEN.unpack_from(data)
    end = _LEN.size + n
    return Bodies(data[_LEN.size:end].decode("utf-8"), data[end:].decode("utf-8"))
