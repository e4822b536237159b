"""Integrations with other libraries, kept out of the engine core."""
