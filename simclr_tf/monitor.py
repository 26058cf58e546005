"""Watching pretraining while it runs: online kNN accuracy and collapse.

* `KnnMonitor`: every N epochs, the weighted kNN top-1 (k=200, cosine,
  votes exp(s / 0.1), as in the self-supervised literature; `simclr_tf.knn`)
  of the encoder features (`final_avg_pool`, inference mode) of the eval
  split against those of at most `max_examples` training images. Logged to
  TensorBoard (`knn_top1`) and the log line. It rises while the
  representation gets better, long before a linear probe would say so.
* `collapse_std`: the standard deviation of the l2-normalised projections
  per dimension, averaged over dimensions. About 1/sqrt(d) for healthy,
  spread-out projections; 0 when every image maps to the same point
  (representation collapse; Jing et al. 2022, arXiv 2110.09348, use the
  same statistic).
"""

from __future__ import annotations

import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf

from simclr_tf import knn

log = logging.getLogger("simclr_tf")

KNN_K = 200
KNN_TEMPERATURE = 0.1


def collapse_std(projections: tf.Tensor) -> tf.Tensor:
  """Mean over dimensions of the std over the batch of l2-normalised rows.

  Args:
    projections: [B, d] projections (B >= 2).
  Returns:
    A float32 scalar in [0, 1/sqrt(d)] for unit rows spread evenly; 0 for
    identical rows.
  """
  z = tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=-1)
  return tf.reduce_mean(tf.math.reduce_std(z, axis=0))


def features(net, dataset, max_examples: int = 0, keep_images: int = 0):
  """(features [N, D], labels [N], images [<=keep_images, H, W, 3]).

  Args:
    net: a SimCLR model.
    dataset: batches of {'image', 'label'} (evaluation preprocessing).
    max_examples: stop after this many examples (0: all).
    keep_images: also return the first images (for a projector sprite).
  """
  feats, labels, images = [], [], []
  count = 0
  for batch in dataset:
    out = net(batch["image"], training=False)["final_avg_pool"]
    feats.append(np.asarray(out, np.float32))
    labels.append(np.asarray(batch["label"]))
    if count < keep_images:
      images.append(np.asarray(batch["image"][:keep_images - count]))
    count += len(feats[-1])
    if max_examples and count >= max_examples:
      break
  if not feats:
    return np.zeros([0, 0], np.float32), np.zeros([0], np.int64), None
  n = max_examples or count
  return (np.concatenate(feats)[:n], np.concatenate(labels)[:n],
          np.concatenate(images) if images else None)


def knn_top1(net, train_dataset, eval_dataset, num_classes: int,
             max_train_examples: int, k: int = KNN_K,
             temperature: float = KNN_TEMPERATURE) -> float:
  """Weighted-kNN top-1 (%) of the eval split against the train sample."""
  bank, bank_labels, _ = features(net, train_dataset, max_train_examples)
  queries, query_labels, _ = features(net, eval_dataset)
  keep = query_labels >= 0
  return 100.0 * knn.knn_accuracy(bank, bank_labels, queries[keep],
                                  query_labels[keep], num_classes, k=k,
                                  temperature=temperature)


class KnnMonitor(keras.callbacks.Callback):
  """Logs the kNN top-1 of `net`'s features every `every_steps` steps.

  Step-based (the global step, `model.optimizer.iterations`), so a resumed
  run and any `steps_per_execution` evaluate at the same points.

  Args:
    net: the SimCLR network being trained.
    make_datasets: () -> (train sample dataset, eval dataset), both with the
      evaluation preprocessing; called once, at the first evaluation.
    num_classes: classes of the labels.
    every_steps: evaluation period in steps (an epoch's worth times
      --knn_eval_epochs).
    max_train_examples: size of the training sample (the kNN memory bank).
    writer: a tf.summary writer (None: log only).
  """

  def __init__(self, net, make_datasets, num_classes: int, every_steps: int,
               max_train_examples: int, writer=None):
    super().__init__()
    self.net = net
    self.make_datasets = make_datasets
    self.num_classes = num_classes
    self.every_steps = max(1, int(every_steps))
    self.max_train_examples = max_train_examples
    self.writer = writer
    self.datasets = None
    self.history = []          # (step, top1)
    self._last = None

  def evaluate(self, step: int) -> float:
    if self.datasets is None:
      self.datasets = self.make_datasets()
    start = time.time()
    top1 = knn_top1(self.net, *self.datasets, self.num_classes,
                    self.max_train_examples)
    self.history.append((step, top1))
    log.info("step %d: kNN top-1 %.2f%% (k=%d, up to %d train images, "
             "%.1f s)", step, top1, KNN_K, self.max_train_examples,
             time.time() - start)
    if self.writer is not None:
      with self.writer.as_default():
        tf.summary.scalar("knn_top1", top1, step=step)
      self.writer.flush()
    return top1

  def on_train_batch_end(self, batch, logs=None):
    step = int(self.model.optimizer.iterations.numpy())
    if self._last is None:
      self._last = step - 1
    if step // self.every_steps > self._last // self.every_steps:
      top1 = self.evaluate(step)
      if logs is not None:
        logs["knn_top1"] = top1
    self._last = step


# === Wiring into a run ========================================================

DEFAULT_KNN_EVAL_EPOCHS = 10      # what --knn_eval_epochs=-1 (auto) means


def strided_eval_dataset(cfg, split: str, num_examples: int,
                         max_examples: int):
  """At most `max_examples` of `split`, every s-th one, in eval form.

  Image folders list examples by class, so a prefix would hold the first
  classes only; every s-th example keeps all classes in proportion, and only
  those are read and decoded (the pipeline shards at the source).
  """
  # pylint: disable=g-import-not-at-top
  from simclr_tf.data import pipeline
  stride = max(1, -(-num_examples // max_examples))
  context = tf.distribute.InputContext(num_input_pipelines=stride,
                                       input_pipeline_id=0,
                                       num_replicas_in_sync=1)
  return pipeline.build_dataset(
      dataset=cfg.dataset, data_dir=cfg.data_dir, split=split, stage="eval",
      image_size=cfg.image_size, batch_size=cfg.eval_batch_size, cache=False,
      input_context=context, strict=cfg.strict_data)


def knn_callbacks(cfg, plan, net, chief: bool) -> list:
  """[KnnMonitor] when the stage and data allow it, else [].

  On by default (--knn_eval_epochs=-1: every DEFAULT_KNN_EVAL_EPOCHS
  epochs) when the data has labels and an eval split; on the chief only.
  """
  # pylint: disable=g-import-not-at-top
  from simclr_tf import stages
  epochs = (DEFAULT_KNN_EVAL_EPOCHS if cfg.knn_eval_epochs < 0
            else cfg.knn_eval_epochs)
  info = plan.info
  if (not chief or not epochs or not stages.get(cfg.train_mode).monitor or
      not info.num_classes or not info.num_eval_examples):
    return []
  bank_size = min(cfg.knn_max_examples, info.num_train_examples)

  def make_datasets():
    return (strided_eval_dataset(cfg, cfg.train_split,
                                 info.num_train_examples, bank_size),
            strided_eval_dataset(cfg, cfg.eval_split, info.num_eval_examples,
                                 cfg.knn_max_examples))

  writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir, "train"))
  return [KnnMonitor(net, make_datasets, info.num_classes,
                     every_steps=epochs * plan.steps_per_epoch,
                     max_train_examples=bank_size, writer=writer)]
