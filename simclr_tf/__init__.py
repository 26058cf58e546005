"""simclr-tf: SimCLRv2 (Chen et al., NeurIPS 2020) in Keras 3 / TensorFlow.

The public API (see docs/api.md):

  pretrain, finetune, distill   SimCLRv2's three stages -> TrainResult
  evaluate, embed, predict      use any export
  load_export                   an export as a trainable Keras model
  import_official               a checkpoint of the official SimCLR code
  run                           a `Config`, as the command line runs it
  Config, ModelConfig           run and architecture configurations
  SimCLR, ResNet, ProjectionHead, SupervisedHead, LARS,
  WarmUpAndCosineDecay          the Keras layers, model and optimizer

Names are loaded on first use: `import simclr_tf` imports no TensorFlow, so
it can choose TensorFlow's oneDNN setting for this CPU first.
"""

import logging as _logging

from simclr_tf import cpu as _cpu
from simclr_tf import lazy as _lazy

__version__ = "0.2.0"

# Before anything imports TensorFlow: oneDNN on where it is faster than
# TensorFlow's default (simclr_tf.cpu). The CLI's --onednn revisits it.
ONEDNN = _cpu.configure_onednn()
if ONEDNN.conflict:
  _logging.getLogger("simclr_tf").warning(ONEDNN.describe())

_PUBLIC = {
    "pretrain": "simclr_tf.api",
    "finetune": "simclr_tf.api",
    "distill": "simclr_tf.api",
    "evaluate": "simclr_tf.api",
    "embed": "simclr_tf.api",
    "predict": "simclr_tf.api",
    "class_names": "simclr_tf.api",
    "load_export": "simclr_tf.api",
    "import_official": "simclr_tf.api",
    "export_for_deployment": "simclr_tf.api",
    "run": "simclr_tf.api",
    "TrainResult": "simclr_tf.api",
    "ArgumentError": "simclr_tf.api",
    "WriteError": "simclr_tf.atomic",
    "Config": "simclr_tf.config",
    "ModelConfig": "simclr_tf.models.config",
    "SimCLR": "simclr_tf.models.simclr",
    "ResNet": "simclr_tf.models.resnet",
    "ProjectionHead": "simclr_tf.models.heads",
    "SupervisedHead": "simclr_tf.models.heads",
    "LARS": "simclr_tf.optim.lars",
    "WarmUpAndCosineDecay": "simclr_tf.optim.schedules",
}

__all__ = sorted(_PUBLIC) + ["ONEDNN", "__version__"]


__getattr__ = _lazy.attributes(__name__, _PUBLIC)[0]


def __dir__():
  return __all__
