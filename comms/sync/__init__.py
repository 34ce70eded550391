"""Stage sync: the ledger follows what Partner Center, GDAP and each customer's tenant show.

``clients`` (one per source), ``rules`` (the campaign's ``[sync]``, pure), ``service`` (read,
record evidence, move), ``observation`` (what templates may claim to have seen).
"""
