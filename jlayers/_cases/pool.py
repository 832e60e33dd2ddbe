"""Grid for the pool family (filled in with the op)."""

SPECS = []
