"""Grid for the batch_norm family (filled in with the op)."""

SPECS = []
