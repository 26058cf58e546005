"""tf.data input pipelines for pretraining, fine-tuning, distillation, eval.

Datasets:
  'cifar10_sample'  the CIFAR-10 sample bundled in this package (an image
                    folder; `data_dir` is ignored).
  'image_folder'    an image folder ROOT/<split>/<class>/<image> or
                    ROOT/<split>/<image>, with ROOT = `data_dir`.
  any TFDS name     e.g. 'cifar10', 'imagenet2012',
                    'imagenet2012_subset/1pct', read from data prepared in
                    `data_dir` (nothing is downloaded).

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

A TFDS data set without `cache` is streamed in file order instead (examples
are shuffled in a seeded buffer of `SHUFFLE_BUFFER` examples), and resuming
skips records before decoding them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf.data import augment
from simclr_tf.data import folder as folder_lib

LOGGER = logging.getLogger("simclr_tf")

STAGES = ("pretrain", "finetune", "distill", "eval")
TRAIN_STAGES = ("pretrain", "finetune", "distill")
# Shuffle buffer of streamed (uncached) TFDS data sets, in examples.
SHUFFLE_BUFFER = 10_000
# Salts that keep the random streams of one seed apart.
_PERMUTATION_SALT = 1
_AUGMENT_SALT = 2
_MAX_INT64 = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a data set.

  Attributes:
    name: the dataset name as given.
    num_classes: number of classes; 0 when unlabeled.
    class_names: class names, in label-id order.
    num_train_examples: examples of the train split (after `label_fraction`
      when get_info was given one).
    num_eval_examples: examples of the eval split; 0 if it does not exist.
  """

  name: str
  num_classes: int
  class_names: tuple
  num_train_examples: int
  num_eval_examples: int


@dataclasses.dataclass(frozen=True)
class _Source:
  """The examples of one split, before selection and sharding.

  Attributes:
    kind: 'files' (paths on disk) or 'tfds'.
    num_classes: number of classes, 0 when unlabeled.
    class_names: class names.
    labels: int32 label per example (-1 when unlabeled), or None for a TFDS
      split whose labels were not read (only its size is known).
    num_examples: number of examples.
    paths: file paths ('files').
    fully_decoded: every file was decoded once when listed ('files').
    num_bytes: approximate size of the encoded images (0 if unknown).
    builder: the TFDS builder ('tfds').
    split: the TFDS split name ('tfds').
  """

  kind: str
  num_classes: int
  class_names: tuple
  labels: Optional[np.ndarray]
  num_examples: int
  paths: tuple = ()
  fully_decoded: bool = True
  num_bytes: int = 0
  builder: object = None
  split: str = ""


def bundled_sample_dir() -> str:
  """Folder of the CIFAR-10 sample shipped with the package."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "cifar10_sample")


def _folder_root(dataset: str, data_dir: str) -> Optional[str]:
  """ROOT of an image-folder dataset, or None for a TFDS name."""
  if dataset == config_lib.BUNDLED_DATASET:
    return bundled_sample_dir()
  if dataset == config_lib.IMAGE_FOLDER:
    if not data_dir:
      raise ValueError(
          f"--dataset={config_lib.IMAGE_FOLDER} needs --data_dir=ROOT with "
          f"{folder_lib.LAYOUT}.")
    if not os.path.isdir(data_dir):
      raise ValueError(f"--data_dir={data_dir} does not exist; expected "
                       f"{folder_lib.LAYOUT}.")
    return data_dir
  return None


def _tfds_builder(dataset: str, data_dir: str):
  """The TFDS builder of a dataset name, with a one-line error if unknown."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(dataset, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"--dataset={dataset!r} is unknown; use {config_lib.BUNDLED_DATASET}"
        f", {config_lib.IMAGE_FOLDER} (with --data_dir=ROOT) or the name of a "
        "TFDS dataset prepared in --data_dir (e.g. cifar10, imagenet2012)."
    ) from None


def _tfds_read(builder, split: str, data_dir: str, skip_images: bool):
  """The split as a tf.data.Dataset in file order, images left encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if "image" not in builder.info.features:
    raise ValueError(f"--dataset={builder.name} has no 'image' feature; only "
                     "image classification datasets are supported.")
  decoders = {"image": tfds.decode.SkipDecoding()}
  read_config = tfds.ReadConfig(interleave_cycle_length=1,
                                try_autocache=False)
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders=decoders, read_config=read_config)
  except AssertionError:
    raise ValueError(
        f"--dataset={builder.name} is not prepared in --data_dir={data_dir}; "
        "prepare it there first (tfds build, or download_and_prepare), or "
        "use --dataset=image_folder.") from None
  except (KeyError, ValueError) as e:
    raise ValueError(f"--dataset={builder.name} has no split {split!r} "
                     f"({e}); available: {list(builder.info.splits)}.") from None
  has_label = "label" in builder.info.features

  def select(example):
    label = (tf.cast(example["label"], tf.int32) if has_label
             else tf.constant(-1, tf.int32))
    if skip_images:
      return label
    return example["image"], label

  return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_split_exists(builder, split: str) -> bool:
  """Whether a TFDS split exists (True when the split list is unknown)."""
  known = list(builder.info.splits)
  return not known or split.split("[")[0] in known


def _tfds_num_examples(builder, split: str, data_dir: str) -> int:
  """Examples of a TFDS split, from its metadata or by counting."""
  if list(builder.info.splits):
    return int(builder.info.splits[split].num_examples)
  ds = _tfds_read(builder, split, data_dir, skip_images=True)
  count = int(ds.cardinality())
  if count >= 0:
    return count
  return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _tfds_labels(builder, split: str, data_dir: str) -> np.ndarray:
  """The label of every example of a TFDS split, in file order."""
  ds = _tfds_read(builder, split, data_dir, skip_images=True).batch(65536)
  parts = [labels for labels in ds.as_numpy_iterator()]
  return (np.concatenate(parts).astype(np.int32) if parts
          else np.zeros([0], np.int32))


def _open_source(dataset: str, data_dir: str, split: str, strict: bool,
                 need_labels: bool) -> _Source:
  """Opens one split of a dataset.

  Args:
    dataset: dataset name.
    data_dir: ROOT of an image folder or the TFDS data directory.
    split: split name.
    strict: raise on unusable image files.
    need_labels: read the labels of a TFDS split (one pass over its records).
  Returns:
    A _Source.
  Raises:
    ValueError: unknown dataset, missing folder or split, no usable image.
  """
  root = _folder_root(dataset, data_dir)
  if root is not None:
    listing = folder_lib.list_image_folder(root, split, strict=strict)
    return _Source(
        kind="files", num_classes=len(listing.class_names),
        class_names=listing.class_names,
        labels=np.asarray(listing.labels, np.int32),
        num_examples=listing.num_examples, paths=listing.paths,
        fully_decoded=listing.fully_decoded, num_bytes=listing.num_bytes)
  builder = _tfds_builder(dataset, data_dir)
  if not _tfds_split_exists(builder, split):
    raise ValueError(f"--dataset={dataset} has no split {split!r}; use one "
                     f"of {list(builder.info.splits)}.")
  features = builder.info.features
  label_feature = features["label"] if "label" in features else None
  names = tuple(getattr(label_feature, "names", None) or ())
  num_classes = int(getattr(label_feature, "num_classes", 0) or 0)
  labels = _tfds_labels(builder, split, data_dir) if need_labels else None
  num_examples = (len(labels) if labels is not None
                  else _tfds_num_examples(builder, split, data_dir))
  num_bytes = int(getattr(builder.info, "dataset_size", 0) or 0)
  return _Source(kind="tfds", num_classes=num_classes, class_names=names,
                 labels=labels, num_examples=num_examples,
                 num_bytes=num_bytes, builder=builder, split=split)


def select_label_fraction(labels: np.ndarray, fraction: float,
                          seed: int) -> np.ndarray:
  """A class-balanced random subset of the examples.

  Args:
    labels: int label per example (-1: unlabeled, treated as one class).
    fraction: fraction of each class to keep, in (0, 1].
    seed: selects the subset; the same seed gives the same subset.
  Returns:
    Sorted int64 indices of the kept examples: round(fraction * n_c), at
    least 1, of each class c with n_c examples.
  """
  labels = np.asarray(labels)
  if fraction >= 1.0:
    return np.arange(len(labels), dtype=np.int64)
  kept = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = max(1, int(round(fraction * len(members))))
    # RandomState's stream is frozen by NumPy: stable across versions.
    rng = np.random.RandomState([seed & 0xFFFFFFFF, int(label) & 0xFFFFFFFF])
    kept.append(rng.permutation(members)[:count])
  return np.sort(np.concatenate(kept)).astype(np.int64)


def get_info(dataset: str, data_dir: str, train_split: str, eval_split: str,
             strict: bool = False, label_fraction: float = 1.0,
             seed: int = 0) -> DatasetInfo:
  """Describes a dataset.

  Args:
    dataset: 'cifar10_sample', 'image_folder' or a TFDS name.
    data_dir: ROOT of the image folder, or TFDS data directory.
    train_split: name of the training split (must exist).
    eval_split: name of the eval split (0 examples if it does not exist).
    strict: raise on unusable image files.
    label_fraction: count only the class-balanced fraction of the training
      examples that `build_dataset` keeps with the same fraction and seed.
    seed: the seed of that selection.
  Returns:
    A DatasetInfo.
  Raises:
    ValueError: unknown dataset, missing folder or train split, no images.
  """
  train = _open_source(dataset, data_dir, train_split, strict,
                       need_labels=label_fraction < 1.0)
  num_train = train.num_examples
  if label_fraction < 1.0:
    num_train = len(select_label_fraction(train.labels, label_fraction, seed))
  num_eval = 0
  root = _folder_root(dataset, data_dir)
  if root is not None:
    if folder_lib.split_exists(root, eval_split):
      num_eval = _open_source(dataset, data_dir, eval_split, strict,
                              need_labels=False).num_examples
  elif _tfds_split_exists(train.builder, eval_split):
    try:
      num_eval = _tfds_num_examples(train.builder, eval_split, data_dir)
    except ValueError:
      num_eval = 0
  return DatasetInfo(name=dataset, num_classes=train.num_classes,
                     class_names=tuple(train.class_names),
                     num_train_examples=num_train,
                     num_eval_examples=num_eval)


def _write_subset_file(path: str, source: _Source,
                       selected: np.ndarray) -> None:
  """Writes the chosen examples, one path or TFDS index a line, sorted."""
  if source.kind == "files":
    lines = sorted(source.paths[i] for i in selected)
  else:
    lines = [str(i) for i in sorted(selected)]
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


def _build_store(source: _Source, indices: np.ndarray, data_dir: str):
  """Decodes the examples `indices` of a source into memory (see above)."""
  if source.kind == "files":
    paths = tf.constant([source.paths[i] for i in indices]) if len(
        indices) else tf.zeros([0], tf.string)
    labels = tf.constant(source.labels[indices], tf.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        lambda p, l: (tf.io.read_file(p), l),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    keep = np.zeros([source.num_examples], bool)
    keep[indices] = True
    keep = tf.constant(keep)
    ds = _tfds_read(source.builder, source.split, data_dir, False).enumerate()
    ds = ds.filter(lambda i, row: keep[i]).map(lambda i, row: row)
  return _decode_rows(ds)


def _store_loader(store):
  """Loader index -> (uint8 image, label) from an in-memory store."""
  pixels, offsets, shapes, labels = (tf.constant(a) for a in store)

  def load(index):
    shape = shapes[index]
    size = tf.cast(tf.reduce_prod(shape), tf.int64)
    flat = tf.slice(pixels, offsets[index][tf.newaxis], size[tf.newaxis])
    return tf.reshape(flat, shape), labels[index]

  return load


def _file_loader(source: _Source, indices: np.ndarray):
  """Loader index -> (uint8 image, label) that reads and decodes a file."""
  paths = tf.constant([source.paths[i] for i in indices]) if len(
      indices) else tf.zeros([0], tf.string)
  labels = tf.constant(source.labels[indices], tf.int32)

  def load(index):
    image = folder_lib.decode_image_uint8(tf.io.read_file(paths[index]))
    return image, labels[index]

  return load


def _augment_fn(stage: str, image_size: int, color_jitter_strength: float,
                use_blur: bool):
  """(image, label, seed) -> element dict of a training stage."""

  def view(image, seed):
    return augment.preprocess_for_train(
        image, image_size, image_size, seed,
        color_jitter_strength=color_jitter_strength, crop=True, flip=True,
        color_distort=stage == "pretrain", blur=use_blur and
        stage == "pretrain")

  def apply(image, label, seed):
    if stage == "pretrain":
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


def _tfds_stream_train(source: _Source, indices: np.ndarray, data_dir: str,
                       seed: int, start: int, augment_fn) -> tf.data.Dataset:
  """Infinite stream of a TFDS split read in file order (no cache)."""
  ds = _tfds_read(source.builder, source.split, data_dir, False).enumerate()
  if len(indices) < source.num_examples:
    keep = np.zeros([source.num_examples], bool)
    keep[indices] = True
    keep = tf.constant(keep)
    ds = ds.filter(lambda i, row: keep[i])
  ds = ds.repeat().shuffle(min(SHUFFLE_BUFFER, max(1, len(indices))),
                           seed=seed, reshuffle_each_iteration=True)
  ds = ds.enumerate(start=np.int64(0)).skip(start)
  aug_seed = tf.constant([seed, _AUGMENT_SALT], tf.int64)

  def transform(k, indexed_row):
    _, (contents, label) = indexed_row
    image = folder_lib.decode_image_uint8(contents)
    seed_k = tf.random.experimental.stateless_fold_in(aug_seed, k)
    return augment_fn(image, label, seed_k)

  return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)


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
  training = stage in TRAIN_STAGES
  if drop_remainder is None:
    drop_remainder = training
  source = _open_source(dataset, data_dir, split, strict,
                        need_labels=label_fraction < 1.0)
  if cache and source.num_bytes > folder_lib.FULL_CHECK_MAX_BYTES:
    LOGGER.warning("%s/%s has %.1f GB of images; too large to cache decoded "
                   "in memory, reading from disk instead.", dataset, split,
                   source.num_bytes / 1e9)
    cache = False
  if source.kind == "files" and not source.fully_decoded:
    cache = False
  selected = np.arange(source.num_examples, dtype=np.int64)
  if label_fraction < 1.0:
    if source.labels is None:
      source = dataclasses.replace(
          source, labels=_tfds_labels(source.builder, split, data_dir))
    selected = select_label_fraction(source.labels, label_fraction, seed)
    LOGGER.info("label_fraction=%g keeps %d of %d examples of %s/%s.",
                label_fraction, len(selected), source.num_examples, dataset,
                split)
    if subset_file:
      _write_subset_file(subset_file, source, selected)
  local = _shard(selected, input_context)
  if not len(local):
    raise ValueError(
        f"{dataset}/{split} has {len(selected)} example(s), fewer than the "
        f"{input_context.num_input_pipelines} input pipelines; use fewer "
        "workers or more data.")

  if training:
    augment_fn = _augment_fn(stage, image_size, color_jitter_strength,
                             use_blur)
    start = int(start_step) * int(batch_size)
    if cache:
      load = _store_loader(_build_store(source, local, data_dir))
      ds = _random_access_train(load, len(local), seed, start, augment_fn,
                                safe=False)
    elif source.kind == "files":
      ds = _random_access_train(_file_loader(source, local), len(local),
                                seed, start, augment_fn,
                                safe=not source.fully_decoded)
    else:
      ds = _tfds_stream_train(source, local, data_dir, seed, start,
                              augment_fn)
  else:
    if source.kind == "files":
      ds = tf.data.Dataset.range(len(local)).map(
          _file_loader(source, local), num_parallel_calls=tf.data.AUTOTUNE,
          deterministic=True)
      if not source.fully_decoded:
        ds = ds.ignore_errors(log_warning=True)
    else:
      ds = _tfds_read(source.builder, split, data_dir, False).enumerate()
      if len(local) < source.num_examples:
        keep = np.zeros([source.num_examples], bool)
        keep[local] = True
        keep = tf.constant(keep)
        ds = ds.filter(lambda i, row: keep[i])
      ds = ds.map(lambda i, row: (folder_lib.decode_image_uint8(row[0]),
                                  row[1]),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
      ds = ds.cache()
    ds = ds.map(_eval_fn(image_size), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  # Sharding is done above, by example, before anything is read.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
