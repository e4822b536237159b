"""Executors start, stop and observe training processes; the database stays the source of truth."""
