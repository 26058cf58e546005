"""Tests of simclr_tf.data.pipeline on the bundled sample and mocked TFDS."""

import collections
import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from simclr_tf import config as config_lib
from simclr_tf.data import pipeline
from simclr_tf.data import sources

SAMPLE = config_lib.BUNDLED_DATASET


def _build(**kwargs):
  args = dict(dataset=SAMPLE, data_dir="", split="train", stage="pretrain",
              image_size=32, batch_size=16)
  args.update(kwargs)
  return pipeline.build_dataset(**args)


def _take(ds, n):
  return list(ds.take(n).as_numpy_iterator())


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _hashes(batches):
  return [hashlib.sha1(image.tobytes()).hexdigest()
          for batch in batches for image in batch["image"]]


def test_pretrain_elements():
  ds = _build(image_size=24, batch_size=8, use_blur=True)
  spec = ds.element_spec
  assert set(spec) == {"view1", "view2", "label"}
  assert spec["view1"].shape == (8, 24, 24, 3)
  assert spec["view1"].dtype == tf.float32 and spec["label"].dtype == tf.int32
  batch = _take(ds, 1)[0]
  for key in ("view1", "view2"):
    assert batch[key].min() >= 0 and batch[key].max() <= 1
  assert np.abs(batch["view1"] - batch["view2"]).mean() > 0.01
  assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


def test_finetune_epoch_covers_every_example_once():
  ds = _build(stage="finetune", batch_size=50)
  assert set(ds.element_spec) == {"image", "label"}
  assert ds.element_spec["image"].shape == (50, 32, 32, 3)
  batches = _take(ds, 20)  # Two epochs of 500.
  for epoch in (batches[:10], batches[10:]):
    labels = np.concatenate([b["label"] for b in epoch])
    assert collections.Counter(labels.tolist()) == {c: 50 for c in range(10)}
  first = np.concatenate([b["label"] for b in batches[:10]])
  second = np.concatenate([b["label"] for b in batches[10:]])
  assert (first != second).any()  # A new order each epoch.


def test_eval_elements_in_order():
  ds = _build(split="test", stage="eval", batch_size=64)
  assert ds.element_spec["image"].shape.as_list() == [None, 32, 32, 3]
  batches = _take(ds, 100)
  assert [len(b["label"]) for b in batches] == [64, 64, 64, 8]
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 20))
  again = _take(_build(split="test", stage="eval", batch_size=64,
                       cache=False), 100)
  _assert_batches_equal(batches, again)


def test_determinism_and_seed():
  a = _take(_build(seed=1), 2)
  _assert_batches_equal(a, _take(_build(seed=1), 2))
  b = _take(_build(seed=2), 2)
  assert np.abs(a[0]["view1"] - b[0]["view1"]).mean() > 0.01


@pytest.mark.parametrize("stage,batch,start", [("pretrain", 16, 3),
                                               ("finetune", 64, 7)])
def test_resume_gives_the_same_batches(stage, batch, start):
  fresh = _take(_build(stage=stage, batch_size=batch), start + 2)
  resumed = _take(_build(stage=stage, batch_size=batch, start_step=start), 2)
  _assert_batches_equal(fresh[start:], resumed)
  # Reading the files without the in-memory cache gives the same stream.
  uncached = _take(_build(stage=stage, batch_size=batch, start_step=start,
                          cache=False), 2)
  _assert_batches_equal(resumed, uncached)


def test_label_fraction(tmp_path):
  subset = tmp_path / "subset.txt"
  ds = _build(stage="finetune", batch_size=25, label_fraction=0.1, seed=3,
              subset_file=str(subset))
  lines = subset.read_text().splitlines()
  assert len(lines) == 50 and lines == sorted(lines)
  classes = collections.Counter(os.path.basename(os.path.dirname(p))
                                for p in lines)
  assert set(classes.values()) == {5} and len(classes) == 10
  labels = np.concatenate([b["label"] for b in _take(ds, 2)])
  assert collections.Counter(labels.tolist()) == {c: 5 for c in range(10)}
  # The same seed chooses the same examples; another seed others.
  again = tmp_path / "again.txt"
  _build(stage="finetune", label_fraction=0.1, seed=3, subset_file=str(again))
  assert again.read_text() == subset.read_text()
  other = tmp_path / "other.txt"
  _build(stage="finetune", label_fraction=0.1, seed=4, subset_file=str(other))
  assert other.read_text() != subset.read_text()
  # At least one example per class.
  tiny = sources.select_label_fraction(np.repeat(np.arange(3), 4), 0.01, 0)
  assert len(tiny) == 3


def test_sharding_gives_disjoint_halves(tmp_path):
  full = _hashes(_take(_build(split="test", stage="eval", batch_size=64), 10))
  halves = []
  for worker in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2,
                                         input_pipeline_id=worker,
                                         num_replicas_in_sync=2)
    halves.append(_hashes(_take(_build(
        split="test", stage="eval", batch_size=64, input_context=context),
                                10)))
  assert len(halves[0]) == len(halves[1]) == 100
  assert not set(halves[0]) & set(halves[1])
  assert sorted(halves[0] + halves[1]) == sorted(full)
  # The label subset is chosen before sharding: the same on every worker.
  files = []
  for worker in range(2):
    context = tf.distribute.InputContext(2, worker, 2)
    files.append(tmp_path / f"subset{worker}.txt")
    ds = _build(stage="finetune", batch_size=5, label_fraction=0.1,
                input_context=context, subset_file=str(files[-1]))
    labels = np.concatenate([b["label"] for b in _take(ds, 5)])
    assert len(labels) == 25
  assert files[0].read_text() == files[1].read_text()


def test_unlabeled_folder(tmp_path):
  rng = np.random.RandomState(0)
  for i in range(6):
    path = tmp_path / "train" / f"{i}.png"
    os.makedirs(path.parent, exist_ok=True)
    size = (10 + i, 20 - i)
    Image.fromarray(rng.randint(0, 256, size + (3,)).astype(np.uint8)).save(
        path)
  info = sources.get_info("image_folder", str(tmp_path), "train", "test")
  assert info.num_classes == 0 and info.num_train_examples == 6
  assert info.num_eval_examples == 0
  batch = _take(pipeline.build_dataset(
      dataset="image_folder", data_dir=str(tmp_path), split="train",
      stage="pretrain", image_size=16, batch_size=4), 1)[0]
  assert (batch["label"] == -1).all() and batch["view1"].shape == (4, 16, 16, 3)


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="stage="):
    _build(stage="train")
  with pytest.raises(ValueError, match="not prepared"):
    pipeline.build_dataset(dataset="cifar10", data_dir=str(tmp_path),
                           split="train", stage="eval", image_size=32,
                           batch_size=4)


def test_tfds_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=40):
    info = sources.get_info("cifar10", str(tmp_path), "train", "test")
    assert info.num_classes == 10 and len(info.class_names) == 10
    assert info.num_train_examples == 40 and info.num_eval_examples == 40
    common = dict(dataset="cifar10", data_dir=str(tmp_path), split="train",
                  image_size=32, batch_size=8)
    pre = pipeline.build_dataset(stage="pretrain", **common)
    batches = _take(pre, 7)
    assert batches[0]["view1"].shape == (8, 32, 32, 3)
    assert batches[0]["label"].dtype == np.int32
    resumed = _take(pipeline.build_dataset(stage="pretrain", start_step=5,
                                           **common), 2)
    _assert_batches_equal(batches[5:], resumed)
    # Streamed without a cache.
    streamed = pipeline.build_dataset(stage="finetune", cache=False, **common)
    a = _take(streamed, 6)
    assert a[0]["image"].shape == (8, 32, 32, 3)
    _assert_batches_equal(a[4:], _take(pipeline.build_dataset(
        stage="finetune", cache=False, start_step=4, **common), 2))
    # Label fraction: example indices, at least one per class.
    subset = tmp_path / "subset.txt"
    pipeline.build_dataset(stage="finetune", label_fraction=0.25,
                           subset_file=str(subset), **common)
    indices = [int(x) for x in subset.read_text().split()]
    assert indices == sorted(indices) and 10 <= len(indices) < 40
    ev = _take(pipeline.build_dataset(
        stage="eval", **dict(common, split="test")), 10)
    assert sum(len(b["label"]) for b in ev) == 40
    assert all(b["image"].min() >= 0 and b["image"].max() <= 1 for b in ev)
