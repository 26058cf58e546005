"""Input data: augmentations, image folders and tf.data pipelines."""
