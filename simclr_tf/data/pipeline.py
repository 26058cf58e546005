"""tf.data input pipelines for pretraining, fine-tuning, distillation, eval.

The examples come from a `simclr_tf.data.sources.Source`; this module
selects (label fraction), shards, decodes, augments and batches them.

Training streams are a deterministic function of `seed`: epoch e visits the
examples in a stateless random permutation seeded by (seed, e), and the
example at position k of the stream is augmented with a seed derived from
(seed, k), k = e * num_examples + position-in-epoch. Resuming at step s
starts the stream at k = s * batch_size by arithmetic, before anything is read
or decoded, and gives exactly the batches an uninterrupted run would have.

With `cache=True` the images this pipeline reads are decoded once, when the
dataset is built, into memory as uint8 (augmentation runs after the cache).
Data sets larger than `folder.FULL_CHECK_MAX_BYTES` of encoded images are not
cached (a warning says so).

A source without random access (TFDS) and without `cache` is streamed in
file order instead (examples are shuffled in a seeded buffer of
`SHUFFLE_BUFFER` examples), and resuming skips records before decoding them.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from simclr_tf import stages
from simclr_tf.data import augment
from simclr_tf.data import folder as folder_lib
from simclr_tf.data import sources

LOGGER = logging.getLogger("simclr_tf")

STAGES = tuple(stages.STAGES) + ("eval",)
# Shuffle buffer of streamed (uncached) TFDS data sets, in examples.
SHUFFLE_BUFFER = 10_000
# Salts that keep the random streams of one seed apart.
_PERMUTATION_SALT = 1
_AUGMENT_SALT = 2
_MAX_INT64 = np.iinfo(np.int64).max


def _write_subset_file(path: str, lines: list) -> None:
  """Writes the chosen examples, one a line."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))


def _shard(indices: np.ndarray, input_context) -> np.ndarray:
  """This input pipeline's share of the examples (every k-th one)."""
  if input_context is None or input_context.num_input_pipelines <= 1:
    return indices
  return indices[input_context.input_pipeline_id::
                 input_context.num_input_pipelines]


def _decode_rows(ds: tf.data.Dataset):
  """Decodes (encoded image, label) rows into a flat uint8 store.

  Args:
    ds: dataset of (encoded image, label) in the order to store.
  Returns:
    (pixels: uint8 [total], offsets: int64 [N], shapes: int32 [N, 3],
    labels: int32 [N]) as NumPy arrays.
  """

  def decode(contents, label):
    image = folder_lib.decode_image_uint8(contents)
    return tf.reshape(image, [-1]), tf.shape(image), label

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ragged_batch(1024).prefetch(2)
  pixels, shapes, labels = [], [], []
  for flat, shape, label in ds:
    flat = flat.flat_values if isinstance(flat, tf.RaggedTensor) else flat
    pixels.append(tf.reshape(flat, [-1]).numpy())
    shapes.append(shape.numpy())
    labels.append(label.numpy())
  if not shapes:
    return (np.zeros([0], np.uint8), np.zeros([0], np.int64),
            np.zeros([0, 3], np.int32), np.zeros([0], np.int32))
  shapes = np.concatenate(shapes).astype(np.int32)
  sizes = np.prod(shapes.astype(np.int64), axis=1)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  return (np.concatenate(pixels), offsets, shapes,
          np.concatenate(labels).astype(np.int32))


def _store_loader(store):
  """Loader position -> (uint8 image, label) from an in-memory store."""
  pixels, offsets, shapes, labels = (tf.constant(a) for a in store)

  def load(index):
    shape = shapes[index]
    size = tf.cast(tf.reduce_prod(shape), tf.int64)
    flat = tf.slice(pixels, offsets[index][tf.newaxis], size[tf.newaxis])
    return tf.reshape(flat, shape), labels[index]

  return load


def _augment_fn(stage: str, image_size: int, color_jitter_strength: float,
                use_blur: bool):
  """(image, label, seed) -> element dict of a training stage."""
  pairs = stages.get(stage).two_views

  def view(image, seed):
    return augment.preprocess_for_train(
        image, image_size, image_size, seed,
        color_jitter_strength=color_jitter_strength, crop=True, flip=True,
        color_distort=pairs, blur=use_blur and pairs)

  def apply(image, label, seed):
    if pairs:
      seeds = tf.random.experimental.stateless_split(seed, 2)
      return {"view1": view(image, seeds[0]), "view2": view(image, seeds[1]),
              "label": label}
    return {"image": view(image, seed), "label": label}

  return apply


def _eval_fn(image_size: int):
  def apply(image, label):
    return {"image": augment.preprocess_for_eval(image, image_size,
                                                 image_size),
            "label": label}
  return apply


def _random_access_train(load, num_examples: int, seed: int, start: int,
                         augment_fn, safe: bool) -> tf.data.Dataset:
  """Infinite stream of augmented examples read by index.

  Args:
    load: index -> (uint8 image, label).
    num_examples: number of indices.
    seed: stream seed.
    start: stream position to start at (examples already consumed).
    augment_fn: (image, label, seed) -> element.
    safe: drop examples whose file fails to decode.
  Returns:
    Unbatched dataset.
  """
  n = np.int64(num_examples)
  perm_seed = tf.constant([seed, _PERMUTATION_SALT], tf.int64)
  aug_seed = tf.constant([seed, _AUGMENT_SALT], tf.int64)

  def locate(k):
    epoch, position = k // n, k % n
    epoch_seed = tf.random.experimental.stateless_fold_in(perm_seed, epoch)
    index = tf.random.experimental.index_shuffle(position, epoch_seed, n - 1)
    return k, index

  def read(k, index):
    image, label = load(index)
    return k, image, label

  def transform(k, image, label):
    seed_k = tf.random.experimental.stateless_fold_in(aug_seed, k)
    return augment_fn(image, label, seed_k)

  ds = tf.data.Dataset.range(np.int64(start), _MAX_INT64).map(locate)
  ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if safe:
    ds = ds.ignore_errors(log_warning=True)
  return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)


def _streamed_train(rows: tf.data.Dataset, num_examples: int, seed: int,
                    start: int, augment_fn) -> tf.data.Dataset:
  """Infinite stream of encoded rows read in order (no random access)."""
  ds = rows.repeat().shuffle(min(SHUFFLE_BUFFER, max(1, num_examples)),
                             seed=seed, reshuffle_each_iteration=True)
  ds = ds.enumerate(start=np.int64(0)).skip(start)
  aug_seed = tf.constant([seed, _AUGMENT_SALT], tf.int64)

  def transform(k, row):
    contents, label = row
    image = folder_lib.decode_image_uint8(contents)
    seed_k = tf.random.experimental.stateless_fold_in(aug_seed, k)
    return augment_fn(image, label, seed_k)

  return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)


def _train_stream(source, local, cache, seed, start, augment_fn):
  """The unbatched, augmented training stream of the examples `local`."""
  if cache:
    load = _store_loader(_decode_rows(source.encoded(local)))
    return _random_access_train(load, len(local), seed, start, augment_fn,
                                safe=False)
  load = source.loader(local)
  if load is not None:
    return _random_access_train(load, len(local), seed, start, augment_fn,
                                safe=not source.fully_decoded)
  return _streamed_train(source.encoded(local), len(local), seed, start,
                         augment_fn)


def _eval_stream(source, local, cache, image_size):
  """The examples `local`, decoded and centre-cropped, once, in order."""
  ds = source.encoded(local).map(
      lambda contents, label: (folder_lib.decode_image_uint8(contents),
                               label),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if not source.fully_decoded:
    ds = ds.ignore_errors(log_warning=True)
  if cache:
    ds = ds.cache()
  return ds.map(_eval_fn(image_size), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)


def _select(source, label_fraction, seed, subset_file):
  """Indices of the examples kept by `label_fraction` (all at 1)."""
  if label_fraction >= 1.0:
    return np.arange(source.num_examples, dtype=np.int64)
  selected = sources.select_label_fraction(source.labels(), label_fraction,
                                           seed)
  LOGGER.info("label_fraction=%g keeps %d of %d examples of %s.",
              label_fraction, len(selected), source.num_examples, source.name)
  if subset_file:
    _write_subset_file(subset_file, source.describe(selected))
  return selected


def build_dataset(*, dataset: str, data_dir: str, split: str, stage: str,
                  image_size: int, batch_size: int, seed: int = 0,
                  color_jitter_strength: float = 0.5, use_blur: bool = False,
                  cache: bool = True, label_fraction: float = 1.0,
                  subset_file: Optional[str] = None, input_context=None,
                  strict: bool = False, start_step: int = 0,
                  drop_remainder: Optional[bool] = None) -> tf.data.Dataset:
  """Builds the input pipeline of one stage.

  Args:
    dataset: 'cifar10_sample', 'image_folder' or a TFDS name.
    data_dir: ROOT of the image folder, or TFDS data directory.
    split: split to read.
    stage: 'pretrain', 'finetune', 'distill' or 'eval'.
    image_size: output height and width.
    batch_size: per-replica batch size.
    seed: seed of the shuffling, the augmentations and the label subset.
    color_jitter_strength: colour jitter strength (pretrain).
    use_blur: random Gaussian blur (pretrain).
    cache: decode the images once and keep them in memory as uint8.
    label_fraction: keep this class-balanced fraction of the examples.
    subset_file: where to write the kept examples when label_fraction < 1.
    input_context: tf.distribute.InputContext; this pipeline reads every
      num_input_pipelines-th example, starting at input_pipeline_id.
    strict: raise on unusable image files instead of skipping them.
    start_step: training steps already done; the stream starts after the
      start_step * batch_size examples this pipeline has already given.
    drop_remainder: default True for training stages, False for eval.
  Returns:
    pretrain: {'view1', 'view2': float32 [B, S, S, 3] in [0, 1],
               'label': int32 [B]}, repeated forever;
    finetune / distill: {'image': float32 [B, S, S, 3], 'label': int32 [B]},
      crop and flip only, repeated forever;
    eval: {'image', 'label'} with the centre crop, one pass in order.
    Labels are -1 for unlabeled data.
  Raises:
    ValueError: bad stage, unknown dataset, missing split, no images.
  """
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r} is not allowed; use one of {STAGES}.")
  training = stage != "eval"
  if drop_remainder is None:
    drop_remainder = training
  source = sources.open_source(dataset, data_dir, split, strict)
  if cache and source.num_bytes > folder_lib.FULL_CHECK_MAX_BYTES:
    LOGGER.warning("%s has %.1f GB of images; too large to cache decoded "
                   "in memory, reading from disk instead.", source.name,
                   source.num_bytes / 1e9)
    cache = False
  cache = cache and source.fully_decoded
  selected = _select(source, label_fraction, seed, subset_file)
  local = _shard(selected, input_context)
  if not len(local):
    raise ValueError(
        f"{source.name} has {len(selected)} example(s), fewer than the "
        f"{input_context.num_input_pipelines} input pipelines; use fewer "
        "workers or more data.")
  if training:
    augment_fn = _augment_fn(stage, image_size, color_jitter_strength,
                             use_blur)
    ds = _train_stream(source, local, cache, seed,
                       int(start_step) * int(batch_size), augment_fn)
  else:
    ds = _eval_stream(source, local, cache, image_size)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  # Sharding is done above, by example, before anything is read.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
