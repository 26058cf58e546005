"""Writes a SimCLR model as a reusable, fine-tunable SavedModel.

The export follows TF Hub's "reusable SavedModel" interface, so that
`hub.KerasLayer` (tf-keras) and `keras.layers.TFSMLayer` (Keras 3) both load
it and can fine-tune it:

  obj(images, training=False) -> dict of named float32 outputs, traced for
                                  training=True (batch-norm statistics update)
                                  and training=False;
  obj.variables, obj.trainable_variables, obj.regularization_losses;
  obj.serve(images) and obj.train(images): the same in inference and
                                  training mode, the endpoints of
                                  keras.layers.TFSMLayer;
  signature 'serving_default': images -> the same dict, inference mode.

Images are float32 in [0, 1], NHWC, any batch and spatial size. The model's
architecture and the structural path of every variable are written beside
the graph (`assets.extra/simclr_tf.json`) so the next stage rebuilds the same
Keras model and restores every weight by path, without tensor names.

The weights are saved once, as `obj.variables` (the Keras model is not
tracked by the root object: the traced functions capture its variables and
the manifest names them).

Exports are written to a temporary folder and moved into place
(`simclr_tf.atomic.write_dir`), so a kill never leaves a half-written
`saved_model/` and the previous export stays usable until the new one is
complete. What a killed export leaves behind (its temporary folder, or the
previous export set aside) is deleted by the next export that completes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import tensorflow as tf

from simclr_tf import atomic
from simclr_tf.models import batch_norm, recompute
from simclr_tf.models.config import ModelConfig
from simclr_tf.models.simclr import SimCLR, build_float32, copy_weights

META_DIR = "assets.extra"
META_FILE = "simclr_tf.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ExportMeta:
  """What an export carries besides its graph."""

  model_config: ModelConfig
  variable_paths: tuple        # order of `obj.variables`
  image_size: int
  class_names: tuple = ()
  train_mode: str = ""
  global_step: int = 0
  format_version: int = FORMAT_VERSION

  def to_json(self) -> str:
    values = dataclasses.asdict(self)
    values["model_config"] = dataclasses.asdict(self.model_config)
    return json.dumps(values, indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ExportMeta":
    values = json.loads(text)
    values["model_config"] = ModelConfig.from_dict(values["model_config"])
    values["variable_paths"] = tuple(values["variable_paths"])
    values["class_names"] = tuple(values.get("class_names", ()))
    return cls(**values)


def float32_copy(model: SimCLR, image_size: int) -> SimCLR:
  """A float32, unsynchronised-BN copy of `model` with the same weights.

  Exports compute in float32 whatever precision training used, and their
  outputs are exactly those of this copy.
  """
  copy = build_float32(model.model_config, image_size, name=model.name)
  copy_weights(model, copy)
  return copy


class _Reusable(tf.__internal__.tracking.AutoTrackable):
  """The root object of the export (TF Hub reusable SavedModel)."""

  def __init__(self, model: SimCLR):
    super().__init__()
    self.variables = [v.value for v in model.variables]
    self.trainable_variables = [v.value for v in model.trainable_variables]
    self.regularization_losses = []

    spec = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
    # The network is traced once per mode, here, into `forward` (which is not
    # an attribute, so not saved as a function of its own). Every endpoint
    # calls those two traces as they are. `tf.saved_model.save` traces the
    # functions of the root again (inside a save, a trace made outside one
    # does not match), so endpoints that called the network would trace it
    # again each; these retrace only a call.
    forward = tf.function(
        lambda images, training: model(images, training=training))
    # The plain batch norm, ReLU, convolution and block ops (no recompute,
    # which saves memory in our training loop but would add custom gradients
    # per block to the SavedModel).
    with batch_norm.relu_outputs_kept(), recompute.blocks_kept():
      traced = {training: forward.get_concrete_function(spec, training)
                for training in (True, False)}

    def call(images, training=False):
      return traced[bool(training)](tf.convert_to_tensor(images, tf.float32))

    self.__call__ = tf.function(call)
    for training in (True, False):
      self.__call__.get_concrete_function(spec, training=training)
    # Endpoints for keras.layers.TFSMLayer(call_endpoint="serve",
    # call_training_endpoint="train") under Keras 3.
    self.serve = tf.function(lambda images: traced[False](images),
                             input_signature=[spec])
    self.train = tf.function(lambda images: traced[True](images),
                             input_signature=[spec])


def export_saved_model(model: SimCLR, export_dir: str, image_size: int,
                       class_names: Sequence[str] = (), train_mode: str = "",
                       global_step: int = 0) -> ExportMeta:
  """Writes `model` to `export_dir` atomically; returns what it recorded."""
  model = float32_copy(model, image_size)
  root = _Reusable(model)
  meta = ExportMeta(
      model_config=model.model_config,
      variable_paths=tuple(v.path for v in model.variables),
      image_size=image_size, class_names=tuple(class_names),
      train_mode=train_mode, global_step=int(global_step))

  def write(staging):
    tf.saved_model.save(root, staging,
                        signatures={"serving_default": root.serve})
    os.makedirs(os.path.join(staging, META_DIR), exist_ok=True)
    with open(os.path.join(staging, META_DIR, META_FILE), "w") as f:
      f.write(meta.to_json())

  atomic.write_dir(export_dir, write)
  return meta
