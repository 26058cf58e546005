"""Where the examples come from: one small class per kind of data set.

Kinds:
  'cifar10_sample'  the CIFAR-10 sample bundled in this package (an image
                    folder; `data_dir` is ignored).
  'image_folder'    an image folder ROOT/<split>/<class>/<image> or
                    ROOT/<split>/<image>, with ROOT = `data_dir`.
  any TFDS name     e.g. 'cifar10', 'imagenet2012',
                    'imagenet2012_subset/1pct', read from data prepared in
                    `data_dir` (nothing is downloaded).

Every source of one split has the same interface (`Source`): its size,
class names and labels, its examples as encoded images in index order, and
random access by index where the kind allows it. The input pipeline
(`simclr_tf.data.pipeline`) builds training and evaluation streams from any
of them, so a new kind of data set is one new class and a line in
`open_source`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from simclr_tf.data import BUNDLED_DATASET, IMAGE_FOLDER
from simclr_tf.data import folder as folder_lib


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


class Source:
  """The examples of one split, before selection and sharding.

  Attributes:
    name: 'dataset/split', for messages.
    num_classes: number of classes, 0 when unlabeled.
    class_names: class names, in label-id order.
    num_examples: number of examples.
    num_bytes: approximate size of the encoded images (0 if unknown).
    fully_decoded: every image is known to decode (else the pipeline drops
      the ones that fail).
  """

  name = ""
  num_classes = 0
  class_names = ()
  num_examples = 0
  num_bytes = 0
  fully_decoded = True

  def labels(self) -> np.ndarray:
    """int32 label of every example (-1 when unlabeled), in index order."""
    raise NotImplementedError

  def encoded(self, indices: np.ndarray) -> tf.data.Dataset:
    """(encoded image bytes, int32 label) of `indices`, in index order."""
    raise NotImplementedError

  def loader(self, indices: np.ndarray) -> Optional[Callable]:
    """A function position -> (uint8 image, label) over `indices`, or None
    when the examples can only be read in order."""
    return None

  def describe(self, indices: np.ndarray) -> list:
    """One line per example of `indices`, sorted (the label-subset file)."""
    return [str(i) for i in sorted(indices)]


class FolderSource(Source):
  """One split of an image folder (`simclr_tf.data.folder`): random access.

  Args:
    root: ROOT of the folder.
    split: the split's folder name.
    strict: raise on the first unusable image file.
    dataset: the dataset name, for messages.
  """

  def __init__(self, root: str, split: str, strict: bool = False,
               dataset: str = IMAGE_FOLDER):
    listing = folder_lib.list_image_folder(root, split, strict=strict)
    self.name = f"{dataset}/{split}"
    self.paths = listing.paths
    self.num_classes = len(listing.class_names)
    self.class_names = tuple(listing.class_names)
    self.num_examples = listing.num_examples
    self.num_bytes = listing.num_bytes
    self.fully_decoded = listing.fully_decoded
    self._labels = np.asarray(listing.labels, np.int32)

  def labels(self) -> np.ndarray:
    return self._labels

  def _tensors(self, indices: np.ndarray):
    paths = (tf.constant([self.paths[i] for i in indices]) if len(indices)
             else tf.zeros([0], tf.string))
    return paths, tf.constant(self._labels[indices], tf.int32)

  def encoded(self, indices: np.ndarray) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(self._tensors(indices)).map(
        lambda path, label: (tf.io.read_file(path), label),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def loader(self, indices: np.ndarray) -> Callable:
    paths, labels = self._tensors(indices)

    def load(position):
      image = folder_lib.decode_image_uint8(tf.io.read_file(paths[position]))
      return image, labels[position]

    return load

  def describe(self, indices: np.ndarray) -> list:
    return sorted(self.paths[i] for i in indices)


class InMemoryData:
  """Images held in memory, given to the library instead of a dataset name.

  Args:
    splits: {split name: (images, labels)}; images uint8 [N, H, W, 3]
      (0-255), labels int [N] or None (unlabeled).
    class_names: names of the labels 0..C-1 (default: 'class_<k>').
  """

  def __init__(self, splits: dict, class_names=()):
    self.splits = {}
    num_classes = 0
    for split, (images, labels) in splits.items():
      images = np.asarray(images)
      if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images of split {split!r} must be uint8 [N, H, W, 3]; received "
            f"{images.dtype} {list(images.shape)}.")
      if labels is not None:
        labels = np.asarray(labels).astype(np.int32).reshape([-1])
        if len(labels) != len(images):
          raise ValueError(
              f"split {split!r} has {len(images)} images but {len(labels)} "
              "labels; give one label per image.")
        if len(labels) and labels.min() < 0:
          raise ValueError(f"labels of split {split!r} must be >= 0; "
                           f"received {int(labels.min())}.")
        num_classes = max(num_classes, int(labels.max()) + 1 if len(labels)
                          else 0)
      self.splits[split] = (images, labels)
    self.class_names = tuple(class_names) or tuple(
        f"class_{k}" for k in range(num_classes))
    if num_classes > len(self.class_names):
      raise ValueError(f"labels go up to {num_classes - 1} but only "
                       f"{len(self.class_names)} class names were given.")

  def __repr__(self):
    sizes = ", ".join(f"{s}: {len(v[0])} images" for s, v in
                      self.splits.items())
    return f"in-memory data ({sizes})"

  def has_split(self, split: str) -> bool:
    return split in self.splits


class ArraySource(Source):
  """One split of `InMemoryData`: random access.

  Args:
    data: the `InMemoryData`.
    split: the split's name.
  """

  def __init__(self, data: InMemoryData, split: str):
    if not data.has_split(split):
      raise ValueError(f"the in-memory data has no split {split!r} (it has "
                       f"{', '.join(data.splits)}).")
    images, labels = data.splits[split]
    self.name = f"in-memory/{split}"
    self._images = images
    self.num_examples = len(images)
    self.num_bytes = int(images.nbytes)
    if labels is None:
      self._labels = np.full([len(images)], -1, np.int32)
    else:
      self._labels = labels
      self.num_classes = len(data.class_names)
      self.class_names = tuple(data.class_names)

  def labels(self) -> np.ndarray:
    return self._labels

  def encoded(self, indices: np.ndarray) -> tf.data.Dataset:
    # PNG is lossless: the pipeline decodes it back to the same pixels.
    ds = tf.data.Dataset.from_tensor_slices(
        (self._images[indices], self._labels[indices]))
    return ds.map(lambda image, label: (tf.io.encode_png(image), label),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def loader(self, indices: np.ndarray) -> Callable:
    images = tf.constant(self._images[indices])
    labels = tf.constant(self._labels[indices])
    return lambda position: (images[position], labels[position])


def _tfds_builder(dataset: str, data_dir: str):
  """The TFDS builder of a dataset name, with a one-line error if unknown."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(dataset, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"--dataset={dataset!r} is unknown; use {BUNDLED_DATASET}"
        f", {IMAGE_FOLDER} (with --data_dir=ROOT) or the name of a "
        "TFDS dataset prepared in --data_dir (e.g. cifar10, imagenet2012)."
    ) from None


class TfdsSource(Source):
  """One split of a TFDS data set prepared in `data_dir`: read in order.

  Args:
    builder: the TFDS builder.
    split: the split name (slices such as 'train[:10%]' allowed).
    data_dir: the TFDS data directory, for messages.
    dataset: the dataset name as given (default: the builder's).
  Raises:
    ValueError: the split does not exist.
  """

  def __init__(self, builder, split: str, data_dir: str = "",
               dataset: str = ""):
    dataset = dataset or builder.name
    if not tfds_split_exists(builder, split):
      raise ValueError(f"--dataset={dataset} has no split {split!r}; use "
                       f"one of {list(builder.info.splits)}.")
    self.builder = builder
    self.split = split
    self.data_dir = data_dir
    self.name = f"{dataset}/{split}"
    features = builder.info.features
    label = features["label"] if "label" in features else None
    self.class_names = tuple(getattr(label, "names", None) or ())
    self.num_classes = int(getattr(label, "num_classes", 0) or 0)
    self.num_bytes = int(getattr(builder.info, "dataset_size", 0) or 0)
    self._labels = None
    self.num_examples = self._count()

  def _read(self, skip_images: bool) -> tf.data.Dataset:
    """The split in file order, images left encoded."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if "image" not in self.builder.info.features:
      raise ValueError(f"--dataset={self.builder.name} has no 'image' "
                       "feature; only image classification datasets are "
                       "supported.")
    read_config = tfds.ReadConfig(interleave_cycle_length=1,
                                  try_autocache=False)
    try:
      ds = self.builder.as_dataset(
          split=self.split, shuffle_files=False, read_config=read_config,
          decoders={"image": tfds.decode.SkipDecoding()})
    except AssertionError:
      raise ValueError(
          f"--dataset={self.builder.name} is not prepared in --data_dir="
          f"{self.data_dir}; prepare it there first (tfds build, or "
          "download_and_prepare), or use --dataset=image_folder.") from None
    except (KeyError, ValueError) as e:
      raise ValueError(
          f"--dataset={self.builder.name} has no split {self.split!r} ({e}); "
          f"available: {list(self.builder.info.splits)}.") from None
    has_label = "label" in self.builder.info.features

    def select(example):
      label = (tf.cast(example["label"], tf.int32) if has_label
               else tf.constant(-1, tf.int32))
      return label if skip_images else (example["image"], label)

    return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)

  def _count(self) -> int:
    """Examples of the split, from its metadata or by counting."""
    if list(self.builder.info.splits):
      return int(self.builder.info.splits[self.split].num_examples)
    ds = self._read(skip_images=True)
    count = int(ds.cardinality())
    if count >= 0:
      return count
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))

  def labels(self) -> np.ndarray:
    """Read once, in one pass over the split's records."""
    if self._labels is None:
      ds = self._read(skip_images=True).batch(65536)
      parts = list(ds.as_numpy_iterator())
      self._labels = (np.concatenate(parts).astype(np.int32) if parts
                      else np.zeros([0], np.int32))
    return self._labels

  def encoded(self, indices: np.ndarray) -> tf.data.Dataset:
    ds = self._read(skip_images=False)
    if len(indices) == self.num_examples:
      return ds
    keep = np.zeros([self.num_examples], bool)
    keep[indices] = True
    keep = tf.constant(keep)
    return ds.enumerate().filter(lambda i, row: keep[i]).map(
        lambda i, row: row)


def tfds_split_exists(builder, split: str) -> bool:
  """Whether a TFDS split exists (True when the split list is unknown)."""
  known = list(builder.info.splits)
  return not known or split.split("[")[0] in known


def bundled_sample_dir() -> str:
  """Folder of the CIFAR-10 sample shipped with the package."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "cifar10_sample")


def _folder_root(dataset: str, data_dir: str) -> Optional[str]:
  """ROOT of an image-folder dataset, or None for a TFDS name."""
  if isinstance(dataset, InMemoryData):
    return None
  if dataset == BUNDLED_DATASET:
    return bundled_sample_dir()
  if dataset == IMAGE_FOLDER:
    if not data_dir:
      raise ValueError(
          f"--dataset={IMAGE_FOLDER} needs --data_dir=ROOT with "
          f"{folder_lib.LAYOUT}.")
    check_data_dir(data_dir)
    return data_dir
  return None


def check_data_dir(data_dir: str) -> None:
  """ValueError naming what --data_dir is when it is not a folder."""
  if os.path.isdir(data_dir):
    return
  what = ("is a file, not a folder" if os.path.exists(data_dir)
          else "does not exist")
  raise ValueError(f"--data_dir={data_dir} {what}; expected "
                   f"{folder_lib.LAYOUT}.")


def open_source(dataset: str, data_dir: str, split: str,
                strict: bool = False) -> Source:
  """Opens one split of a dataset.

  Args:
    dataset: 'cifar10_sample', 'image_folder' or a TFDS name.
    data_dir: ROOT of an image folder or the TFDS data directory.
    split: split name.
    strict: raise on unusable image files.
  Returns:
    A `Source`.
  Raises:
    ValueError: unknown dataset, missing folder or split, no usable image.
  """
  if isinstance(dataset, InMemoryData):
    return ArraySource(dataset, split)
  root = _folder_root(dataset, data_dir)
  if root is not None:
    return FolderSource(root, split, strict=strict, dataset=dataset)
  return TfdsSource(_tfds_builder(dataset, data_dir), split, data_dir,
                    dataset=dataset)


def _split_size(dataset: str, data_dir: str, split: str,
                strict: bool) -> int:
  """Examples of a split; 0 when it does not exist."""
  if isinstance(dataset, InMemoryData):
    return (ArraySource(dataset, split).num_examples
            if dataset.has_split(split) else 0)
  root = _folder_root(dataset, data_dir)
  if root is not None:
    if not folder_lib.split_exists(root, split):
      return 0
    return FolderSource(root, split, strict=strict).num_examples
  builder = _tfds_builder(dataset, data_dir)
  if not tfds_split_exists(builder, split):
    return 0
  try:
    return TfdsSource(builder, split, data_dir).num_examples
  except ValueError:
    return 0


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
      examples that `pipeline.build_dataset` keeps with the same fraction
      and seed.
    seed: the seed of that selection.
  Returns:
    A DatasetInfo.
  Raises:
    ValueError: unknown dataset, missing folder or train split, no images.
  """
  train = open_source(dataset, data_dir, train_split, strict)
  num_train = train.num_examples
  if label_fraction < 1.0:
    num_train = len(select_label_fraction(train.labels(), label_fraction,
                                          seed))
  return DatasetInfo(
      name=str(dataset), num_classes=train.num_classes,
      class_names=tuple(train.class_names), num_train_examples=num_train,
      num_eval_examples=_split_size(dataset, data_dir, eval_split, strict))
