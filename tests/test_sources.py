"""Tests of simclr_tf.data.sources: every kind has the same interface."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from simclr_tf import config as config_lib
from simclr_tf.data import folder as folder_lib
from simclr_tf.data import sources

SAMPLE = config_lib.BUNDLED_DATASET


def test_bundled_sample_info():
  info = sources.get_info(SAMPLE, "/ignored", "train", "test")
  assert info.num_classes == 10 and len(info.class_names) == 10
  assert info.class_names[0] == "airplane" and info.class_names[-1] == "truck"
  assert info.num_train_examples == 500 and info.num_eval_examples == 200
  info = sources.get_info(SAMPLE, "", "train", "nosplit", label_fraction=0.1)
  assert info.num_train_examples == 50 and info.num_eval_examples == 0


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="is unknown"):
    sources.get_info("no_such_dataset_xyz", "", "train", "test")
  with pytest.raises(ValueError, match="needs --data_dir"):
    sources.get_info("image_folder", "", "train", "test")
  with pytest.raises(ValueError, match="has no 'train' folder"):
    sources.get_info("image_folder", str(tmp_path), "train", "test")
  with pytest.raises(ValueError, match="does not exist"):
    sources.get_info("image_folder", str(tmp_path / "x"), "train", "test")


def _check_interface(source, indices):
  """What the pipeline relies on, for any kind of source."""
  labels = source.labels()
  assert labels.dtype == np.int32 and len(labels) == source.num_examples
  rows = list(source.encoded(indices).as_numpy_iterator())
  assert [int(label) for _, label in rows] == labels[indices].tolist()
  images = [folder_lib.decode_image_uint8(contents).numpy()
            for contents, _ in rows]
  assert all(i.ndim == 3 and i.shape[-1] == 3 for i in images)
  load = source.loader(indices)
  if load is not None:    # random access gives the same examples
    for position, (image, label) in enumerate(zip(images, labels[indices])):
      got_image, got_label = load(position)
      np.testing.assert_array_equal(got_image.numpy(), image)
      assert int(got_label) == label
  lines = source.describe(indices)
  assert len(set(lines)) == len(indices)
  return lines


def test_folder_source_interface():
  source = sources.open_source(SAMPLE, "", "test")
  assert isinstance(source, sources.FolderSource)
  assert source.name == f"{SAMPLE}/test" and source.num_examples == 200
  assert source.num_classes == 10 and source.class_names[0] == "airplane"
  lines = _check_interface(source, np.array([199, 3, 50]))
  assert lines == sorted(source.paths[i] for i in (3, 50, 199))


def test_tfds_source_interface(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    source = sources.open_source("cifar10", str(tmp_path), "train")
    assert isinstance(source, sources.TfdsSource)
    assert source.num_examples == 12 and source.num_classes == 10
    assert source.loader(np.arange(3)) is None    # read in order only
    assert _check_interface(source, np.array([0, 5, 11])) == ["0", "5", "11"]
    _check_interface(source, np.arange(12))
