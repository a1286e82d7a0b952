"""Connectors that ship with the core, registered through entry points like any plugin."""
