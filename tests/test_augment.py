"""Tests of simclr_tf.data.augment: constants, rates, determinism, shapes."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.data import augment
from simclr_tf.data import folder

N = 4000  # Draws per rate: the standard error of a rate is <= 0.008.
RATE_TOL = 0.03


def _draws(fn, image, n=N, salt=7):
  """fn(image, seed) for seeds (i, salt), i < n, stacked; runs in tf.data."""
  image = tf.constant(image, tf.float32)
  ds = tf.data.Dataset.range(n).map(
      lambda i: fn(image, tf.stack([i, tf.constant(salt, tf.int64)])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return next(iter(ds.batch(n))).numpy()


def _colour_image(h=4, w=4, rgb=(0.6, 0.3, 0.2)):
  return np.tile(np.asarray(rgb, np.float32), [h, w, 1])


def _is_gray(images):
  return (np.ptp(images, axis=-1).max(axis=(-1, -2)) < 1e-5)


def test_crop_box_area_and_aspect_ratio():
  def box(image_shape):
    return lambda _, seed: tf.cast(
        tf.stack(augment.sample_crop_box(image_shape, seed)), tf.float32)

  boxes = _draws(box(tf.constant([1000, 1000, 3])), np.zeros([1]), n=3000)
  _, _, h, w = boxes.T
  area, aspect = h * w / 1e6, w / h
  assert area.min() >= 0.08 - 1e-3 and area.max() <= 1.0
  assert area.min() < 0.15 and area.max() > 0.9
  assert aspect.min() >= 0.75 - 0.01 and aspect.max() <= 4 / 3 + 0.01
  assert aspect.min() < 0.77 and aspect.max() > 1.30
  # The whole image is the fall-back when no window fits.
  y, x, h, w = _draws(box(tf.constant([1000, 20, 3])), np.zeros([1]),
                      n=50).T
  assert (h == 1000).all() and (w == 20).all() and (y == 0).all()


def test_random_crop_output_in_range():
  image = np.random.RandomState(0).rand(37, 53, 3).astype(np.float32)
  out = _draws(lambda x, s: augment.random_crop_with_resize(x, 16, 24, s),
               image, n=200)
  assert out.shape == (200, 16, 24, 3)
  assert out.min() >= 0.0 and out.max() <= 1.0


def test_flip_rate():
  image = np.arange(8, dtype=np.float32).reshape([1, 8, 1]) / 8
  image = np.tile(image, [2, 1, 3])
  out = _draws(augment.random_flip, image)
  flipped = np.all(out == image[:, ::-1], axis=(1, 2, 3))
  same = np.all(out == image, axis=(1, 2, 3))
  assert np.all(flipped | same)
  assert abs(flipped.mean() - 0.5) < RATE_TOL


def test_grayscale_rate():
  out = _draws(lambda x, s: augment.random_color_jitter(x, 0.0, s),
               _colour_image())
  assert abs(_is_gray(out).mean() - augment.GRAYSCALE_PROB) < RATE_TOL
  assert augment.GRAYSCALE_PROB == 0.2


def test_jitter_rate():
  image = _colour_image()
  out = _draws(lambda x, s: augment.random_color_jitter(x, 1.0, s), image)
  coloured = out[~_is_gray(out)]
  changed = np.abs(coloured - image).max(axis=(1, 2, 3)) > 1e-4
  assert abs(changed.mean() - augment.COLOR_JITTER_PROB) < RATE_TOL
  assert augment.COLOR_JITTER_PROB == 0.8


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_color_jitter_constants(strength):
  """Brightness, saturation and hue, read off a constant-colour image.

  On a constant image contrast is the identity, brightness scales the HSV
  value, saturation scales the HSV saturation, hue shifts the HSV hue, and
  each of them leaves the other two HSV coordinates alone.
  """
  rgb = (0.5, 0.25, 0.15)  # No clipping: 0.5 * (1 + 0.8) < 1.
  image = _colour_image(rgb=rgb)
  out = _draws(lambda x, s: augment.color_jitter(x, strength, s), image,
               n=3000)
  hsv_in = tf.image.rgb_to_hsv(image[0, 0]).numpy()
  hsv = tf.image.rgb_to_hsv(out[:, 0, 0]).numpy()
  brightness = hsv[:, 2] / hsv_in[2]
  b = 0.8 * strength
  assert brightness.min() >= max(0, 1 - b) - 1e-3
  assert brightness.max() <= 1 + b + 1e-3
  assert brightness.min() < max(0, 1 - b) + 0.05
  assert brightness.max() > 1 + b - 0.05
  saturation = hsv[:, 1] / hsv_in[1]
  s = 0.8 * strength
  assert saturation.min() >= 1 - s - 1e-3
  assert saturation.max() <= min(1 + s, 1 / hsv_in[1]) + 1e-3
  assert saturation.min() < 1 - s + 0.05
  hue = (hsv[:, 0] - hsv_in[0] + 0.5) % 1.0 - 0.5
  h = 0.2 * strength
  assert np.abs(hue).max() <= h + 1e-3
  assert hue.min() < -h + 0.02 and hue.max() > h - 0.02


def test_contrast_factor_range():
  """Contrast, read off a two-tone gray image (brightness cancels out)."""
  image = np.tile(np.array([[0.4], [0.6]], np.float32)[:, None], [1, 1, 3])
  out = _draws(lambda x, s: augment.color_jitter(x, 0.5, s), image, n=3000)
  lo, hi = out[:, 0, 0, 0], out[:, 1, 0, 0]
  factor = ((hi - lo) / (hi + lo)) / (0.2 / 1.0)
  assert factor.min() >= 0.6 - 1e-3 and factor.max() <= 1.4 + 1e-3
  assert factor.min() < 0.65 and factor.max() > 1.35
  # A gray image stays gray: saturation and hue cannot colour it.
  assert _is_gray(out).all()


def test_blur_rate_sigma_and_kernel_size():
  side = 60
  image = np.zeros([side, side, 3], np.float32)
  image[side // 2, side // 2] = 1.0

  def blur_row(x, seed):
    out = augment.random_blur(x, seed)
    changed = tf.reduce_max(tf.abs(out - x)) > 0
    return tf.concat([out[side // 2, :, 0],
                      tf.cast(changed, tf.float32)[tf.newaxis]], 0)

  out = _draws(blur_row, image, n=3000)
  rows, blurred = out[:, :-1], out[:, -1] > 0
  assert abs(blurred.mean() - augment.BLUR_PROB) < RATE_TOL
  rows = rows[blurred]
  centre = rows[:, side // 2]
  ratio = rows[:, side // 2 + 1] / centre  # = exp(-1 / (2 sigma^2))
  sigma = np.sqrt(-1.0 / (2.0 * np.log(np.maximum(ratio, 1e-30))))
  assert sigma.max() <= 2.0 + 1e-2 and sigma.max() > 1.9
  assert sigma.min() < 0.3  # Small sigmas leave the impulse almost intact.
  extent = (rows > 0).sum(axis=1)
  kernel = 2 * (side // 20) + 1  # 10% of the side, odd.
  assert extent.max() == kernel and (extent <= kernel).all()
  assert int(augment.blur_kernel_size(224)) == 23
  assert int(augment.blur_kernel_size(32)) == 3


def test_gaussian_blur_keeps_constant_and_mass():
  image = np.full([20, 30, 3], 0.3, np.float32)
  out = augment.gaussian_blur(tf.constant(image), 1.5, 7).numpy()
  np.testing.assert_allclose(out, image, atol=1e-6)
  tiny = augment.gaussian_blur(tf.ones([1, 1, 3]), 1.0, 9)
  assert tiny.shape == (1, 1, 3)


OPS = {
    "crop": lambda x, s: augment.random_crop_with_resize(x, 24, 24, s),
    "flip": augment.random_flip,
    "jitter": lambda x, s: augment.color_jitter(x, 0.7, s),
    "colour": lambda x, s: augment.random_color_jitter(x, 1.0, s),
    "blur": lambda x, s: augment.random_blur(x, s, p=1.0),
    "train": lambda x, s: augment.preprocess_for_train(
        x, 32, 32, s, color_jitter_strength=1.0, blur=True),
    "finetune": lambda x, s: augment.preprocess_for_train(
        x, 32, 32, s, color_distort=False),
    "centre": lambda x, s: augment.center_crop(x, 24, 24),
    "eval": lambda x, s: augment.preprocess_for_eval(x, 32, 32),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_eager_and_tf_data_agree(name):
  fn = OPS[name]
  image = tf.constant(np.random.RandomState(1).rand(48, 40, 3), tf.float32)
  for i in range(3):
    seed = tf.constant([i, 3], tf.int64)
    eager = fn(image, seed).numpy()
    graph = next(iter(tf.data.Dataset.from_tensors((image, seed)).map(
        fn))).numpy()
    np.testing.assert_allclose(eager, graph, atol=1e-6)
    assert eager.dtype == np.float32


@pytest.mark.parametrize("shape", [(1, 1, 3), (1000, 20, 3), (20, 1000, 3),
                                   (5, 7, 1), (33, 33, 3)])
def test_odd_inputs(shape):
  image = tf.constant(np.random.RandomState(2).rand(*shape), tf.float32)
  seed = tf.constant([5, 6], tf.int64)
  for out in (augment.preprocess_for_train(image, 32, 32, seed, blur=True,
                                           color_jitter_strength=1.0),
              augment.preprocess_for_train(image, 32, 32, seed, crop=False),
              augment.preprocess_for_eval(image, 32, 32)):
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 1


def test_uint8_grayscale_and_rgba_inputs():
  rng = np.random.RandomState(3)
  gray = rng.randint(0, 256, [9, 9, 1]).astype(np.uint8)
  out = augment.preprocess_for_eval(tf.constant(gray), 16, 16)
  assert out.shape == (16, 16, 3) and _is_gray(out.numpy()[None]).all()
  rgba = rng.randint(0, 256, [9, 11, 4]).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
  image = folder.decode_image(tf.constant(buffer.getvalue()))
  np.testing.assert_allclose(image.numpy(), rgba[..., :3] / 255.0, atol=1e-6)
  out = augment.preprocess_for_train(image, 32, 32, tf.constant([1, 2]))
  assert out.shape == (32, 32, 3)


def test_determinism():
  image = tf.constant(np.random.RandomState(4).rand(40, 40, 3), tf.float32)

  def view(seed):
    return augment.preprocess_for_train(image, 32, 32, tf.constant(seed),
                                        color_jitter_strength=1.0,
                                        blur=True).numpy()

  np.testing.assert_array_equal(view([1, 2]), view([1, 2]))
  assert np.abs(view([1, 2]) - view([1, 3])).max() > 0.01
  assert np.abs(view([1, 2]) - view([2, 2])).max() > 0.01
