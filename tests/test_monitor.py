"""Online kNN monitor and the collapse metric (simclr_tf.monitor)."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import simclr_tf
from simclr_tf import monitor


def test_collapse_std_is_zero_for_identical_projections():
  z = tf.tile(tf.constant([[0.3, -1.2, 2.0, 0.5]]), [64, 1])
  assert float(monitor.collapse_std(z)) < 1e-6


def test_collapse_std_is_one_over_sqrt_d_for_random_projections():
  d = 128
  z = tf.random.stateless_normal([4096, d], seed=[1, 2])
  value = float(monitor.collapse_std(z))
  assert abs(value - 1 / math.sqrt(d)) < 0.03 / math.sqrt(d), value


def _features_net(images, training=False):
  """The identity on 1x1x2 'images': their pixels are the features."""
  del training
  return {"final_avg_pool": tf.reshape(images, [tf.shape(images)[0], -1])}


def _dataset(points, labels):
  images = np.asarray(points, np.float32).reshape(-1, 1, 1, 2)
  return tf.data.Dataset.from_tensor_slices(
      {"image": images, "label": np.asarray(labels, np.int32)}).batch(2)


# Bank: class 0 at (1, 0); class 1 three times at (0.6, 0.8).
BANK = _dataset([[1, 0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8]], [0, 1, 1, 1])
# Queries with their labels; the last one is labelled 0 on purpose.
QUERIES = _dataset([[1, 0], [0, 1], [0.6, 0.8]], [0, 1, 0])


def test_knn_top1_equals_the_hand_computation():
  # Votes exp(cos / 0.1), all 4 bank points (k=200 > 4):
  # q=(1,0):   class 0: e^10 = 22026 > class 1: 3 e^6 = 1210 -> 0, right;
  # q=(0,1):   class 0: e^0 = 1      < class 1: 3 e^8        -> 1, right;
  # q=(.6,.8): class 0: e^6 = 403    < class 1: 3 e^10       -> 1, wrong.
  top1 = monitor.knn_top1(_features_net, BANK, QUERIES, num_classes=2,
                          max_train_examples=100)
  assert abs(top1 - 100 * 2 / 3) < 1e-9


def test_knn_train_sample_is_bounded():
  queries = _dataset([[1, 0], [0, 1], [0.6, 0.8]], [0, 1, 1])
  full = monitor.knn_top1(_features_net, BANK, queries, num_classes=2,
                          max_train_examples=100)
  # Only the first bank point (class 0) kept: every query is called 0.
  bounded = monitor.knn_top1(_features_net, BANK, queries, num_classes=2,
                             max_train_examples=1)
  assert abs(full - 100.0) < 1e-9 and abs(bounded - 100 / 3) < 1e-9


def test_monitor_evaluates_every_n_steps_and_logs(tmp_path):
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(optimizer="sgd", loss="mse")
  model.optimizer.build(model.trainable_variables)
  writer = tf.summary.create_file_writer(str(tmp_path))
  callback = monitor.KnnMonitor(_features_net, lambda: (BANK, QUERIES), 2,
                                every_steps=3, max_train_examples=10,
                                writer=writer)
  callback.set_model(model)
  for step in range(1, 8):
    model.optimizer.iterations.assign(step)
    logs = {}
    callback.on_train_batch_end(step, logs)
    assert ("knn_top1" in logs) == (step % 3 == 0), step
  assert [s for s, _ in callback.history] == [3, 6]
  assert tf.io.gfile.listdir(str(tmp_path))


@pytest.mark.slow
def test_pretraining_logs_knn_collapse_and_writes_the_projector(tmp_path):
  # pylint: disable=g-import-not-at-top
  from simclr_tf.config import Config
  cfg = Config(model_dir=str(tmp_path / "pre"), resnet_depth=18,
               width_multiplier=0.25, image_size=32, train_batch_size=100,
               eval_batch_size=100, train_epochs=2, log_images=False,
               proj_out_dim=16, cache_dataset=False, precision="float32",
               mode="train_then_eval", knn_eval_epochs=1,
               knn_max_examples=250)
  result = simclr_tf.run(cfg)
  tags = {}
  for path in tf.io.gfile.glob(str(tmp_path / "pre" / "train" / "events*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(event.step)
  assert tags["knn_top1"] == [5, 10]          # 500 images / 100 = 5 steps
  assert any("proj_std" in t for t in tags), sorted(tags)
  config = result["projector"]
  assert config.endswith("projector_config.pbtxt") and os.path.exists(config)
  rows = open(tmp_path / "pre" / "eval" / "metadata.tsv").read().split()
  sample = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                        "simclr_tf", "data", "cifar10_sample", "test")
  assert len(rows) == 200 and set(rows) == set(os.listdir(sample))
