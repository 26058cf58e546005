"""TensorBoard projector view of a model's features (`final_avg_pool`).

`write_projector(log_dir, ...)` writes, into a TensorBoard run folder:
  embedding.ckpt.*            the [N, D] features, one tensor named `name`;
  metadata.tsv                the label (class name) of every row;
  sprite.png                  a grid of the N thumbnails, row-major;
  projector_config.pbtxt      what ties them together for the plugin.
`tensorboard --logdir` then shows the points in its Projector tab, coloured
by label, with each image on hover.
"""

from __future__ import annotations

import math
import os

import numpy as np
import tensorflow as tf
from PIL import Image

MAX_POINTS = 1000
THUMBNAIL = 32


def sprite(images: np.ndarray, thumbnail: int = THUMBNAIL) -> np.ndarray:
  """[rows * t, cols * t, 3] uint8 grid of `images` (row-major, black fill).

  Args:
    images: [N, H, W, 3] floats in [0, 1] or uint8.
    thumbnail: side of each cell in pixels.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  side = max(1, math.ceil(math.sqrt(len(images))))
  grid = np.zeros((side * thumbnail, side * thumbnail, 3), np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, side)
    cell = Image.fromarray(image).resize((thumbnail, thumbnail),
                                         Image.BILINEAR)
    grid[r * thumbnail:(r + 1) * thumbnail,
         c * thumbnail:(c + 1) * thumbnail] = np.asarray(cell)
  return grid


def write_projector(log_dir: str, features: np.ndarray, labels: np.ndarray,
                    class_names=(), images: np.ndarray = None,
                    name: str = "final_avg_pool") -> str:
  """Writes a projector view of up to MAX_POINTS rows; returns the config.

  Args:
    log_dir: a TensorBoard run folder (e.g. model_dir/eval).
    features: [N, D] features.
    labels: [N] int labels (-1: unknown).
    class_names: names of the label ids.
    images: optional [N, H, W, 3] images for the sprite.
    name: the tensor's name shown in the projector.
  """
  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins import projector
  n = min(len(features), MAX_POINTS)
  features = np.asarray(features[:n], np.float32)
  labels = np.asarray(labels[:n])
  os.makedirs(log_dir, exist_ok=True)
  names = list(class_names)
  with open(os.path.join(log_dir, "metadata.tsv"), "w",
            encoding="utf-8") as f:
    for label in labels:
      f.write((names[label] if 0 <= label < len(names) else
               str(int(label)) if label >= 0 else "unlabeled") + "\n")
  # A checkpoint holding just this tensor, under its own name (the name the
  # projector shows).
  prefix = os.path.join(log_dir, "embedding.ckpt")
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=[name],
                    shape_and_slices=[""], tensors=[tf.constant(features)])
  with open(os.path.join(log_dir, "checkpoint"), "w") as f:
    f.write('model_checkpoint_path: "embedding.ckpt"\n')
  config = projector.ProjectorConfig()
  embedding = config.embeddings.add()
  embedding.tensor_name = name
  embedding.metadata_path = "metadata.tsv"
  if images is not None:
    Image.fromarray(sprite(images[:n])).save(
        os.path.join(log_dir, "sprite.png"))
    embedding.sprite.image_path = "sprite.png"
    embedding.sprite.single_image_dim.extend([THUMBNAIL, THUMBNAIL])
  projector.visualize_embeddings(log_dir, config)
  return os.path.join(log_dir, "projector_config.pbtxt")


def write_run_projector(cfg, plan, net) -> str:
  """The projector view of up to MAX_POINTS eval images of a run.

  Written into model_dir/eval (with a one-line text summary, so that
  TensorBoard lists the folder as a run even without eval scalars).
  """
  # pylint: disable=g-import-not-at-top
  from simclr_tf import monitor
  info = plan.info
  if not info.num_eval_examples:
    return ""
  ds = monitor.strided_eval_dataset(cfg, cfg.eval_split,
                                    info.num_eval_examples, MAX_POINTS)
  features, labels, images = monitor.features(net, ds, MAX_POINTS,
                                              keep_images=MAX_POINTS)
  log_dir = os.path.join(cfg.model_dir, "eval")
  path = write_projector(log_dir, features, labels, info.class_names, images)
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default():
    tf.summary.text("projector", f"{len(features)} {cfg.eval_split} images, "
                    "final_avg_pool: see the Projector tab.", step=0)
  writer.flush()
  return path
