"""Encoder and heads of SimCLRv2; `simclr.py` wires them into a Model.

`simclr_tf.models.config` (the architecture) imports no TensorFlow; the
layers are imported on first use, so reading a configuration stays light.
"""

from simclr_tf import lazy

_LAZY = {
    "ResNet": "simclr_tf.models.resnet",
    "ProjectionHead": "simclr_tf.models.heads",
    "SupervisedHead": "simclr_tf.models.heads",
    "SimCLR": "simclr_tf.models.simclr",
    "ModelConfig": "simclr_tf.models.config",
    "ArchOptions": "simclr_tf.models.config",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy.attributes(__name__, _LAZY)
