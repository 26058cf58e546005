"""The SimCLRv2 network: ResNet encoder, projection head, supervised head.

One architecture serves all three stages; `ModelConfig` says which parts
exist. `call` returns a dict of named outputs (never tensor names), the same
keys the SavedModel export exposes.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from simclr_tf.models.config import ModelConfig
from simclr_tf.models.heads import ProjectionHead, SupervisedHead
from simclr_tf.models.resnet import ResNet


def proj_layer_key(j: int) -> str:
  """Output key of projection-head layer j (1-based)."""
  return f"proj_head_layer_{j}"


@keras.saving.register_keras_serializable(package="simclr_tf")
class SimCLR(keras.Model):
  """Encoder + projection head (+ supervised head) of SimCLRv2.

  Outputs of `call(images, training)`:
    the backbone's named outputs (`initial_conv` ... `final_avg_pool`);
    `default` (= `final_avg_pool`), `proj_head_input` (= the encoder output),
    `proj_head_layer_j` for every kept projection layer j, `proj_head_output`
    (the last kept layer's output) and `logits_sup` when a supervised head
    exists. Images are in [0, 1], NHWC.

  The encoder and projection head take the model's dtype policy (the global
  one unless `dtype` is given, which is how `keras.saving.load_model`
  restores a saved model's); the supervised head always computes float32.
  """

  def __init__(self, model_config: ModelConfig, name="simclr", **kwargs):
    super().__init__(name=name, **kwargs)
    self.model_config = model_config
    c = model_config
    self.backbone = ResNet(
        depth=c.resnet_depth, width_multiplier=c.width_multiplier,
        sk_ratio=c.sk_ratio, se_ratio=c.se_ratio, cifar_stem=c.cifar_stem,
        batch_norm_decay=c.batch_norm_decay, global_bn=c.global_bn,
        recompute_blocks=c.recompute_blocks, name="resnet",
        dtype=self.dtype_policy)
    self.proj_head = ProjectionHead(
        mode=c.proj_head_mode, num_layers=c.num_proj_layers,
        out_dim=c.proj_out_dim, num_layers_kept=c.proj_layers_kept,
        batch_norm_decay=c.batch_norm_decay, global_bn=c.global_bn,
        name="proj_head", dtype=self.dtype_policy)
    self.sup_head = (SupervisedHead(c.num_classes, name="head_supervised")
                     if c.num_classes else None)

  def build(self, input_shape):
    # Builds every sublayer from the image shape alone, so that
    # `keras.saving.load_model` (which calls `build` with the saved input
    # shape) creates the variables under this model's name, with the paths
    # a call creates (`simclr/resnet/...`).
    self.backbone.build(input_shape)
    features = (input_shape[0], self.backbone.output_dim)
    self.proj_head.build(features)
    if self.sup_head is not None:
      hidden_shapes = self.proj_head.compute_output_shape(features)
      self.sup_head.build(hidden_shapes[self.model_config.sup_head_input])

  def call(self, images, training=False):
    outputs = dict(self.backbone(images, training=training))
    hiddens = self.proj_head(outputs["final_avg_pool"], training=training)
    outputs["default"] = outputs["final_avg_pool"]
    outputs["proj_head_input"] = hiddens[0]
    for j, hidden in enumerate(hiddens[1:], start=1):
      outputs[proj_layer_key(j)] = hidden
    outputs["proj_head_output"] = hiddens[-1]
    if self.sup_head is not None:
      features = hiddens[self.model_config.sup_head_input]
      if self.model_config.sup_head_stop_gradient:
        features = tf.stop_gradient(features)
      outputs["logits_sup"] = self.sup_head(features)
    return outputs

  def build_for(self, image_size: int) -> "SimCLR":
    """Creates every variable by calling the model once on a dummy batch."""
    self(tf.zeros([1, image_size, image_size, 3]), training=False)
    return self

  def get_config(self):
    """The constructor arguments: `model_config` as a plain dict, plus the
    Layer ones (name, trainable, dtype)."""
    config = super().get_config()
    config["model_config"] = dataclasses.asdict(self.model_config)
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    model_config = config.pop("model_config")
    if not isinstance(model_config, ModelConfig):
      model_config = ModelConfig.from_dict(model_config)
    return cls(model_config, **config)


def build_model(model_config: ModelConfig, image_size: int) -> SimCLR:
  return SimCLR(model_config).build_for(image_size)


def build_float32(model_config: ModelConfig, image_size: int,
                  name: str = "simclr") -> SimCLR:
  """A float32 model with per-replica batch norm that recomputes nothing,
  whatever the dtype policy.

  What exports compute and what loaders rebuild, whatever precision and
  recompute the run trained with (an export's architecture says neither).

  Args:
    model_config: the architecture (`global_bn` and `recompute_blocks` are
      turned off).
    image_size: input size, to create the variables.
    name: the model's name (the first part of every variable path).
  Returns:
    The built model.
  """
  saved = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    return SimCLR(dataclasses.replace(model_config, global_bn=False,
                                      recompute_blocks=0),
                  name=name).build_for(image_size)
  finally:
    keras.config.set_dtype_policy(saved)


def freeze_before_block(model: SimCLR, fine_tune_after_block: int) -> None:
  """Freezes everything before block group K (`--fine_tune_after_block`).

  -1 trains everything; 0 freezes the stem; K in 1..3 also freezes block
  groups 1..K; 4 freezes the whole encoder and projection head, so only the
  supervised head trains (linear evaluation). Frozen Keras batch-norm layers
  run in inference mode, so their statistics do not move either.
  """
  k = fine_tune_after_block
  if k < 0:
    return
  model.backbone.stem.trainable = False
  for group in model.backbone.block_groups[:k]:
    group.trainable = False
  if k >= 4:
    model.proj_head.trainable = False


def _kernels(layer) -> list:
  """Kernels of the convolution and dense layers under `layer`."""
  found = []
  for sub in layer._flatten_layers(include_self=True, recursive=True):
    if isinstance(sub, (keras.layers.Conv2D, keras.layers.Dense,
                        keras.layers.DepthwiseConv2D)):
      found.append(sub.kernel)
  return found


@dataclasses.dataclass(frozen=True)
class DecayGroups:
  """Which trainable variables get weight decay and LARS adaptation.

  Selected by layer type, not by name: kernels of convolutions and dense
  layers are decayed; batch-norm parameters and biases never are. With LARS
  the encoder/projection kernels are decayed inside the optimizer (and
  adapted); the supervised head's kernel gets its L2 term in the loss and is
  not adapted, as in the official code. Other optimizers take every kernel's
  L2 term in the loss.
  """

  lars_decayed: tuple       # decayed and adapted by LARS
  loss_l2: tuple            # L2 term added to the loss
  excluded: tuple           # neither decayed nor adapted


def decay_groups(model: SimCLR, optimizer_name: str) -> DecayGroups:
  trainable = list(model.trainable_variables)
  trainable_ids = {id(v) for v in trainable}
  head_ids = ({id(v) for v in model.sup_head.weights}
              if model.sup_head is not None else set())
  kernels = [k for k in _kernels(model) if id(k) in trainable_ids]
  if optimizer_name == "lars":
    lars = tuple(k for k in kernels if id(k) not in head_ids)
    l2 = tuple(k for k in kernels if id(k) in head_ids)
  else:
    lars, l2 = (), tuple(kernels)
  chosen = {id(v) for v in lars + l2}
  excluded = tuple(v for v in trainable if id(v) not in chosen)
  return DecayGroups(lars_decayed=lars, loss_l2=l2, excluded=excluded)


def variables_by_path(model: keras.Model) -> dict:
  """Every variable of `model`, keyed by its structural path."""
  found = {}
  for v in model.variables:
    if v.path in found:
      raise ValueError(
          f"Two variables share the path {v.path!r}; layer names must be "
          "unique for weights to move between stages.")
    found[v.path] = v
  return found


def copy_weights(source: keras.Model, target: keras.Model) -> None:
  """Assigns every variable of `target` from `source`'s of the same path."""
  values = variables_by_path(source)
  for path, var in variables_by_path(target).items():
    if path not in values:
      raise ValueError(f"Received a source model without weight {path!r}.")
    var.assign(tf.cast(values[path], var.dtype))
