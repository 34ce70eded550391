"""The customer CSV, read and checked without touching the ledger (pure apart from file reads).

``reader`` opens the file and yields its rows, ``columns`` maps the header, ``fields`` has one
check per field, ``rows`` turns a row into a ``CustomerRow`` or its problems. The service
(``comms.services.importer``) writes the valid rows with ``comms.store.customer_upsert``.
"""
