"""Image folders: listing, validation and decoding.

Layouts (ROOT is `--data_dir`, or the bundled sample's directory):

    ROOT/<split>/<class>/<file>   labeled; classes sorted by name -> label ids
    ROOT/<split>/<file>           unlabeled; every label is -1

Files may be JPEG, PNG (8 or 16 bit), BMP, GIF (first frame), WebP (lossy or
lossless; first frame of an animation) or TIFF (8 or 16 bit, any compression
Pillow reads; first page), of any size, grayscale, gray+alpha, RGB or RGBA;
every image is converted to 8-bit RGB. TensorFlow decodes all of them but
TIFF and animated WebP, which are decoded with Pillow (TensorFlow has no TIFF
decoder, and on WebP animations its decoder returns wrong pixels and corrupts
memory, TF 2.21).
Hidden files and folders (names starting with '.') are ignored, symbolic
links are followed (a folder reached twice through links is listed once).
Files that cannot be used (empty, not an image, truncated, corrupt, broken
links, names that are not valid UTF-8, which TensorFlow cannot open) are
skipped and counted; `strict=True` turns the first one into an error.

Validation is done once per folder and process: a cheap size and header
check of every file, then, unless the folder is large, a full parallel decode
of every file with `tf.data` (about 10 s for the 50,000 CIFAR-10 JPEGs on two
cores), so that training never meets an undecodable file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import logging
import os
import struct
from typing import Optional

import numpy as np
import tensorflow as tf

LOGGER = logging.getLogger("simclr_tf")

# Above this many bytes of image files, files are only checked by their size
# and header (a full decode would take too long), and the input pipeline drops
# the rare file that still fails to decode.
FULL_CHECK_MAX_BYTES = 1 << 30
# How many skipped files the log names.
NUM_REPORTED = 10
LAYOUT = ("ROOT/<split>/<class>/<image> (labeled) or ROOT/<split>/<image> "
          "(unlabeled)")
FORMATS = "JPEG, PNG, BMP, GIF, WebP or TIFF"
# First bytes of TIFF files: little- or big-endian, classic or BigTIFF.
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# A WebP file: b"RIFF", 4 bytes of size, b"WEBP", then its first chunk; an
# extended (b"VP8X") chunk holds flags at byte 20, 0x02 = animation.
_WEBP_ANIMATION_FLAG = 0x02
_HEAD_BYTES = 21
# (pattern, mask): a file is decoded with Pillow when its first bytes ANDed
# with the mask equal the pattern, for a TIFF magic or an animated WebP.
_PILLOW_HEADERS = tuple((magic, b"\xff" * 4) for magic in _TIFF_MAGICS) + ((
    b"RIFF" + b"\x00" * 4 + b"WEBPVP8X" + b"\x00" * 4 +
    bytes([_WEBP_ANIMATION_FLAG]),
    b"\xff" * 4 + b"\x00" * 4 + b"\xff" * 8 + b"\x00" * 4 +
    bytes([_WEBP_ANIMATION_FLAG])),)
# Pillow modes of 16-bit grayscale (TIFF); 16-bit RGB(A) TIFFs open as 8-bit
# "RGB"/"RGBA" holding the high byte of each sample.
_PILLOW_16BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """The usable images of one split of an image folder.

  Attributes:
    directory: the split folder, ROOT/<split>.
    paths: image files, sorted by class then path.
    labels: label id of each path; -1 when the folder is unlabeled.
    class_names: sorted names of the classes with at least one image; empty
      when unlabeled.
    skipped: files that were skipped because they cannot be used, as
      `printable_path` shows them (a name that is not valid UTF-8 has its
      bad bytes escaped, e.g. 'bad\\xff.jpg').
    skip_reasons: why, one per skipped file.
    fully_decoded: whether every file of `paths` was decoded once.
    num_bytes: total size of the files of `paths`.
  """

  directory: str
  paths: tuple
  labels: tuple
  class_names: tuple
  skipped: tuple = ()
  skip_reasons: tuple = ()
  fully_decoded: bool = True
  num_bytes: int = 0

  @property
  def labeled(self) -> bool:
    return bool(self.class_names)

  @property
  def num_examples(self) -> int:
    return len(self.paths)


def _gather_rgb(image: tf.Tensor) -> tf.Tensor:
  """Maps a 1-, 2-, 3- or 4-channel image to 3 channels (alpha dropped)."""
  channels = tf.shape(image)[-1]
  tf.debugging.assert_less_equal(channels, 4,
                                 message="image has more than 4 channels")
  table = tf.constant([[0, 0, 0], [0, 0, 0], [0, 1, 2], [0, 1, 2]], tf.int32)
  image = tf.gather(image, table[channels - 1], axis=2)
  return tf.ensure_shape(image, [None, None, 3])


def printable_path(path: str) -> str:
  """`path` as text, with the bytes of a name that is not UTF-8 escaped.

  Python lists such a name with surrogate escapes ('bad\\udcff.jpg');
  this gives the bytes instead ('bad\\xff.jpg'), and is `path` itself for
  every valid name.
  """
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def _name_problem(path: str) -> Optional[str]:
  """Why `path` cannot be given to TensorFlow (not UTF-8), or None."""
  try:
    path.encode("utf-8")
    return None
  except UnicodeEncodeError:
    pass
  try:
    os.path.basename(path).encode("utf-8")
    return "folder name is not valid UTF-8, rename it"
  except UnicodeEncodeError:
    return "file name is not valid UTF-8, rename it"


def _format_of(head: bytes) -> Optional[str]:
  """'TIFF', 'animated WebP', 'WebP' or None from a file's first bytes."""
  if head.startswith(_TIFF_MAGICS):
    return "TIFF"
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    if (head[12:16] == b"VP8X" and len(head) > 20 and
        head[20] & _WEBP_ANIMATION_FLAG):
      return "animated WebP"
    return "WebP"
  return None


class _Unsupported(Exception):
  """An image Pillow reads but that has no 8-bit RGB meaning here."""


def _pillow_rgb(contents: bytes) -> np.ndarray:
  """Decodes the first page or frame of an image with Pillow into 8-bit RGB.

  Args:
    contents: the bytes of the file (a TIFF or an animated WebP).
  Returns:
    uint8 array [H, W, 3], converted as `decode_image_uint8` says.
  Raises:
    ValueError: the image is damaged or of a kind that is not supported; the
      message is a short reason.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  kind = _format_of(bytes(contents[:_HEAD_BYTES])) or "image"
  try:
    with Image.open(io.BytesIO(contents)) as image:
      image.load()
      return _pillow_to_rgb(image, kind)
  except Image.DecompressionBombError as e:
    raise ValueError(f"{kind} too large to decode ({e})") from e
  except _Unsupported as e:
    raise ValueError(str(e)) from e
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Pillow raises OSError, SyntaxError, struct.error, EOFError, ... on
    # damaged files.
    raise ValueError(f"corrupt or truncated {kind}") from e


def _pillow_to_rgb(image, kind: str) -> np.ndarray:
  """A loaded Pillow image as uint8 [H, W, 3] (see `decode_image_uint8`)."""
  if image.mode in _PILLOW_16BIT_GRAY:
    # Keep the high byte, as TensorFlow does for 16-bit PNG.
    gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    return np.repeat(gray[:, :, np.newaxis], 3, axis=2)
  if image.mode in ("I", "F"):
    depth = "float" if image.mode == "F" else "integer"
    raise _Unsupported(f"32-bit {depth} {kind} is not supported, convert it "
                       "to 8 or 16 bit")
  try:
    # L, LA, P, 1, CMYK, YCbCr, RGB, RGBA; alpha is dropped.
    return np.asarray(image.convert("RGB"), np.uint8)
  except ValueError as e:
    raise _Unsupported(f"{kind} of mode {image.mode} is not supported, "
                       "convert it to PNG") from e


def _needs_pillow(contents: tf.Tensor) -> tf.Tensor:
  """Whether encoded image bytes are a TIFF or an animated WebP (bool)."""
  def rows(index):
    return tf.constant([list(row[index].ljust(_HEAD_BYTES, b"\x00"))
                        for row in _PILLOW_HEADERS], tf.uint8)
  # The first bytes, zero-padded when the file is shorter.
  head = tf.io.decode_raw(contents, tf.uint8, fixed_length=_HEAD_BYTES)
  matches = tf.equal(tf.bitwise.bitwise_and(head, rows(1)), rows(0))
  return tf.reduce_any(tf.reduce_all(matches, axis=1))


def _pillow_rgb_or_empty(contents) -> np.ndarray:
  """`_pillow_rgb`, or an empty [0, 0, 3] array if the image cannot be used.

  Returning instead of raising keeps TensorFlow from logging a Python
  traceback for every damaged file; `_decode_with_pillow` raises instead.
  """
  if isinstance(contents, np.ndarray):  # Eager calls pass a 0-d array.
    contents = contents.item()
  try:
    return _pillow_rgb(contents)
  except ValueError:
    return np.zeros([0, 0, 3], np.uint8)


def _decode_with_pillow(contents: tf.Tensor) -> tf.Tensor:
  image = tf.numpy_function(_pillow_rgb_or_empty, [contents], tf.uint8,
                            stateful=False)
  image = tf.ensure_shape(image, [None, None, 3])
  with tf.control_dependencies([tf.debugging.assert_greater(
      tf.size(image), 0, message="cannot decode the TIFF or animated WebP "
      "(corrupt, truncated or of an unsupported kind)")]):
    return tf.identity(image)


def _decode_with_tensorflow(contents: tf.Tensor) -> tf.Tensor:
  image = tf.io.decode_image(contents, channels=0, dtype=tf.uint8,
                             expand_animations=False)
  return _gather_rgb(image)


def decode_image_uint8(contents: tf.Tensor) -> tf.Tensor:
  """Decodes a JPEG, PNG, BMP, GIF, WebP or TIFF file into 8-bit RGB.

  Args:
    contents: scalar string tensor, the bytes of the file.
  Returns:
    uint8 tensor [H, W, 3]. Grayscale is replicated to 3 channels, alpha is
    dropped, 16-bit PNG and TIFF keep the high byte of each sample, a GIF or
    WebP animation gives its first frame, a TIFF its first page. TIFF and
    animated WebP are decoded with Pillow (`tf.numpy_function`, inside
    `tf.data` too); the other formats by TensorFlow alone.
  """
  return tf.cond(_needs_pillow(contents),
                 lambda: _decode_with_pillow(contents),
                 lambda: _decode_with_tensorflow(contents))


def decode_image(contents: tf.Tensor) -> tf.Tensor:
  """Decodes a JPEG, PNG, BMP, GIF, WebP or TIFF file into RGB in [0, 1].

  Args:
    contents: scalar string tensor, the bytes of the file.
  Returns:
    float32 tensor [H, W, 3] with values in [0, 1] (see
    `decode_image_uint8` for the conversions).
  """
  return tf.image.convert_image_dtype(decode_image_uint8(contents),
                                      tf.float32)


def _check_bmp(head: bytes, size: int) -> Optional[str]:
  """Reason why a BMP file cannot be used, or None."""
  if len(head) < 30:
    return "truncated BMP header"
  declared = struct.unpack_from("<I", head, 2)[0]
  if declared and size < declared:
    return f"truncated ({size} of {declared} bytes)"
  bits = struct.unpack_from("<H", head, 28)[0]
  if bits in (24, 32):
    return None
  if bits != 8 or len(head) < 54:
    return (f"{bits}-bit BMP is not supported; convert it to PNG")
  # The decoder returns palette indices; they are the pixel values only when
  # the palette is the gray ramp (what image libraries write for grayscale).
  header_size = struct.unpack_from("<I", head, 14)[0]
  num_colors = struct.unpack_from("<I", head, 46)[0] or 256
  start = 14 + header_size
  palette = head[start:start + 4 * num_colors]
  if len(palette) < 4 * num_colors or any(
      palette[4 * i:4 * i + 3] != bytes((i, i, i)) for i in range(num_colors)):
    return "palette BMP is not supported; convert it to PNG"
  return None


def check_file(path: str) -> Optional[str]:
  """Cheap check of one file by its size and header.

  Args:
    path: file path.
  Returns:
    None if the file starts like a JPEG, PNG, BMP, GIF, WebP or TIFF image
    and its name can be given to TensorFlow, else a short reason ('empty
    file', 'not a JPEG, PNG, BMP, GIF, WebP or TIFF image', 'file name is
    not valid UTF-8, rename it', ...).
  """
  name_problem = _name_problem(path)
  if name_problem:
    return name_problem
  if os.path.islink(path) and not os.path.exists(path):
    return f"broken symbolic link to {os.readlink(path)}"
  try:
    size = os.path.getsize(path)
    if size == 0:
      return "empty file"
    with open(path, "rb") as f:
      head = f.read(1100)
  except OSError as e:
    return f"cannot be read ({e.strerror})"
  if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a",
                      b"GIF89a")):
    return None
  if head.startswith(b"BM"):
    return _check_bmp(head, size)
  kind = _format_of(head)
  if kind is not None and "WebP" in kind:
    declared = struct.unpack_from("<I", head, 4)[0] + 8
    if size < declared:
      return f"truncated ({size} of {declared} bytes)"
  if kind is not None:
    return None
  return f"not a {FORMATS} image"


def _decode_failure_reason(path: str) -> str:
  """Why a file with a valid header failed to decode: truncated, corrupt or,
  for the files Pillow decodes, of a kind that is not supported."""
  try:
    with open(path, "rb") as f:
      contents = f.read()
  except OSError as e:
    return f"cannot be read ({e.strerror})"
  head, tail = contents[:_HEAD_BYTES], contents[-64:]
  if _format_of(head) in ("TIFF", "animated WebP"):
    try:
      _pillow_rgb(contents)
    except ValueError as e:
      return f"cannot be decoded ({e})"
  if head.startswith(b"\xff\xd8") and b"\xff\xd9" not in tail:
    return "cannot be decoded (truncated JPEG)"
  if head.startswith(b"\x89PNG") and b"IEND" not in tail:
    return "cannot be decoded (truncated PNG)"
  return "cannot be decoded (corrupt image)"


def _decodable(paths: list) -> list:
  """Whether each file decodes, with one parallel tf.data pass.

  Args:
    paths: file paths.
  Returns:
    list of bools, one per path.
  """
  if not paths:
    return []
  path_tensor = tf.constant(paths)

  def try_decode(index):
    image = decode_image_uint8(tf.io.read_file(path_tensor[index]))
    return index, tf.shape(image)[0]

  ds = tf.data.Dataset.range(len(paths)).map(
      try_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors().batch(4096)
  ok = [False] * len(paths)
  for indices, _ in ds.as_numpy_iterator():
    for i in indices:
      ok[int(i)] = True
  return ok


def _visible(names) -> list:
  return sorted(n for n in names if not n.startswith("."))


def _files_under(directory: str) -> list:
  """Sorted non-hidden files under a folder, recursively, following links.

  Broken links are listed (check_file reports them); a folder reached again
  through a link (a loop, or two links to it) is not entered twice.
  """
  found, seen = [], set()
  for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = _visible(dirnames)
    for name in _visible(filenames):
      path = os.path.join(dirpath, name)
      if os.path.isfile(path) or os.path.islink(path):
        found.append(path)
  return sorted(found)


def _signature(directory: str) -> tuple:
  """Modification times of a folder and its sub-folders (cache key)."""
  stamps = [os.stat(directory).st_mtime_ns]
  for name in _visible(os.listdir(directory)):
    path = os.path.join(directory, name)
    if os.path.isdir(path):
      stamps.append((name, os.stat(path).st_mtime_ns))
  return tuple(stamps)


@functools.lru_cache(maxsize=16)
def _scan(directory: str, signature: tuple) -> FolderListing:
  """Lists and validates a split folder (cached per process)."""
  del signature  # Only part of the cache key.
  entries = _visible(os.listdir(directory))
  class_dirs = [e for e in entries
                if os.path.isdir(os.path.join(directory, e))]
  candidates = []  # (path, class name or None)
  skipped, reasons = [], []
  if class_dirs:
    for name in entries:
      path = os.path.join(directory, name)
      if name not in class_dirs and (os.path.isfile(path) or
                                     os.path.islink(path)):
        skipped.append(printable_path(path))
        reasons.append(_name_problem(path) or "not inside a class folder")
    for name in class_dirs:
      candidates.extend(
          (p, name) for p in _files_under(os.path.join(directory, name)))
  else:
    candidates = [(p, None) for p in _files_under(directory)]

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    header_reasons = list(pool.map(check_file, [p for p, _ in candidates]))
  good = [c for c, r in zip(candidates, header_reasons) if r is None]
  for (path, _), reason in zip(candidates, header_reasons):
    if reason is not None:
      skipped.append(printable_path(path))
      reasons.append(reason)

  num_bytes = sum(os.path.getsize(p) for p, _ in good)
  fully_decoded = num_bytes <= FULL_CHECK_MAX_BYTES
  if fully_decoded:
    decodable = _decodable([p for p, _ in good])
    for (path, _), ok in zip(good, decodable):
      if not ok:
        skipped.append(printable_path(path))
        reasons.append(_decode_failure_reason(path))
    good = [c for c, ok in zip(good, decodable) if ok]
    num_bytes = sum(os.path.getsize(p) for p, _ in good)

  if class_dirs:
    class_names = tuple(sorted({name for _, name in good}))
    for name in class_dirs:
      if name not in class_names:
        LOGGER.warning("Class folder %s has no usable image; it is not a "
                       "class.", printable_path(os.path.join(directory, name)))
    ids = {name: i for i, name in enumerate(class_names)}
    labels = tuple(ids[name] for _, name in good)
  else:
    class_names = ()
    labels = (-1,) * len(good)
  if skipped:
    more = len(skipped) - NUM_REPORTED
    LOGGER.warning(
        "Skipped %d unusable file(s) in %s: %s%s", len(skipped),
        printable_path(directory), "; ".join(f"{p} ({r})" for p, r in
                             zip(skipped[:NUM_REPORTED],
                                 reasons[:NUM_REPORTED])),
        f"; and {more} more" if more > 0 else "")
  return FolderListing(
      directory=directory, paths=tuple(p for p, _ in good), labels=labels,
      class_names=class_names, skipped=tuple(skipped),
      skip_reasons=tuple(reasons), fully_decoded=fully_decoded,
      num_bytes=num_bytes)


def split_exists(root: str, split: str) -> bool:
  """Whether ROOT/<split> is a folder."""
  return os.path.isdir(os.path.join(root, split))


def list_image_folder(root: str, split: str,
                      strict: bool = False) -> FolderListing:
  """Lists the usable images of ROOT/<split>.

  Args:
    root: the folder that holds one sub-folder per split.
    split: split name, e.g. 'train'.
    strict: raise on the first unusable file instead of skipping it.
  Returns:
    A FolderListing (cached per process until the folders change).
  Raises:
    ValueError: the split folder is missing or has no usable image, or
      `strict` and a file cannot be used.
  """
  directory = os.path.abspath(os.path.join(root, split))
  if not os.path.isdir(root):
    raise ValueError(f"Image folder {root!r} does not exist; expected "
                     f"{LAYOUT}.")
  if not os.path.isdir(directory):
    raise ValueError(f"{root!r} has no {split!r} folder; expected {LAYOUT}.")
  listing = _scan(directory, _signature(directory))
  shown = printable_path(directory)
  if strict and listing.skipped:
    raise ValueError(
        f"{listing.skipped[0]} cannot be used ({listing.skip_reasons[0]}; "
        f"{len(listing.skipped)} unusable file(s) in {shown}): remove it "
        "or drop --strict_data to skip such files.")
  if not listing.paths:
    raise ValueError(
        f"{shown} has no usable image ({FORMATS}); expected {LAYOUT}.")
  return listing
