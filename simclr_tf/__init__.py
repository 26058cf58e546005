"""simclr-tf: SimCLRv2 (Chen et al., NeurIPS 2020) in Keras 3 / TensorFlow."""

import logging as _logging

from simclr_tf import cpu as _cpu

__version__ = "0.1.0"

# Before anything imports TensorFlow: oneDNN on where it is faster than
# TensorFlow's default (simclr_tf.cpu). `run.py --onednn` revisits it.
ONEDNN = _cpu.configure_onednn()
if ONEDNN.conflict:
  _logging.getLogger("simclr_tf").warning(ONEDNN.describe())
