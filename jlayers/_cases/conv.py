"""Grid for the conv family (filled in with the op)."""

SPECS = []
