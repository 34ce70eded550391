"""Fixtures that start the local Graph sandbox (filled in with the sandbox)."""
