"""Train a small CNN with jlayers on scikit-learn's handwritten digits (no download needed).

The 1797 8×8 grey images of ``sklearn.datasets.load_digits`` are scaled to [0, 1], laid out
NHWC as ``(N, 8, 8, 1)`` and split 80/20 (stratified, fixed seed). The model is

    conv 3×3 32 → batch norm → relu → max-pool 2    (8×8 → 4×4)
    conv 3×3 64 → batch norm → relu → max-pool 2    (4×4 → 2×2)
    flatten → dropout 0.3 → linear 10

trained with optax Adam on softmax cross-entropy. Before training, the model's gradients
through the hand-written rules are compared with autodiff of the reference twins on one batch,
in float64. It reaches ≥ 97 % held-out accuracy in well under two minutes on a 2-core CPU.

Run from the repository root (needs scikit-learn: ``pip install -e '.[examples]'``)::

    python examples/train_digits.py                    # manual backward passes
    python examples/train_digits.py --impl autodiff    # the same model through autodiff
    python examples/train_digits.py --epochs 20 --batch-size 64 --lr 3e-3 --seed 1
    python examples/train_digits.py --min-accuracy 0.97   # exit status 1 below 97 %
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlayers.layers import BatchNorm, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from jlayers.loss import softmax_cross_entropy, softmax_cross_entropy_reference
from jlayers.models import Sequential, max_grad_difference

CROSS_ENTROPY = {"manual": softmax_cross_entropy, "autodiff": softmax_cross_entropy_reference}


def load_data(seed: int = 0, test_fraction: float = 0.2):
  """``(x_train, y_train, x_test, y_test)``: float32 ``(N, 8, 8, 1)`` in [0, 1], int32 labels."""
  from sklearn.datasets import load_digits  # noqa: PLC0415
  from sklearn.model_selection import train_test_split  # noqa: PLC0415

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, stratify=y, random_state=seed)
  return x_train, y_train, x_test, y_test


def build_model(dropout: float = 0.3) -> Sequential:
  """The CNN. Convolutions feeding batch norm have no bias: the norm's offset replaces it."""
  def block(features):
    return [Conv2d(features, 3, padding="SAME", use_bias=False), BatchNorm(), ReLU(),
            MaxPool2d(2)]
  return Sequential([*block(32), *block(64), Flatten(), Dropout(dropout), Linear(10)])


def loss_fn(model, params, state, x, y, key, *, impl, train=True):
  """Mean cross-entropy of the batch and the model's new state."""
  logits, new_state = model.apply(params, state, x, key=key, train=train, impl=impl)
  return CROSS_ENTROPY[impl](logits, y), new_state


def make_train_step(model, optimizer, impl):
  """Jitted ``(params, state, opt_state, (x, y), key) -> (params, state, opt_state, loss)``.

  ``impl`` is closed over, so each implementation gets its own compiled step.
  """
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model, impl=impl), has_aux=True)

  @jax.jit
  def step(params, state, opt_state, batch, key):
    x, y = batch
    (loss, state), grads = grad_fn(params, state, x, y, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  return step


def make_eval(model, impl):
  """Jitted ``(params, state, x, y) -> number of correct predictions`` (eval mode)."""

  @jax.jit
  def correct(params, state, x, y):
    logits, _ = model.apply(params, state, x, train=False, impl=impl)
    return jnp.sum(jnp.argmax(logits, axis=-1).astype(y.dtype) == y)

  return correct


def accuracy(correct_fn, params, state, x, y) -> float:
  return int(correct_fn(params, state, x, y)) / len(y)


def gradient_check(model, params, state, x, y, key) -> float:
  """Worst relative difference, over all params, between the gradients of the training loss
  through the manual rules and through autodiff of the twins, in float64."""
  def scalar_loss(params, state, x, y, key, *, impl):
    return loss_fn(model, params, state, x, y, key, impl=impl)[0]

  with jax.enable_x64(True):
    to64 = functools.partial(jax.tree_util.tree_map, lambda a: jnp.asarray(a, jnp.float64))
    return max_grad_difference(scalar_loss, to64(params), to64(state), to64(x),
                               jnp.asarray(y), key)


def train(*, epochs=15, batch_size=32, seed=0, impl="manual", lr=3e-3, subset=None,
          check_grads=True, log=print):
  """Trains and evaluates; returns a dict of the final numbers.

  ``subset`` keeps only the first ``subset`` training examples (for quick smoke runs).
  """
  start = time.perf_counter()
  x_train, y_train, x_test, y_test = load_data(seed)
  if subset is not None:
    x_train, y_train = x_train[:subset], y_train[:subset]
  if batch_size > len(x_train):
    raise ValueError(f"batch size {batch_size} exceeds the {len(x_train)} training examples")
  log(f"digits: {len(x_train)} train, {len(x_test)} test, impl={impl}, "
      f"backend={jax.default_backend()}")

  model = build_model()
  key = jax.random.key(seed)
  params, state = model.init(jax.random.fold_in(key, 0), (batch_size, *x_train.shape[1:]))
  optimizer = optax.adam(lr)
  opt_state = optimizer.init(params)
  step = make_train_step(model, optimizer, impl)
  correct = make_eval(model, impl)

  grad_error = None
  if check_grads:
    t = time.perf_counter()
    grad_error = gradient_check(model, params, state, x_train[:batch_size],
                                y_train[:batch_size], jax.random.fold_in(key, 1))
    log(f"gradient check (float64, one batch): worst relative difference manual vs autodiff "
        f"{grad_error:.2e}  ({time.perf_counter() - t:.1f} s)")

  rng = np.random.default_rng(seed)
  steps_per_epoch = len(x_train) // batch_size  # the remainder is reshuffled in next epoch
  train_acc = test_acc = float("nan")
  for epoch in range(1, epochs + 1):
    t = time.perf_counter()
    order = rng.permutation(len(x_train))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, state, opt_state, loss = step(
          params, state, opt_state, (x_train[idx], y_train[idx]),
          jax.random.fold_in(key, epoch * steps_per_epoch + i + 2))
      losses.append(loss)
    mean_loss = float(jnp.mean(jnp.stack(losses)))
    train_acc = accuracy(correct, params, state, x_train, y_train)
    test_acc = accuracy(correct, params, state, x_test, y_test)
    log(f"epoch {epoch:3d}  loss {mean_loss:.4f}  train acc {100 * train_acc:6.2f}%  "
        f"test acc {100 * test_acc:6.2f}%  {time.perf_counter() - t:5.2f} s")

  wall = time.perf_counter() - start
  log(f"held-out test accuracy: {100 * test_acc:.2f}%  ({len(y_test)} images)")
  log(f"total wall time: {wall:.1f} s")
  return {"test_accuracy": test_acc, "train_accuracy": train_acc, "grad_error": grad_error,
          "wall_time": wall, "params": params, "state": state}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=15)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--impl", choices=("manual", "autodiff"), default="manual")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--min-accuracy", type=float, default=None,
                      help="exit with status 1 if the test accuracy (a fraction) is below this")
  parser.add_argument("--subset", type=int, default=None,
                      help="train on only the first SUBSET training images (quick smoke runs)")
  parser.add_argument("--no-grad-check", dest="check_grads", action="store_false",
                      help="skip the float64 manual-vs-autodiff gradient comparison")
  args = parser.parse_args(argv)
  if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or (
      args.subset is not None and args.subset < 1):
    parser.error("--epochs, --batch-size and --subset must be positive, --lr > 0")
  result = train(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, impl=args.impl,
                 lr=args.lr, subset=args.subset, check_grads=args.check_grads)
  if args.min_accuracy is not None and result["test_accuracy"] < args.min_accuracy:
    print(f"test accuracy {result['test_accuracy']:.4f} is below --min-accuracy "
          f"{args.min_accuracy}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
