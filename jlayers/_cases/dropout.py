"""Grid for the dropout family (filled in with the op)."""

SPECS = []
