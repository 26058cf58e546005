"""TensorBoard projector files (simclr_tf.projector)."""

import os

import numpy as np
import tensorflow as tf
from PIL import Image

from simclr_tf import projector


def test_sprite_places_thumbnails_row_major():
  images = np.zeros([5, 8, 8, 3], np.float32)
  for i in range(5):
    images[i] = i / 4.0
  grid = projector.sprite(images, thumbnail=4)
  assert grid.shape == (12, 12, 3)              # ceil(sqrt(5)) = 3 cells
  assert grid[0:4, 4:8].mean() == round(255 / 4)     # image 1: row 0, col 1
  assert grid[4:8, 0:4].mean() == round(3 * 255 / 4)  # image 3: row 1, col 0
  assert grid[8:, 4:].max() == 0                # empty cells stay black


def test_write_projector_files_tie_together(tmp_path):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(6, 16)).astype(np.float32)
  labels = np.array([0, 1, 2, 1, 0, -1])
  images = rng.uniform(size=(6, 32, 32, 3)).astype(np.float32)
  config = projector.write_projector(str(tmp_path), features, labels,
                                     ("cat", "dog", "ship"), images)
  text = open(config).read()
  assert 'tensor_name: "final_avg_pool"' in text and "sprite.png" in text
  assert open(tmp_path / "metadata.tsv").read().split("\n")[:6] == [
      "cat", "dog", "ship", "dog", "cat", "unlabeled"]
  ckpt = tf.train.latest_checkpoint(str(tmp_path))
  stored = tf.train.load_checkpoint(ckpt).get_tensor("final_avg_pool")
  np.testing.assert_array_equal(stored, features)
  assert Image.open(tmp_path / "sprite.png").size == (96, 96)


def test_write_projector_keeps_at_most_max_points(tmp_path):
  n = projector.MAX_POINTS + 7
  projector.write_projector(str(tmp_path), np.ones([n, 2], np.float32),
                            np.zeros([n], np.int64))
  lines = open(tmp_path / "metadata.tsv").read().splitlines()
  assert len(lines) == projector.MAX_POINTS
  assert not os.path.exists(tmp_path / "sprite.png")
