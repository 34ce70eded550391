"""Transports: how a rendered message leaves comms (Graph, or .eml files in a folder)."""
