"""Frozen message bodies, stored compactly: the one encoder and decoder of ``messages.body``.

An outbox row freezes the HTML and plain text it was rendered with (they are what was sent), and
most of that HTML is the campaign's markup and inlined CSS, identical from customer to customer.
Both parts go into one column, compressed with a preset dictionary: the default campaign's emails
rendered once for a sample customer (``body_dict_1.bin``, 32 KiB), which already holds the markup
every message repeats.

Formats (the first byte of the column), each readable for ever:

- ``1``: zlib (level 1) with dictionary 1. The average message of the default campaign: 9.4 KB
  raw, 1.0 KB stored. Written until issue 16's second round.
- ``2``: Zstandard (level 3) with dictionary 1 as raw content; written now. About 0.7 KB, and
  compressing a message takes a quarter of zlib's time: zlib had to copy a quarter megabyte of
  primed state per message (docs/benchmarks.md).

After the format byte: the compressed form of the HTML's UTF-8 length as 4 bytes big endian,
the HTML, the text. The dictionary of a format never changes (a test pins its hash): rows
written years ago must still decode. A better dictionary (changed templates) becomes a new format
byte with a new file, and ``decode`` keeps reading every older one; it refuses what it does not
know rather than guess.
"""

from __future__ import annotations

import struct
import threading
import zlib
from pathlib import Path
from typing import NamedTuple

import zstandard

from comms.errors import DatabaseError

FORMAT = 2
ZSTD_LEVEL = 3
ZLIB_LEVEL = 1  # format 1, written no more
_LEN = struct.Struct(">I")
_DICTIONARY_1 = (Path(__file__).with_name("body_dict_1.bin")).read_bytes()


class Bodies(NamedTuple):
    html: str
    text: str


# The dictionary, prepared once for compressing at ZSTD_LEVEL (the tables zstd would otherwise
# build from its 32 KiB for every message).
_ZSTD_DICT = zstandard.ZstdCompressionDict(_DICTIONARY_1, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
_ZSTD_DICT.precompute_compress(level=ZSTD_LEVEL)
# A compressor or decompressor serves one thread at a time (the dispatcher's threads, the run's
# compressing thread): one of each per thread.
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, dict_data=_ZSTD_DICT, write_checksum=True,
            write_content_size=True, write_dict_id=False)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor(dict_data=_ZSTD_DICT)
    return d


def encode(html: str, text: str) -> bytes:
    """The stored form of an HTML + text body pair."""
    h = html.encode("utf-8")
    return bytes((FORMAT,)) + _compressor().compress(
        _LEN.pack(len(h)) + h + text.encode("utf-8"))


def encode_format_1(html: str, text: str) -> bytes:
    """The stored form format 1 gave (zlib): what older rows hold; for tests and benchmarks."""
    h = html.encode("utf-8")
    c = zlib.compressobj(ZLIB_LEVEL, zdict=_DICTIONARY_1)
    return bytes((1,)) + c.compress(_LEN.pack(len(h)) + h + text.encode("utf-8")) + c.flush()


def _inflate_1(raw: bytes) -> bytes:
    d = zlib.decompressobj(zdict=_DICTIONARY_1)
    return d.decompress(raw) + d.flush()


def _inflate_2(raw: bytes) -> bytes:
    return _decompressor().decompress(raw)


_READERS = {1: _inflate_1, 2: _inflate_2}


def decode(blob: bytes) -> Bodies:
    """Exactly the HTML and text that were given to ``encode``."""
    raw = bytes(blob)  # PostgreSQL drivers hand back memoryview
    read = _READERS.get(raw[0]) if raw else None
    if read is None:
        kind = raw[0] if raw else "empty"
        raise DatabaseError(
            f"A stored message body has an unknown format ({kind!r}); it was written by a newer "
            "comms. Upgrade comms to read it."
        )
    try:
        data = read(raw[1:])
        (n,) = _LEN.unpack_from(data)
    except (zlib.error, zstandard.ZstdError, struct.error) as exc:
        raise DatabaseError(
            f"A stored message body is damaged ({exc}); restore the ledger from a backup."
        ) from exc
    end = _LEN.size + n
    try:
        return Bodies(data[_LEN.size:end].decode("utf-8"), data[end:].decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatabaseError(
            f"A stored message body is damaged ({exc}); restore the ledger from a backup."
        ) from exc
