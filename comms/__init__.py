"""comms: staged, exactly-once customer emails for Microsoft CSP transitions."""

__version__ = "0.1.0"
