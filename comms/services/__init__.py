"""Services: one function per thing a command does, callable without the CLI."""
