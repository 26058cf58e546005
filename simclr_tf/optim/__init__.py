"""Optimizers and learning-rate schedules of SimCLR.

`simclr_tf.optim.scaling` (the learning-rate scaling rule) imports no
TensorFlow; the optimizer and schedule are imported on first use.
"""

from simclr_tf import lazy

_LAZY = {
    "LARS": "simclr_tf.optim.lars",
    "WarmUpAndCosineDecay": "simclr_tf.optim.schedules",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy.attributes(__name__, _LAZY)
