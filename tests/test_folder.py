"""Tests of simclr_tf.data.folder: layouts, formats, unusable files."""

import io
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.data import folder

RNG = np.random.RandomState(0)


def _rgb(h=6, w=5):
  return RNG.randint(0, 256, [h, w, 3]).astype(np.uint8)


def _save(path, array, mode=None, fmt=None, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path, format=fmt, **kwargs)
  return str(path)


def _encoded(array, fmt, mode=None):
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, format=fmt)
  return buffer.getvalue()


def _decode(path):
  with open(path, "rb") as f:
    return folder.decode_image_uint8(tf.constant(f.read())).numpy()


def test_formats_decode_to_rgb(tmp_path):
  rgb = _rgb()
  gray = rgb[..., 0].copy()
  alpha = rgb[..., 1].copy()
  d = tmp_path / "f"
  cases = {
      "rgb.png": (_save(str(d / "rgb.png"), rgb), rgb),
      "rgb.bmp": (_save(str(d / "rgb.bmp"), rgb), rgb),
      "rgb.gif": (_save(str(d / "rgb.gif"), rgb), None),
      "gray.png": (_save(str(d / "gray.png"), gray), np.dstack([gray] * 3)),
      "gray.bmp": (_save(str(d / "gray.bmp"), gray), np.dstack([gray] * 3)),
      "la.png": (_save(str(d / "la.png"), np.dstack([gray, alpha]), "LA"),
                 np.dstack([gray] * 3)),
      "rgba.png": (_save(str(d / "rgba.png"), np.dstack([rgb, alpha]),
                         "RGBA"), rgb),
      "g16.png": (_save(str(d / "g16.png"), gray.astype(np.uint16) * 257),
                  np.dstack([gray] * 3)),
      "one.png": (_save(str(d / "one.png"), rgb[:1, :1]), rgb[:1, :1]),
  }
  for name, (path, expected) in cases.items():
    image = _decode(path)
    assert image.shape[-1] == 3 and image.dtype == np.uint8, name
    if expected is not None:
      np.testing.assert_array_equal(image, expected, err_msg=name)
  # JPEG is lossy; GIF is paletted.
  jpg_path = _save(str(d / "rgb.jpg"), rgb, quality=95)
  reference = np.asarray(Image.open(jpg_path).convert("RGB"), int)
  jpg = _decode(jpg_path)
  assert jpg.shape == rgb.shape and np.abs(jpg - reference).mean() < 3
  gif = _decode(cases["rgb.gif"][0])
  assert gif.shape == rgb.shape
  # First frame of an animated GIF.
  frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
  anim = str(d / "anim.gif")
  frames[0].save(anim, save_all=True, append_images=frames[1:])
  assert _decode(anim).shape == rgb.shape
  as_float = folder.decode_image(tf.constant(_encoded(rgb, "PNG"))).numpy()
  np.testing.assert_allclose(as_float, rgb / 255.0, atol=1e-6)


def test_labeled_layout(tmp_path, caplog):
  root = tmp_path / "data"
  rgb = _rgb()
  paths = [
      _save(str(root / "train" / "zebra" / "a.png"), rgb),
      _save(str(root / "train" / "zebra" / "b.jpg"), rgb),
      _save(str(root / "train" / "ant" / "c.bmp"), rgb),
      _save(str(root / "train" / "ant" / "sub" / "d.gif"), rgb),
      _save(str(root / "train" / "ant" / "e.png"), rgb[..., 0]),
      _save(str(root / "train" / "ant" / "f.png"), rgb[:1, :1]),
  ]
  # Hidden files and folders are ignored, empty classes are not classes.
  _save(str(root / "train" / "ant" / ".hidden.png"), rgb)
  _save(str(root / "train" / ".cache" / "x.png"), rgb)
  (root / "train" / "ant" / ".DS_Store").write_bytes(b"junk")
  os.makedirs(root / "train" / "empty")
  # A symbolic link to a file is followed.
  os.makedirs(root / "train" / "bee")
  os.symlink(paths[0], root / "train" / "bee" / "link.png")
  with caplog.at_level(logging.WARNING, logger="simclr_tf"):
    listing = folder.list_image_folder(str(root), "train")
  assert listing.class_names == ("ant", "bee", "zebra")
  assert listing.num_examples == 7 and listing.labeled
  assert listing.skipped == ()
  by_name = dict(zip((os.path.basename(p) for p in listing.paths),
                     listing.labels))
  assert by_name == {"c.bmp": 0, "d.gif": 0, "e.png": 0, "f.png": 0,
                     "link.png": 1, "a.png": 2, "b.jpg": 2}
  assert "empty" in caplog.text
  # Cached per process: the same object while nothing changes.
  assert folder.list_image_folder(str(root), "train") is listing


def test_unlabeled_layout(tmp_path):
  root = tmp_path / "data"
  for i in range(3):
    _save(str(root / "unlabeled" / f"{i}.png"), _rgb())
  listing = folder.list_image_folder(str(root), "unlabeled")
  assert listing.class_names == () and not listing.labeled
  assert listing.labels == (-1, -1, -1)
  assert [os.path.basename(p) for p in listing.paths] == [
      "0.png", "1.png", "2.png"]


def _bad_folder(root):
  """A labeled folder with 3 good images and 5 unusable files."""
  rgb = _rgb(16, 16)
  good = [_save(str(root / "train" / "a" / f"{i}.png"), rgb)
          for i in range(2)]
  good.append(_save(str(root / "train" / "b" / "ok.jpg"), rgb))
  jpg = _encoded(rgb, "JPEG")
  png = _encoded(rgb, "PNG")
  bad = {
      "a/empty.jpg": b"",
      "a/notes.txt": b"not an image at all\n",
      "b/truncated.jpg": jpg[:len(jpg) // 2],
      "b/truncated.png": png[:len(png) - 30],
      "b/corrupt.jpg": jpg[:20] + bytes(len(jpg) - 40) + jpg[-20:],
  }
  for name, data in bad.items():
    (root / "train" / name).write_bytes(data)
  return good, sorted(str(root / "train" / n) for n in bad)


def test_unusable_files_are_skipped_and_reported(tmp_path, caplog):
  root = tmp_path / "data"
  good, bad = _bad_folder(root)
  with caplog.at_level(logging.WARNING, logger="simclr_tf"):
    listing = folder.list_image_folder(str(root), "train")
  assert sorted(listing.paths) == sorted(good)
  assert sorted(listing.skipped) == bad
  reasons = dict(zip(listing.skipped, listing.skip_reasons))
  assert reasons[str(root / "train" / "a" / "empty.jpg")] == "empty file"
  assert "not a JPEG" in reasons[str(root / "train" / "a" / "notes.txt")]
  assert "truncated" in reasons[str(root / "train" / "b" / "truncated.jpg")]
  assert "corrupt" in reasons[str(root / "train" / "b" / "corrupt.jpg")]
  assert "Skipped 5 unusable file(s)" in caplog.text


def test_strict_raises_on_first_bad_file(tmp_path):
  root = tmp_path / "data"
  _bad_folder(root)
  with pytest.raises(ValueError, match="drop --strict_data") as error:
    folder.list_image_folder(str(root), "train", strict=True)
  assert "empty.jpg" in str(error.value) or "notes.txt" in str(error.value)


def test_palette_bmp_skipped(tmp_path):
  root = tmp_path / "data"
  rgb = _rgb()
  _save(str(root / "train" / "ok.png"), rgb)
  Image.fromarray(rgb).convert("P").save(str(root / "train" / "pal.bmp"))
  listing = folder.list_image_folder(str(root), "train")
  assert [os.path.basename(p) for p in listing.skipped] == ["pal.bmp"]
  assert "palette" in listing.skip_reasons[0]


def test_empty_and_missing_folders(tmp_path):
  os.makedirs(tmp_path / "data" / "train" / "cls")
  with pytest.raises(ValueError, match="no usable image") as error:
    folder.list_image_folder(str(tmp_path / "data"), "train")
  assert "ROOT/<split>/<class>/<image>" in str(error.value)
  with pytest.raises(ValueError, match="has no 'test' folder"):
    folder.list_image_folder(str(tmp_path / "data"), "test")
  with pytest.raises(ValueError, match="does not exist"):
    folder.list_image_folder(str(tmp_path / "nowhere"), "train")
