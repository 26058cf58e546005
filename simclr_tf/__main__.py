"""`python -m simclr_tf --mode=... --train_mode=...`: the command line."""

from simclr_tf.cli import entry_point

entry_point()
