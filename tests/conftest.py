"""Strict numerics for the whole suite: no implicit rank or dtype promotion, x64 only locally."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
