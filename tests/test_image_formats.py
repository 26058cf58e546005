"""WebP and TIFF images: decoded like the PNG of the same pixels, everywhere.

Every file here is written by Pillow (or, for 16-bit RGB TIFF, which Pillow
cannot write, by `_raw_tiff`) and compared with the PNG of the same pixels
decoded by TensorFlow: exactly for lossless files, closely for lossy WebP.
They go through `folder.decode_image_uint8`, the listing's full check, the
input pipeline (training and evaluation, cached or not) and embed/predict.
"""

import glob
import io
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import ROOT
from simclr_tf import inference
from simclr_tf.data import folder
from simclr_tf.data import pipeline

RNG = np.random.RandomState(0)
SAMPLE = sorted(glob.glob(os.path.join(
    ROOT, "simclr_tf", "data", "cifar10_sample", "test", "airplane", "*")))


def _photo(index=0, size=(48, 40)):
  """A real photo (bundled CIFAR-10 image, resized), uint8 [H, W, 3]."""
  image = Image.open(SAMPLE[index]).convert("RGB")
  return np.asarray(image.resize(size, Image.BICUBIC))


def _pil(array, mode=None, fmt="PNG", **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _animated_webp(first, second) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(first).save(buffer, format="WEBP", lossless=True,
                              save_all=True,
                              append_images=[Image.fromarray(second)])
  return buffer.getvalue()


def _raw_tiff(array, big_endian=False) -> bytes:
  """A baseline uncompressed TIFF of uint8/uint16 [H, W, 3 or 4]."""
  order = ">" if big_endian else "<"
  height, width, channels = array.shape
  bits = array.dtype.itemsize * 8
  data = array.astype(order + f"u{array.dtype.itemsize}").tobytes()
  entries = [  # (tag, type 3 = SHORT / 4 = LONG, count, value)
      (256, 4, 1, width), (257, 4, 1, height),
      (258, 3, channels, None),           # BitsPerSample, one per channel
      (259, 3, 1, 1),                     # no compression
      (262, 3, 1, 2),                     # RGB
      (273, 4, 1, None), (277, 3, 1, channels), (278, 4, 1, height),
      (279, 4, 1, len(data)),
  ] + ([(338, 3, 1, 2)] if channels == 4 else [])  # unassociated alpha
  bits_at = 8 + 2 + 12 * len(entries) + 4   # after the header and the IFD
  data_at = bits_at + 2 * channels
  entries = [(tag, kind, count, {258: bits_at, 273: data_at}.get(tag, value))
             for tag, kind, count, value in entries]
  out = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(
      order + "IH", 8, len(entries))
  for tag, kind, count, value in entries:
    if kind == 3 and count == 1:
      out += struct.pack(order + "HHIHH", tag, kind, count, value, 0)
    else:
      out += struct.pack(order + "HHII", tag, kind, count, value)
  out += struct.pack(order + "I", 0)
  out += struct.pack(order + "H" * channels, *[bits] * channels)
  return out + data


def _decode(contents: bytes) -> np.ndarray:
  return folder.decode_image_uint8(tf.constant(contents)).numpy()


def _png(array) -> np.ndarray:
  """What the PNG of `array` (uint8 or uint16, [H, W, C]) decodes to."""
  return _decode(tf.io.encode_png(array).numpy())


def test_webp_and_tiff_decode_like_the_png_of_the_same_pixels():
  rgb = _photo()
  alpha = RNG.randint(0, 256, rgb.shape[:2]).astype(np.uint8)
  rgba = np.dstack([rgb, alpha])
  gray = rgb[..., :1]
  gray_alpha = np.dstack([gray, alpha])
  # 16-bit: any low byte; the 8-bit result keeps the high byte, as for PNG.
  rgb16 = RNG.randint(0, 65536, rgb.shape).astype(np.uint16)
  rgba16 = RNG.randint(0, 65536, rgba.shape).astype(np.uint16)
  gray16 = RNG.randint(0, 65536, gray.shape).astype(np.uint16)
  cases = {  # name: (file bytes, the pixels of the PNG to compare with)
      "webp lossless": (_pil(rgb, fmt="WEBP", lossless=True), rgb),
      # exact: keep the colour of transparent pixels.
      "webp lossless rgba": (_pil(rgba, "RGBA", "WEBP", lossless=True,
                                  exact=True), rgba),
      "webp animated (first frame)": (_animated_webp(rgb, 255 - rgb), rgb),
      "tiff rgb": (_pil(rgb, fmt="TIFF"), rgb),
      "tiff rgb lzw": (_pil(rgb, fmt="TIFF", compression="tiff_lzw"), rgb),
      "tiff rgb deflate": (_pil(rgb, fmt="TIFF",
                                compression="tiff_adobe_deflate"), rgb),
      "tiff gray": (_pil(gray[..., 0], fmt="TIFF"), gray),
      "tiff gray+alpha": (_pil(gray_alpha, "LA", "TIFF"), gray_alpha),
      "tiff rgba": (_pil(rgba, "RGBA", "TIFF", compression="packbits"),
                    rgba),
      "tiff 16-bit gray": (_pil(gray16[..., 0], fmt="TIFF"), gray16),
      "tiff 16-bit rgb": (_raw_tiff(rgb16), rgb16),
      "tiff 16-bit rgba big-endian": (_raw_tiff(rgba16, big_endian=True),
                                      rgba16),
      "tiff 8-bit rgb big-endian": (_raw_tiff(rgb, big_endian=True), rgb),
  }
  pages = io.BytesIO()
  Image.fromarray(rgb).save(pages, format="TIFF", save_all=True,
                            append_images=[Image.fromarray(255 - rgb)])
  cases["tiff two pages (first page)"] = (pages.getvalue(), rgb)
  for name, (contents, pixels) in cases.items():
    image = _decode(contents)
    assert image.dtype == np.uint8 and image.shape == rgb.shape, name
    np.testing.assert_array_equal(image, _png(pixels), err_msg=name)
  # decode_image is the same in [0, 1].
  np.testing.assert_array_equal(
      folder.decode_image(tf.constant(cases["tiff rgb"][0])).numpy(),
      folder.decode_image(tf.io.encode_png(rgb)).numpy())
  # Lossy WebP: as Pillow decodes it, and close to the original pixels.
  lossy = _pil(rgb, fmt="WEBP", quality=90)
  image = _decode(lossy).astype(int)
  pillow = np.asarray(Image.open(io.BytesIO(lossy)).convert("RGB"), int)
  assert np.abs(image - pillow).max() <= 1
  assert np.abs(image - rgb).mean() < 4


def test_webp_and_tiff_are_decoded_inside_tf_data():
  rgb = _photo()
  files = [_pil(rgb, fmt="TIFF"), _animated_webp(rgb, 255 - rgb),
           _pil(rgb, fmt="WEBP", lossless=True), _pil(rgb)]
  ds = tf.data.Dataset.from_tensor_slices(files).map(
      folder.decode_image_uint8, num_parallel_calls=4, deterministic=True)
  for image in ds:
    np.testing.assert_array_equal(image.numpy(), rgb)


def _write(path, contents: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(contents)
  return str(path)


def test_damaged_and_unsupported_webp_and_tiff_are_skipped_with_a_reason(
    tmp_path):
  rgb = _photo()
  train = tmp_path / "data" / "train"
  webp = _pil(rgb, fmt="WEBP", lossless=True)
  tiff = _pil(rgb, fmt="TIFF")
  anim = _animated_webp(rgb, 255 - rgb)
  good = sorted([_write(train / "ok.webp", webp),
                 _write(train / "ok.tif", tiff),
                 _write(train / "anim.webp", anim)])
  bad = {
      _write(train / "float.tif",
             _pil(rgb[..., 0].astype(np.float32) / 255, fmt="TIFF")):
          "cannot be decoded (32-bit float TIFF is not supported",
      _write(train / "int32.tiff",
             _pil(rgb[..., 0].astype(np.int32) * 1000, fmt="TIFF")):
          "cannot be decoded (32-bit integer TIFF is not supported",
      _write(train / "truncated.tif", tiff[:len(tiff) // 2]):
          "cannot be decoded (corrupt or truncated TIFF)",
      _write(train / "corrupt.tif", tiff[:8] + bytes(len(tiff) - 8)):
          "cannot be decoded (corrupt or truncated TIFF)",
      _write(train / "truncated.webp", webp[:len(webp) // 2]):
          f"truncated ({len(webp) // 2} of {len(webp)} bytes)",
      _write(train / "corrupt.webp", webp[:20] + bytes(len(webp) - 20)):
          "cannot be decoded (corrupt image)",
      _write(train / "corrupt_anim.webp", anim[:40] + bytes(len(anim) - 40)):
          "cannot be decoded (corrupt or truncated animated WebP)",
      _write(train / "notes.txt", b"text"):
          "not a JPEG, PNG, BMP, GIF, WebP or TIFF image",
  }
  listing = folder.list_image_folder(str(tmp_path / "data"), "train")
  assert sorted(listing.paths) == good
  reasons = dict(zip(listing.skipped, listing.skip_reasons))
  assert sorted(reasons) == sorted(bad)
  for path, expected in bad.items():
    assert reasons[path].startswith(expected), (path, reasons[path])


def _same_pixels_folder(root, split, rgb_images) -> list:
  """ROOT/SPLIT/<format>/<i>.<ext>: the same pixels in every format.

  Returns the class folder names, sorted (label ids).
  """
  for i, rgb in enumerate(rgb_images):
    high_byte = rgb.astype(np.uint16) << 8
    rgb16 = high_byte + RNG.randint(0, 256, rgb.shape).astype(np.uint16)
    files = {
        "a_png": (".png", _pil(rgb)),
        "b_webp": (".webp", _pil(rgb, fmt="WEBP", lossless=True)),
        "c_webp_animated": (".webp", _animated_webp(rgb, 255 - rgb)),
        "d_tiff": (".tif", _pil(rgb, fmt="TIFF", compression="tiff_lzw")),
        "e_tiff16": (".tiff", _raw_tiff(rgb16)),
    }
    for name, (ext, contents) in files.items():
      _write(root / split / name / f"{i}{ext}", contents)
  return sorted(files)


def test_input_pipeline_reads_webp_and_tiff(tmp_path):
  root = tmp_path / "data"
  classes = _same_pixels_folder(root, "train", [_photo(0), _photo(1)])
  count = 2 * len(classes)
  for cache in (False, True):
    ev = pipeline.build_dataset(
        dataset="image_folder", data_dir=str(root), split="train",
        stage="eval", image_size=32, batch_size=count, cache=cache)
    batch = next(iter(ev))
    images = batch["image"].numpy().reshape([len(classes), 2, 32, 32, 3])
    assert batch["label"].numpy().tolist() == [c // 2 for c in range(count)]
    for k, name in enumerate(classes):   # every format == the PNG
      np.testing.assert_array_equal(images[k], images[0], err_msg=name)
    train = pipeline.build_dataset(
        dataset="image_folder", data_dir=str(root), split="train",
        stage="pretrain", image_size=32, batch_size=count, cache=cache)
    batch = next(iter(train))   # one epoch: every file once
    assert sorted(batch["label"].numpy().tolist()) == [
        c // 2 for c in range(count)]
    for view in ("view1", "view2"):
      assert batch[view].shape == (count, 32, 32, 3)
      assert np.isfinite(batch[view].numpy()).all()


@pytest.fixture(scope="module")
def export_dir(small_classifier):
  return small_classifier


def test_embed_and_predict_read_webp_and_tiff(export_dir, tmp_path):
  root = tmp_path / "data"
  classes = _same_pixels_folder(root, "test", [_photo(2)])
  for key in ("final_avg_pool", "logits_sup"):
    files, values, skipped, _ = inference.apply_to_folder(
        export_dir, str(root), "test", key)
    assert [os.path.basename(os.path.dirname(f)) for f in files] == classes
    assert skipped == ()
    for name, row in zip(classes, values):   # every format == the PNG
      np.testing.assert_allclose(row, values[0], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{key} {name}")
