"""Input data: augmentations, image folders and tf.data pipelines."""

# The dataset bundled inside the package (a small CIFAR-10 sample), so that
# every stage runs offline on a fresh machine.
BUNDLED_DATASET = "cifar10_sample"
# An image folder ROOT/<split>/<class>/<image> (or ROOT/<split>/<image>).
IMAGE_FOLDER = "image_folder"
