"""SimCLR data augmentation with stateless, per-image randomness.

Every random function takes a `seed`: an int32 or int64 tensor of shape [2].
All randomness comes from `tf.random.stateless_*` / `tf.image.stateless_*`
ops, so an augmented view is a deterministic function of (image, seed): the
same in eager mode and inside `tf.data`, the same after a restart. Sub-seeds
are derived with `tf.random.experimental.stateless_split`.

Images are float32 tensors of shape [H, W, 3] with values in [0, 1] (uint8
images and single-channel images are accepted and converted); no mean / std
normalisation is applied. Every public function returns a float32 image with
values in [0, 1].

The constants follow the official SimCLR implementation
(github.com/google-research/simclr, `data_util.py`) and the papers
(SimCLR v1, arXiv 2002.05709, appendix A; SimCLR v2, arXiv 2006.10029).
"""

from __future__ import annotations

import tensorflow as tf

# Inception-style random crop (SimCLR v1 appendix A; data_util.py
# `distorted_bounding_box_crop` / `crop_and_resize`). The official code also
# asks the crop to cover at least 10% of the (whole-image) bounding box.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_MAX_ATTEMPTS = 100

# Colour distortion (data_util.py `color_jitter`, `random_color_jitter`):
# brightness, contrast and saturation vary by 0.8 * strength, hue by
# 0.2 * strength; jitter is applied with p=0.8, grayscale with p=0.2.
BRIGHTNESS_SCALE = 0.8
CONTRAST_SCALE = 0.8
SATURATION_SCALE = 0.8
HUE_SCALE = 0.2
COLOR_JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2

# Gaussian blur (SimCLR v1 appendix A; data_util.py `random_blur`): sigma
# uniform in [0.1, 2.0], kernel 10% of the image side, applied with p=0.5.
BLUR_SIGMA_RANGE = (0.1, 2.0)
BLUR_PROB = 0.5

# Evaluation: centre crop of 87.5% (data_util.py CROP_PROPORTION); images of
# 32 px or less (CIFAR) are used whole.
CROP_PROPORTION = 0.875
NO_CROP_MAX_SIDE = 32


def to_float_rgb(image: tf.Tensor) -> tf.Tensor:
  """Converts an image to float32 RGB in [0, 1].

  Args:
    image: [H, W, C] tensor, C in {1, 3} (static), uint8 or float in [0, 1].
  Returns:
    float32 tensor [H, W, 3].
  """
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.float32:
    image = tf.image.convert_image_dtype(image, tf.float32)
  if image.shape.rank == 3 and image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  return image


def _uniform(seed: tf.Tensor, low, high) -> tf.Tensor:
  """One float32 draw, uniform in [low, high)."""
  return tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high,
                                     dtype=tf.float32)


def _bernoulli(seed: tf.Tensor, p: float) -> tf.Tensor:
  """A boolean scalar that is True with probability p."""
  return _uniform(seed, 0.0, 1.0) < p


def _split(seed: tf.Tensor, num: int) -> tf.Tensor:
  """`num` independent sub-seeds of `seed`, shape [num, 2]."""
  return tf.random.experimental.stateless_split(seed, num)


def sample_crop_box(image_shape: tf.Tensor, seed: tf.Tensor):
  """Samples an Inception-style crop window.

  Args:
    image_shape: int32 tensor [3] (height, width, channels).
    seed: shape [2] seed.
  Returns:
    (offset_y, offset_x, crop_height, crop_width) as int32 scalars. The area
    fraction is in CROP_AREA_RANGE and the aspect ratio (w/h) in
    CROP_ASPECT_RATIO_RANGE up to integer rounding; when no window satisfies
    both within CROP_MAX_ATTEMPTS tries, the whole image.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=seed,
      min_object_covered=CROP_MIN_OBJECT_COVERED,
      aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
      area_range=CROP_AREA_RANGE,
      max_attempts=CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  return begin[0], begin[1], size[0], size[1]


def _resize(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """Bicubic resize to [height, width, 3], clipped to [0, 1]."""
  image = tf.image.resize(image, [height, width], method="bicubic")
  return tf.clip_by_value(image, 0.0, 1.0)


def random_crop_with_resize(image: tf.Tensor, height: int, width: int,
                            seed: tf.Tensor) -> tf.Tensor:
  """Random Inception-style crop, then bicubic resize.

  Args:
    image: [H, W, 3] image.
    height, width: output size.
    seed: shape [2] seed.
  Returns:
    float32 [height, width, 3] in [0, 1].
  """
  image = to_float_rgb(image)
  y, x, h, w = sample_crop_box(tf.shape(image), seed)
  image = tf.slice(image, [y, x, 0], [h, w, 3])
  return _resize(image, height, width)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Horizontal flip with probability 0.5.

  Args:
    image: [H, W, 3] image.
    seed: shape [2] seed.
  Returns:
    The image, flipped left-right or not.
  """
  image = to_float_rgb(image)
  return tf.cond(_bernoulli(seed, 0.5),
                 lambda: tf.image.flip_left_right(image),
                 lambda: image)


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """Grayscale image with 3 equal channels.

  Args:
    image: [H, W, 3] image.
  Returns:
    [H, W, 3] image whose channels are the luma of `image`.
  """
  return tf.tile(tf.image.rgb_to_grayscale(to_float_rgb(image)), [1, 1, 3])


def color_jitter(image: tf.Tensor, strength: float,
                 seed: tf.Tensor) -> tf.Tensor:
  """Brightness, contrast, saturation and hue jitter in a random order.

  Args:
    image: [H, W, 3] image.
    strength: colour jitter strength s (SimCLR: 1.0 on ImageNet, 0.5 on
      CIFAR-10).
    seed: shape [2] seed.
  Returns:
    The jittered image. Brightness multiplies by a factor uniform in
    [max(0, 1 - 0.8s), 1 + 0.8s]; contrast and saturation use factors
    uniform in [1 - 0.8s, 1 + 0.8s]; hue shifts by a delta uniform in
    [-0.2s, 0.2s]. The four operations run in an order drawn per image, and
    the result is clipped to [0, 1] after each.
  """
  image = to_float_rgb(image)
  strength = tf.cast(strength, tf.float32)
  seeds = _split(seed, 5)
  brightness = BRIGHTNESS_SCALE * strength
  contrast = CONTRAST_SCALE * strength
  saturation = SATURATION_SCALE * strength
  hue = HUE_SCALE * strength
  b_factor = _uniform(seeds[0], tf.maximum(0.0, 1.0 - brightness),
                      1.0 + brightness)
  c_factor = _uniform(seeds[1], 1.0 - contrast, 1.0 + contrast)
  s_factor = _uniform(seeds[2], 1.0 - saturation, 1.0 + saturation)
  h_delta = _uniform(seeds[3], -hue, hue)
  # A random permutation of the 4 operations, one per image.
  order = tf.argsort(tf.random.stateless_uniform([4], seed=seeds[4]))

  branches = [
      lambda x: x * b_factor,
      lambda x: tf.image.adjust_contrast(x, c_factor),
      lambda x: tf.image.adjust_saturation(x, s_factor),
      lambda x: tf.image.adjust_hue(x, h_delta),
  ]

  def step(i, x):
    x = tf.switch_case(order[i], [lambda f=f: f(x) for f in branches])
    return i + 1, tf.clip_by_value(x, 0.0, 1.0)

  # A while loop traces each operation once (not once per position).
  _, image = tf.while_loop(lambda i, _: i < 4, step, (tf.constant(0), image),
                           shape_invariants=(tf.TensorShape([]),
                                             image.shape),
                           maximum_iterations=4)
  return image


def random_color_jitter(image: tf.Tensor, strength: float,
                        seed: tf.Tensor) -> tf.Tensor:
  """SimCLR colour distortion: jitter with p=0.8, then grayscale with p=0.2.

  Args:
    image: [H, W, 3] image.
    strength: colour jitter strength (see `color_jitter`).
    seed: shape [2] seed.
  Returns:
    The distorted image.
  """
  image = to_float_rgb(image)
  seeds = _split(seed, 3)
  image = tf.cond(_bernoulli(seeds[0], COLOR_JITTER_PROB),
                  lambda: color_jitter(image, strength, seeds[1]),
                  lambda: image)
  return tf.cond(_bernoulli(seeds[2], GRAYSCALE_PROB),
                 lambda: to_grayscale(image),
                 lambda: image)


def blur_kernel_size(side) -> tf.Tensor:
  """Kernel size of the blur for an image side: 10% of it, made odd.

  Args:
    side: image height (int or int32 scalar tensor).
  Returns:
    int32 scalar 2 * (side // 20) + 1 (official: radius = (side // 10) // 2).
  """
  side = tf.cast(side, tf.int32)
  return 2 * (side // 20) + 1


def gaussian_blur(image: tf.Tensor, sigma, kernel_size) -> tf.Tensor:
  """Separable Gaussian blur with reflect padding.

  Args:
    image: [H, W, 3] image.
    sigma: standard deviation of the Gaussian, in pixels (float scalar).
    kernel_size: size of the kernel (int or int32 scalar tensor); an even
      size is rounded down to an odd one, and the radius is capped at
      min(H, W) - 1 so that reflect padding is possible.
  Returns:
    The blurred image, same shape.
  """
  image = to_float_rgb(image)
  shape = tf.shape(image)
  radius = tf.cast(kernel_size, tf.int32) // 2
  radius = tf.maximum(0, tf.minimum(radius, tf.minimum(shape[0], shape[1]) - 1))
  sigma = tf.cast(sigma, tf.float32)
  x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  kernel = kernel / tf.reduce_sum(kernel)
  kernel_h = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
  kernel_v = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
  batch = image[tf.newaxis]
  batch = tf.pad(batch, [[0, 0], [radius, radius], [0, 0], [0, 0]],
                 mode="REFLECT")
  batch = tf.nn.depthwise_conv2d(batch, kernel_v, [1, 1, 1, 1], "VALID")
  batch = tf.pad(batch, [[0, 0], [0, 0], [radius, radius], [0, 0]],
                 mode="REFLECT")
  batch = tf.nn.depthwise_conv2d(batch, kernel_h, [1, 1, 1, 1], "VALID")
  blurred = tf.clip_by_value(batch[0], 0.0, 1.0)
  return tf.ensure_shape(blurred, image.shape)


def random_blur(image: tf.Tensor, seed: tf.Tensor,
                p: float = BLUR_PROB) -> tf.Tensor:
  """Gaussian blur with probability p, sigma uniform in [0.1, 2.0].

  Args:
    image: [H, W, 3] image.
    seed: shape [2] seed.
    p: probability of blurring.
  Returns:
    The image, blurred with a kernel of 10% of its height, or unchanged.
  """
  image = to_float_rgb(image)
  seeds = _split(seed, 2)
  sigma = _uniform(seeds[1], *BLUR_SIGMA_RANGE)
  size = blur_kernel_size(tf.shape(image)[0])
  return tf.cond(_bernoulli(seeds[0], p),
                 lambda: gaussian_blur(image, sigma, size),
                 lambda: image)


def center_crop(image: tf.Tensor, height: int, width: int,
                crop_proportion: float = CROP_PROPORTION) -> tf.Tensor:
  """Centre crop keeping the output aspect ratio, then bicubic resize.

  Args:
    image: [H, W, 3] image.
    height, width: output size.
    crop_proportion: fraction of the limiting side that the crop keeps.
  Returns:
    float32 [height, width, 3]. Images whose shorter side is at most 32 px
    are not cropped, only resized.
  """
  image = to_float_rgb(image)
  shape = tf.shape(image)
  img_h, img_w = shape[0], shape[1]
  fh = tf.cast(img_h, tf.float32)
  fw = tf.cast(img_w, tf.float32)
  aspect = width / height
  wider_request = aspect > fw / fh
  # The crop keeps `crop_proportion` of the side that limits the aspect ratio.
  crop_w = tf.where(wider_request, crop_proportion * fw,
                    crop_proportion * aspect * fh)
  crop_h = tf.where(wider_request, crop_proportion * fw / aspect,
                    crop_proportion * fh)
  crop_h = tf.clip_by_value(tf.cast(tf.math.rint(crop_h), tf.int32), 1, img_h)
  crop_w = tf.clip_by_value(tf.cast(tf.math.rint(crop_w), tf.int32), 1, img_w)
  small = tf.minimum(img_h, img_w) <= NO_CROP_MAX_SIDE
  crop_h = tf.where(small, img_h, crop_h)
  crop_w = tf.where(small, img_w, crop_w)
  offset_y = (img_h - crop_h + 1) // 2
  offset_x = (img_w - crop_w + 1) // 2
  image = tf.slice(image, [offset_y, offset_x, 0], [crop_h, crop_w, 3])
  return _resize(image, height, width)


def preprocess_for_train(image: tf.Tensor, height: int, width: int,
                         seed: tf.Tensor, color_jitter_strength: float = 0.5,
                         crop: bool = True, flip: bool = True,
                         color_distort: bool = True,
                         blur: bool = False) -> tf.Tensor:
  """One augmented training view.

  Pretraining uses crop, flip and colour distortion (and blur on ImageNet);
  fine-tuning and distillation use crop and flip only.

  Args:
    image: [H, W, C] image, uint8 or float in [0, 1], C in {1, 3}.
    height, width: output size.
    seed: shape [2] seed; the view is a deterministic function of it.
    color_jitter_strength: strength of the colour jitter.
    crop: random crop with resize (else a plain resize).
    flip: random horizontal flip.
    color_distort: random colour jitter and grayscale.
    blur: random Gaussian blur (p=0.5).
  Returns:
    float32 [height, width, 3] in [0, 1].
  """
  image = to_float_rgb(image)
  seeds = _split(seed, 4)
  if crop:
    image = random_crop_with_resize(image, height, width, seeds[0])
  else:
    image = _resize(image, height, width)
  if flip:
    image = random_flip(image, seeds[1])
  if color_distort:
    image = random_color_jitter(image, color_jitter_strength, seeds[2])
  if blur:
    image = random_blur(image, seeds[3])
  image = tf.reshape(image, [height, width, 3])
  return tf.clip_by_value(image, 0.0, 1.0)


def preprocess_for_eval(image: tf.Tensor, height: int,
                        width: int) -> tf.Tensor:
  """The evaluation view: centre crop (except for small images) and resize.

  Args:
    image: [H, W, C] image, uint8 or float in [0, 1], C in {1, 3}.
    height, width: output size.
  Returns:
    float32 [height, width, 3] in [0, 1].
  """
  image = center_crop(image, height, width)
  image = tf.reshape(image, [height, width, 3])
  return tf.clip_by_value(image, 0.0, 1.0)
