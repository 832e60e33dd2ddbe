"""Grid for the loss family (filled in with the op)."""

SPECS = []
