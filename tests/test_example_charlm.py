"""Smoke test of ``examples/train_charlm.py``: the data, the evaluation, generation, and a
short run end to end (the full run's targets are in the README)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_example

TINY = {"context": 16, "features": 16, "layers": 1, "heads": 2}


@pytest.fixture(scope="module")
def example():
  return load_example("train_charlm")


def test_the_text_ships_with_python_and_splits_90_10(example):
  vocab, train, val = example.load_data()
  assert len(vocab) == 103 and len(train) + len(val) == len(example.load_text())
  assert len(train) == int(0.9 * (len(train) + len(val)))
  assert train.dtype == np.int32 and 0 <= train.min() and train.max() < 103
  assert vocab.decode(vocab.encode("def f(x):\n")) == "def f(x):\n"
  assert vocab.chars == sorted(vocab.chars)


def test_validation_loss_scores_every_character_once(example):
  """A model-free total (1 nat per scored character) over windows padded to the batch."""
  data = np.arange(50, dtype=np.int32)
  seen = []

  def total(params, ids, valid):
    seen.append(np.asarray(ids)[np.asarray(valid)])
    return float(np.sum(np.asarray(valid)) * (ids.shape[1] - 1))

  loss = example.validation_loss(total, None, data, 8, 4, example.jlayers.DataParallel(None))
  windows = np.concatenate(seen)
  assert loss == 1.0 and windows.shape == (6, 9)  # (50 - 1) // 8 windows of 9
  np.testing.assert_array_equal(windows[:, 1:].ravel(), np.arange(1, 49))


def test_a_short_run_end_to_end(example, capsys):
  with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 and float
    result = example.train(steps=6, batch_size=4, eval_every=3, sample_length=12,
                           prompt="def ", progress=False, **TINY)
  out = capsys.readouterr().out
  assert result["grad_error"] <= 1e-12 and result["key_bias_grad"] <= 1e-14
  assert re.search(r"gradient check \(float64, the whole model, one batch\): worst relative "
                   r"difference manual vs autodiff \S+", out)
  assert result["history"]["val_step"] == [3, 6]
  assert all(np.isfinite(result["history"]["val_loss"]))
  assert len(result["history"]["train_loss"]) == 6
  assert result["sample"].startswith("def ") and len(result["sample"]) == 16
  assert "validation loss:" in out and "nats/char" in out and "total wall time" in out


def test_packing_restarts_positions_and_masks_cross_document_targets(example):
  docs = np.array([[3, 3, 4, 4, 4, 5], [7, 7, 7, 7, 7, 7]])
  segments, positions, where = example.packing(np.zeros_like(docs), docs)
  np.testing.assert_array_equal(segments, [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(positions, [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(where, [[True, False, True, True, False], [True] * 5])
  sizes = [len(d) for d in example.load_documents()]
  ids = example.document_ids(sum(sizes))
  assert ids[0] == 0 and ids[-1] == len(sizes) - 1 and ids[sizes[0]] == 1


def test_autodiff_follows_the_same_trajectory(example):
  """Same seed, same batches: the manual rules and autodiff give the same losses (the Llama
  architecture on packed rows)."""
  runs = {}
  with jax.numpy_dtype_promotion("standard"):
    for impl in ("manual", "autodiff"):
      runs[impl] = example.train(steps=4, batch_size=4, eval_every=4, sample_length=0,
                                 check_grads=False, progress=False, impl=impl, log=lambda s: None,
                                 arch="llama", pack=True, **TINY)
  np.testing.assert_allclose(runs["manual"]["history"]["train_loss"],
                             runs["autodiff"]["history"]["train_loss"], rtol=1e-5)


def test_main_flags_plot_and_exit_status(example, tmp_path, capsys):
  path = tmp_path / "curves.png"
  argv = ["--steps", "3", "--batch-size", "2", "--eval-every", "3", "--sample-length", "0",
          "--no-grad-check", "--plot", str(path), "--max-val-loss", "0.01", "--remat",
          "--dtype", "bfloat16"] + [f"--{k}={v}" for k, v in TINY.items()]
  with jax.numpy_dtype_promotion("standard"):
    status = example.main(argv)
  assert status == 1  # nobody reaches 0.01 nats/char in 3 steps: the exit path
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "dtype=bfloat16, remat" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    example.main(["--prompt", "\u00e9t\u00e9"])


def test_generation_reads_the_last_context_characters(example):
  """Once the text is longer than the context, only the last characters enter the model, and
  sampling goes on in chunks of fresh caches; the compiled chunks' speed is reported."""
  vocab, train, _ = example.load_data()
  model = example.build_model(len(vocab), **TINY)
  params, _ = model.init(jax.random.key(0), (1, 16), input_dtype=jnp.int32)
  text, speed = example.generate(model, params, vocab, "x" * 40, 30, jax.random.key(1))
  assert len(text) == 70 and text.startswith("x" * 40)
  assert speed["tokens"] > 0 and speed["tokens_per_second"] > 0
