"""Autodiff twins of every op: same signatures and checks, plain jnp forwards, no custom rules.

``jax.grad`` of these is what the manual rules in :mod:`jlayers` are proven against.
``jlayers.reference.<name>`` is the twin of ``jlayers.<name>``, read from the op's declaration
(``<name>_op.reference``), so this module lists nothing by hand.

Examples:
  >>> import jax, jlayers
  >>> float(jax.grad(jlayers.reference.relu)(2.0))
  1.0
"""

from jlayers import _ops


def __getattr__(name: str):
  ops = _ops.builtin_ops()
  if name == "__all__":
    return sorted(ops)
  if name in ops:
    return ops[name].reference
  raise AttributeError(f"module 'jlayers.reference' has no twin {name!r} (the ops: "
                       f"{sorted(ops)})")


def __dir__():
  return sorted(_ops.builtin_ops())
