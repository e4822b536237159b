"""Business logic without HTTP: each function takes a Session and plain values."""
