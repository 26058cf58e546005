"""A messy image folder: every kind of bad file, skipped and reported exactly.

One folder holds usable images of every awkward kind (1, 2, 4 channels,
16-bit, 1x1, 4000x3000, WebP, animated WebP, TIFF, a link to an image),
unusable files of every kind (corrupt, truncated, empty, not an image, a
broken link, a file outside the class folders, a name that is not UTF-8),
an empty class folder, hidden files and folders and a link loop. Hidden
entries are not data: they are ignored, not reported.
"""

import io
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import run_cli
from simclr_tf import inference
from simclr_tf.data import pipeline
from simclr_tf.data import folder

RNG = np.random.RandomState(0)
RUN_FLAGS = ("--mode=train", "--train_mode=pretrain", "--dataset=image_folder",
             "--resnet_depth=18", "--image_size=32", "--train_batch_size=8",
             "--proj_out_dim=32", "--log_images=false",
             "--cache_dataset=false", "--train_steps=2", "--seed=1")


def _encoded(array, fmt, mode=None, **kwargs) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _rgb(h=40, w=48):
  return RNG.randint(0, 256, [h, w, 3]).astype(np.uint8)


def _write(path, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _good_files(train) -> list:
  cat, dog = train / "cat", train / "dog"
  gray = _rgb()[..., 0]
  files = [_write(cat / f"photo_{i}.jpg", _encoded(_rgb(), "JPEG"))
           for i in range(3)]
  files += [
      _write(cat / "gray.png", _encoded(gray, "PNG")),
      _write(cat / "gray_alpha.png",
             _encoded(np.dstack([gray, gray]), "PNG", "LA")),
      _write(cat / "rgba.png", _encoded(
          np.dstack([_rgb(), _rgb()[..., :1]]), "PNG", "RGBA")),
      _write(cat / "deep16.png", tf.io.encode_png(tf.constant(
          RNG.randint(0, 65536, [20, 30, 3]).astype(np.uint16))).numpy()),
      _write(cat / "tiny.png", _encoded(_rgb(1, 1), "PNG")),
      _write(cat / "huge.png", _encoded(
          np.full([3000, 4000, 3], (90, 120, 200), np.uint8), "PNG")),
      _write(cat / "photo.webp", _encoded(_rgb(), "WEBP", quality=80)),
      _write(cat / "anim.webp", _encoded(
          _rgb(), "WEBP", save_all=True,
          append_images=[Image.fromarray(_rgb())])),
      _write(cat / "scan16.tif", _encoded(
          RNG.randint(0, 65536, [20, 30]).astype(np.uint16), "TIFF")),
      _write(cat / "rgba.tiff", _encoded(
          np.dstack([_rgb(), _rgb()[..., :1]]), "TIFF", "RGBA",
          compression="tiff_lzw")),
  ]
  os.symlink("photo_0.jpg", cat / "link_to_photo.jpg")
  files.append(str(cat / "link_to_photo.jpg"))
  files += [_write(dog / f"photo_{i}.jpg", _encoded(_rgb(), "JPEG"))
            for i in range(3)]
  return files


def _bad_files(train) -> dict:
  """{path: what its skip reason must say}."""
  cat, dog = train / "cat", train / "dog"
  jpeg = _encoded(_rgb(64, 64), "JPEG")
  png = _encoded(_rgb(64, 64), "PNG")
  bad = {
      # Damaged in the middle: start and end markers intact.
      _write(cat / "corrupt.jpg",
             jpeg[:4] + RNG.bytes(3000) + jpeg[-2:]): "corrupt",
      _write(cat / "truncated.jpg", jpeg[:len(jpeg) // 2]): "truncated",
      _write(cat / "empty.jpg", b""): "empty file",
      _write(cat / "notes.txt", b"a note, not an image\n"): "not a JPEG",
      _write(cat / "text_named.jpg", b"<html>404</html>"): "not a JPEG",
      _write(dog / "corrupt.png",
             png[:8] + RNG.bytes(3000) + png[-12:]): "corrupt",
      _write(dog / "truncated.png", png[:len(png) // 2]): "truncated",
      _write(train / "README.txt", b"stray file"): "not inside a class",
  }
  os.symlink("no_such_file.jpg", cat / "dangling.jpg")
  bad[str(cat / "dangling.jpg")] = "broken symbolic link"
  # Named in Latin-1 (b"caf\xe9.jpg"): Python lists it as 'caf\udce9.jpg',
  # the listing reports it as 'caf\\xe9.jpg'.
  latin1 = _write(cat / os.fsdecode(b"caf\xe9.jpg"), jpeg)
  bad[folder.printable_path(latin1)] = "file name is not valid UTF-8"
  return bad


def _ignored_files(train) -> None:
  """Hidden entries, an empty class and a link loop: no report, no data."""
  _write(train / "cat" / ".DS_Store", RNG.bytes(100))
  _write(train / "dog" / ".thumbnails" / "photo_0.jpg", RNG.bytes(100))
  _write(train / ".cache" / "x.jpg", b"")
  os.makedirs(train / "empty_class")
  os.symlink(".", train / "dog" / "loop")


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  root = tmp_path_factory.mktemp("messy")
  train = root / "train"
  good = _good_files(train)
  bad = _bad_files(train)
  _ignored_files(train)
  return root, good, bad


def _reported(stderr: str, directory: str) -> dict:
  """{path: reason} from the one 'Skipped N unusable file(s)' log line."""
  lines = [l for l in stderr.splitlines() if "unusable file(s) in" in l]
  assert len(lines) == 1, lines
  head, listed = lines[0].split(f"unusable file(s) in {directory}: ", 1)
  count = int(re.search(r"Skipped (\d+)", head).group(1))
  found = dict(re.findall(r"(/[^;]*?) \(([^;]*)\)(?:; |$)", listed))
  assert len(found) == count, lines[0]
  return found


def test_listing_skips_exactly_the_bad_files(messy, caplog):
  root, good, bad = messy
  listing = folder.list_image_folder(str(root), "train")
  assert sorted(listing.paths) == sorted(good)
  assert listing.class_names == ("cat", "dog")
  reasons = dict(zip(listing.skipped, listing.skip_reasons))
  assert sorted(reasons) == sorted(bad)
  for path, expected in bad.items():
    assert expected in reasons[path], (path, reasons[path])


def test_every_usable_kind_goes_through_the_pipeline(messy):
  root, good, _ = messy
  ds = pipeline.build_dataset(
      dataset="image_folder", data_dir=str(root), split="train",
      stage="pretrain", image_size=32, batch_size=len(good), cache=False)
  batch = next(iter(ds))   # one epoch: every usable image once
  for view in ("view1", "view2"):
    images = batch[view].numpy()
    assert images.shape == (len(good), 32, 32, 3)
    assert np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
  assert sorted(batch["label"].numpy().tolist()) == [0] * 14 + [1] * 3
  ev = pipeline.build_dataset(
      dataset="image_folder", data_dir=str(root), split="train",
      stage="eval", image_size=32, batch_size=len(good), cache=False)
  assert next(iter(ev))["image"].shape == (len(good), 32, 32, 3)


def test_strict_data_is_a_one_line_error_naming_a_bad_file(messy, tmp_path):
  root, _, bad = messy
  proc = run_cli(*RUN_FLAGS, f"--data_dir={root}", "--strict_data",
                 f"--model_dir={tmp_path / 'run'}", timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("run.py: ")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr
  named = errors[0].split("run.py: error: ", 1)[1].split(" cannot be used")[0]
  assert named in bad and "--strict_data" in errors[0]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_folder_without_usable_image_is_a_one_line_error(tmp_path):
  root = tmp_path / "data"
  _write(root / "train" / "cls" / "empty.jpg", b"")
  _write(root / "train" / "cls" / "notes.txt", b"text")
  os.makedirs(root / "train" / "other_cls")
  proc = run_cli(*RUN_FLAGS, f"--data_dir={root}",
                 f"--model_dir={tmp_path / 'run'}", timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("run.py: ")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr
  assert "has no usable image" in errors[0]
  assert str(root / "train") in errors[0]


@pytest.mark.slow
def test_run_on_the_messy_folder_completes_and_reports_exactly_the_bad_files(
    messy, tmp_path):
  root, _, bad = messy
  proc = run_cli(*RUN_FLAGS, f"--data_dir={root}",
                 f"--model_dir={tmp_path / 'run'}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "global_step: 2" in proc.stdout
  reported = _reported(proc.stderr, str(root / "train"))
  assert sorted(reported) == sorted(bad)
  for path, expected in bad.items():
    assert expected in reported[path], (path, reported[path])
  assert proc.stderr.count("empty_class has no usable image") == 1
  assert ".DS_Store" not in proc.stderr and ".thumbnails" not in proc.stderr
  assert os.path.exists(tmp_path / "run" / "saved_model" / "saved_model.pb")


def _latin1_folder(root):
  """ROOT/train/ok/ with a good image and b"caf\\xe9.jpg", and a class
  folder named b"\\xe9t\\xe9" (Latin-1, not UTF-8) holding a good image.

  Returns (the good image, {printable path: reason}).
  """
  jpeg = _encoded(_rgb(), "JPEG")
  good = _write(root / "train" / "ok" / "photo.jpg", jpeg)
  name = _write(root / "train" / "ok" / os.fsdecode(b"caf\xe9.jpg"), jpeg)
  inside = _write(root / "train" / os.fsdecode(b"\xe9t\xe9") / "x.jpg",
                  jpeg)
  train = str(root / "train")
  assert folder.printable_path(name) == train + "/ok/caf\\xe9.jpg"
  assert folder.printable_path(inside) == train + "/\\xe9t\\xe9/x.jpg"
  return good, {
      train + "/ok/caf\\xe9.jpg": "file name is not valid UTF-8, rename it",
      train + "/\\xe9t\\xe9/x.jpg":
          "folder name is not valid UTF-8, rename it"}


def test_names_that_are_not_utf8_are_skipped_and_shown_with_their_bytes(
    tmp_path, caplog):
  root = tmp_path / "data"
  good, bad = _latin1_folder(root)
  with caplog.at_level("WARNING", logger="simclr_tf"):
    listing = folder.list_image_folder(str(root), "train")
  assert listing.paths == (good,) and listing.class_names == ("ok",)
  assert dict(zip(listing.skipped, listing.skip_reasons)) == bad
  # One line names both, their bad bytes visible (no surrogates).
  assert "Skipped 2 unusable file(s)" in caplog.text
  for path, reason in bad.items():
    assert f"{path} ({reason})" in caplog.text
  assert "\\udc" not in caplog.text and "/\\xe9t\\xe9 has no usable" in (
      caplog.text)
  # Training and evaluation read the rest.
  for stage in ("finetune", "eval"):
    ds = pipeline.build_dataset(
        dataset="image_folder", data_dir=str(root), split="train",
        stage=stage, image_size=32, batch_size=1, cache=False)
    assert next(iter(ds))["image"].shape == (1, 32, 32, 3)
  with pytest.raises(ValueError) as error:
    folder.list_image_folder(str(root), "train", strict=True)
  first = str(root / "train" / "ok" / "caf\\xe9.jpg")
  assert str(error.value).startswith(
      f"{first} cannot be used (file name is not valid UTF-8, rename it")


def test_strict_data_names_a_file_that_is_not_utf8_in_one_line(tmp_path):
  root = tmp_path / "data"
  _latin1_folder(root)
  proc = run_cli(*RUN_FLAGS, f"--data_dir={root}", "--strict_data",
                 f"--model_dir={tmp_path / 'run'}", timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("run.py: ")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr
  assert errors[0] == proc.stderr.strip().splitlines()[-1]
  assert (f"{root}/train/ok/caf\\xe9.jpg cannot be used (file name is not "
          "valid UTF-8, rename it") in errors[0]
  assert "--strict_data" in errors[0]


@pytest.fixture(scope="module")
def export_dir(small_classifier):
  return small_classifier


def test_embed_and_predict_skip_and_list_exactly_the_bad_files(
    messy, export_dir, tmp_path):
  root, good, bad = messy
  for mode in ("embed", "predict"):
    result = inference.run(mode, export_dir, str(root), "train",
                           str(tmp_path / mode))
    assert sorted(result.files) == sorted(good)
    with open(tmp_path / mode / "skipped.txt", encoding="utf-8") as f:
      listed = dict(line.rstrip("\n").split("\t") for line in f)
    assert sorted(listed) == sorted(bad)
    for path, expected in bad.items():
      assert expected in listed[path], (path, listed[path])


def test_strict_embed_names_a_file_that_is_not_utf8(export_dir, tmp_path):
  root = tmp_path / "data"
  _latin1_folder(root)
  with pytest.raises(inference.InferenceError,
                     match=r"caf\\xe9\.jpg cannot be used \(file name is not "
                     "valid UTF-8"):
    inference.run("embed", export_dir, str(root), "train",
                  str(tmp_path / "out"), strict=True)
  assert not os.path.exists(tmp_path / "out")
