"""Hostile input, replayed: each row of issue 9's table with its fixed answer."""
