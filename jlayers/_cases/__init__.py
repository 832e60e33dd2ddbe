"""Configuration grids of the registry, one module per op family (see ``jlayers.registry``)."""
