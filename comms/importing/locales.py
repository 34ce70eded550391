"""Which language codes a customer's ``locale`` may start with.

A typo such as ``xx`` or ``en-US`` written as ``us`` would otherwise send that customer the
fallback language without anyone noticing. Known: every ISO 639-1 code, plus the three-letter
languages the C library knows (``fil``, ``yue``...). A known language without templates is fine
here; ``comms templates check`` reports which locale it falls back to.
"""

from __future__ import annotations

import locale
import re
from functools import lru_cache

_ISO_639_1 = (
    "aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy "
    "da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht "
    "hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky "
    "la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny "
    "oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss "
    "st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo "
    "za zh zu"
)


@lru_cache(maxsize=1)
def _known() -> frozenset[str]:
    codes = set(_ISO_639_1.split())
    # The C library's locale names (values such as 'fil_PH.UTF-8') are canonical language codes.
    for name in locale.locale_alias.values():
        match = re.match(r"^([a-z]{3})_[A-Z]{2}", name)
        if match:
            codes.add(match.group(1))
    return frozenset(codes)


def is_known_language(code: str) -> bool:
    """True when ``code`` (the part of a locale before ``-``/``_``) is a known language."""
    return code.lower() in _known()
