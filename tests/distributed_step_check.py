r"""One training step on 1 device vs. mirrored over 2 logical CPUs.

Run by `tests/test_distribute.py` through `conftest.run_fresh` (a fresh
process, because the CPU must be split into logical devices before
TensorFlow initialises), or by hand:

  python tests/distributed_step_check.py --tasks=pretrain,finetune OUT.json

For each task it builds the real learner (`runner.build_learner`: SimCLR
ResNet-18 at 32 px, LARS, global BN) under `OneDeviceStrategy` and under
`MirroredStrategy` over 2 CPUs, gives both the same initial weights and the
same global batch, runs ONE step of `Learner.fit` and writes the largest
differences of the loss, of every updated weight and of every BN moving
statistic to OUT.json. The mirrored run feeds replica r the r-th half of
the global batch, the way `distribute_datasets_from_function` does with a
per-replica batch pipeline (consecutive batches go to consecutive local
replicas).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from simclr_tf import distribute  # noqa: E402

NUM_REPLICAS = 2
GLOBAL_BATCH = 16
# Base rate (x 16/256 by the linear scaling). At initialisation some
# gradients of this network are ill-conditioned in float32: a single-device
# step computed in float32 differs from the same step in float64 by up to
# ~2e-3 in the gradient of some batch-norm scales (the scale of a batch norm
# followed by ReLU, a convolution and another batch norm has a true gradient
# near 0 made of large cancelling terms), however it is distributed. With
# the paper's rate 1.0 that noise alone reaches ~1.3e-4 in the weights; at
# 0.25 it stays below ~4e-5, while the updates themselves stay > 1e-3.
LEARNING_RATE = 0.25


def _config(task: str):
  from simclr_tf.config import Config  # pylint: disable=g-import-not-at-top
  # No warm-up, so that the first step has a non-zero learning rate. The
  # rate is small enough that float32 noise stays well below the tolerance
  # (see LEARNING_RATE) and large enough that every update is far above it.
  return Config(train_mode=task, resnet_depth=18, image_size=32,
                train_batch_size=GLOBAL_BATCH, proj_out_dim=32,
                train_steps=10, warmup_epochs=0.0,
                learning_rate=LEARNING_RATE,
                global_bn=True, optimizer="lars", cache_dataset=False,
                log_images=False, model_dir="/tmp/unused",
                precision="float32")


def _global_batch(cfg):
  """The first global batch of the real input pipeline, as NumPy."""
  from simclr_tf.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = pipeline.build_dataset(
      dataset=cfg.dataset, data_dir=cfg.data_dir, split=cfg.train_split,
      stage=cfg.train_mode, image_size=cfg.image_size,
      batch_size=cfg.train_batch_size, seed=cfg.seed, cache=False)
  return {k: v.numpy() for k, v in next(iter(ds)).items()}


def _distributed_data(strategy, batch):
  """Replica r of the strategy gets the r-th per-replica slice of `batch`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def fn(ctx):
    per_replica = ctx.get_per_replica_batch_size(GLOBAL_BATCH)
    return tf.data.Dataset.from_tensors(batch).unbatch().batch(
        per_replica, drop_remainder=True).repeat()

  return strategy.distribute_datasets_from_function(fn)


def _snapshot(strategy, net):
  """{path: value} of every variable; checks replica copies agree."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  values, spread = {}, 0.0
  for v in net.variables:
    copies = [np.asarray(c) for c in
              strategy.experimental_local_results(v.value)]
    spread = max(spread, max(float(np.abs(c - copies[0]).max())
                             for c in copies))
    values[v.path] = copies[0]
  return values, spread


def _randomise_head(net) -> None:
  """A non-zero supervised head, so that fine-tuning moves the encoder.

  The head is zero-initialised (official code), which would leave every
  encoder gradient of the first fine-tuning step at zero.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for v in net.sup_head.weights:
    v.assign(0.1 * rng.standard_normal(v.shape).astype(np.float32))


def _one_step(strategy, cfg, plan, batch, initial):
  """Builds the learner, sets `initial` weights, fits one step."""
  import keras  # pylint: disable=g-import-not-at-top
  from simclr_tf import runner  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(cfg.seed)
  with strategy.scope():
    learner, _ = runner.build_learner(cfg, plan)
  if initial is not None:
    for v in learner.net.variables:
      v.assign(initial[v.path])
  elif cfg.train_mode == "finetune":
    _randomise_head(learner.net)
  before, _ = _snapshot(strategy, learner.net)
  history = learner.fit(_distributed_data(strategy, batch), epochs=1,
                        steps_per_epoch=1, verbose=0, shuffle=False)
  after, spread = _snapshot(strategy, learner.net)
  return {"loss": float(history.history["loss"][-1]), "before": before,
          "after": after, "replica_spread": spread}


def _max_diff(a: dict, b: dict, select) -> tuple[float, str]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  worst, where = 0.0, ""
  for path in a:
    if select(path):
      d = float(np.abs(a[path] - b[path]).max())
      if d > worst:
        worst, where = d, path
  return worst, where


def compare(task: str, mirrored_strategy) -> dict:
  """Runs the step under both strategies; returns the differences.

  Args:
    task: 'pretrain' or 'finetune'.
    mirrored_strategy: the MirroredStrategy to compare with. One per process:
      two strategies over the same devices share collective group and
      instance keys, and the second one's collectives clash with the
      first's ("Shape mismatch in the collective instance").
  Returns:
    A dict of the differences (see the module docstring).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from simclr_tf import runner  # pylint: disable=g-import-not-at-top
  cfg = _config(task)
  plan = runner.make_plan(cfg)
  batch = _global_batch(cfg)
  single = _one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), cfg, plan,
                     batch, None)
  mirrored = _one_step(mirrored_strategy, cfg, plan, batch, single["before"])
  is_stat = lambda p: "moving_" in p
  trained = [p for p in single["after"]
             if not is_stat(p) and np.abs(
                 single["after"][p] - single["before"][p]).max() > 0]
  weights, w_path = _max_diff(single["after"], mirrored["after"],
                              lambda p: not is_stat(p))
  stats, s_path = _max_diff(single["after"], mirrored["after"], is_stat)
  stats_moved, _ = _max_diff(single["after"], single["before"], is_stat)
  weights_moved, _ = _max_diff(single["after"], single["before"],
                               lambda p: not is_stat(p))
  worst_moved, _ = _max_diff(single["after"], single["before"],
                             lambda p: p == w_path)
  return {
      "task": task,
      "replicas": mirrored_strategy.num_replicas_in_sync,
      "loss_single": single["loss"], "loss_mirrored": mirrored["loss"],
      "loss_diff": abs(single["loss"] - mirrored["loss"]),
      "weights_max_diff": weights, "weights_worst": w_path,
      "weights_moved": weights_moved, "worst_moved": worst_moved,
      "bn_stats_max_diff": stats, "bn_stats_worst": s_path,
      "bn_stats_moved": stats_moved,
      "num_weights_changed": len(trained),
      "num_variables": len(single["after"]),
      "replica_spread": mirrored["replica_spread"],
  }


def check(tasks: str = "pretrain,finetune") -> list:
  """`compare` for each comma-separated task, on an already split CPU."""
  mirrored = distribute.make_strategy("mirrored", cpu_replicas=NUM_REPLICAS)
  return [compare(task, mirrored) for task in tasks.split(",")]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", help="JSON file to write the results to.")
  parser.add_argument("--tasks", default="pretrain,finetune")
  args = parser.parse_args()
  distribute.split_cpu(NUM_REPLICAS)   # before any TensorFlow op
  results = check(args.tasks)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
