"""SimCLRv2's memory: a moving-average network whose projections are negatives.

SimCLRv2 (Chen et al. 2020b, arXiv 2006.10029, section 2, "we also
incorporate the memory mechanism from MoCo") keeps a second copy of the
encoder and projection head whose weights are an exponential moving average
of the online network's (MoCo, He et al. 2019, arXiv 1911.05722, eq. 2):

  theta_m <- m theta_m + (1 - m) theta_online,   m = 0.999 in the paper,

and a FIFO queue of the L2-normalised projections that this memory network
gave of past batches. The online projections are then contrasted against the
other view (positive), the rest of the global batch and the queue (extra
negatives; `simclr_tf.losses.nt_xent(..., extra_negatives=...)`). The paper
uses a queue of 65536 keys and reports about +1% for linear evaluation and
for fine-tuning on 1% of the labels. The official code never released this
part; this is our implementation of the text.

One training step (MoCo order; `simclr_tf.tasks.Pretrain` drives it):
  1. `contrast_kwargs(net, images)`: moving-average update of the memory
     network from the online weights as they are now (after the previous
     step's optimizer update), then keys = normalised projections of both
     views by the memory network, and the queue as it stands (the keys of
     PAST batches) with its validity mask;
  2. the task computes NT-Xent with those extra negatives;
  3. `enqueue(keys)`: the global batch's keys replace the oldest ones.
The current batch's keys are never negatives in their own step (they
contain each image's own memory projection, a false negative).

Everything here works in a replica context of any `tf.distribute` strategy
(and outside any strategy) and inside `tf.function`. The object is a Keras
layer whose checkpoint dependencies are every memory-network weight (by
path), the queue, its write pointer and its fill count, so
`tf.train.Checkpoint(memory=...)` saves all of them and a resumed run
continues with the same memory network and queue. The memory network is never exported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import tensorflow as tf

from simclr_tf.checkpoints import VariablesByPath
from simclr_tf.models.config import ModelConfig
from simclr_tf.models.simclr import SimCLR


def relative_path(variable, model: keras.Model) -> str:
  """A variable's path without its model's name: 'resnet/stem/conv_0/kernel'.

  The online network's variables start with 'simclr/', the memory
  network's with 'memory_net/'; the rest of the path is the same.

  Args:
    variable: a Keras variable of `model`.
    model: the model that owns it.
  Returns:
    The path after '<model.name>/' (after the first '/' if the path does not
    start with the model's name).
  """
  path = variable.path
  prefix = model.name + "/"
  if path.startswith(prefix):
    return path[len(prefix):]
  return path.split("/", 1)[-1]


class Memory(keras.layers.Layer):
  """Moving-average network + FIFO queue of its keys (SimCLRv2, section 2).

  Batch norm in the memory network. The memory network runs its batch norm
  in training mode, on the statistics of the current (global, with
  `global_bn`) batch, exactly like the online network; MoCo's key encoder
  and BYOL's target network do the same. Inference mode would normalise
  with moving statistics that describe neither network well (the online
  network's moving averages lag its weights, and a 0.999 average of them
  lags much more), which spoils the keys early in training. MoCo shuffles
  the batch before its key encoder so that a query and its positive key do
  not share per-device batch statistics; here the memory keys are never
  positives (they are only negatives, and only in later steps), and batch
  statistics are global across replicas with `global_bn`, so no shuffling
  is needed.

  Consequently the moving average covers the TRAINABLE variables only
  (kernels, gamma, beta). The memory network's BN moving mean/variance are
  left to its own batch norm layers, which update them from the memory
  network's own activations when it runs in training mode: they are the
  right statistics for its weights, they are never used to compute keys
  (training mode), and averaging the online network's statistics into them
  as well would mix two estimators of different activations.
  `initialize_from` copies every variable, statistics included.

  Distribution. The moving-average update runs in cross-replica context
  (`ReplicaContext.merge_call` + `strategy.extended.update`), so every
  replica's copy of a memory weight gets the same value. The queue
  variables have `aggregation=ONLY_FIRST_REPLICA`: every replica writes
  the all-gathered global batch of keys, and the first replica's write is
  mirrored to all, so the queue is identical on every replica by
  construction. (With `global_bn=False` the memory network's BN moving
  statistics differ across replicas, as the online network's do; they do
  not enter the keys.)

  Args:
    model_config: the online network's `ModelConfig`; the memory network
      has its backbone and projection head (no supervised head).
    image_size: input size, to build the memory network's variables.
    size: number of keys in the queue, K > 0 (paper: 65536).
    momentum: moving-average momentum m in [0, 1] (paper: 0.999).
    name: layer name.
    **kwargs: other Layer arguments.
  """

  def __init__(self, model_config: ModelConfig, image_size: int, size: int,
               momentum: float, name: str = "memory", **kwargs):
    super().__init__(name=name, **kwargs)
    if size < 1:
      raise ValueError(f"Memory size must be positive (0 means no memory: "
                       f"do not build one). Received: size={size}")
    if not 0.0 <= momentum <= 1.0:
      raise ValueError(f"Memory momentum must be in [0, 1]. Received: "
                       f"momentum={momentum}")
    if isinstance(model_config, dict):
      model_config = ModelConfig.from_dict(model_config)
    self.model_config = model_config
    self.image_size = int(image_size)
    self.size = int(size)
    self.momentum = float(momentum)
    self.memory_net = SimCLR(
        dataclasses.replace(model_config, num_classes=0),
        name="memory_net")
    dummy = tf.zeros([1, self.image_size, self.image_size, 3])
    self.key_dim = int(
        self.memory_net(dummy, training=False)["proj_head_output"].shape[-1])
    # Keras 3 does not make the layers it keeps in Python lists (the block
    # groups, the projection layers) checkpoint dependencies, so
    # `tf.train.Checkpoint` would miss most memory weights; this tf.Module
    # names every one of them by its path instead.
    self.memory_net_weights = VariablesByPath(
        {relative_path(v, self.memory_net): v
         for v in self.memory_net.variables})
    # The queue: [K, D] keys, the next slot to write and how many slots hold
    # a key (K once the queue has wrapped around).
    self.queue = self.add_weight(
        shape=(self.size, self.key_dim), initializer="zeros",
        dtype="float32", trainable=False, autocast=False,
        aggregation="only_first_replica", name="queue")
    self.pointer = self.add_weight(
        shape=(), initializer="zeros", dtype="int64", trainable=False,
        autocast=False, aggregation="only_first_replica", name="pointer")
    self.count = self.add_weight(
        shape=(), initializer="zeros", dtype="int64", trainable=False,
        autocast=False, aggregation="only_first_replica", name="count")
    self.built = True

  # --- Weights ---------------------------------------------------------------

  def _pairs(self, net: keras.Model, trainable_only: bool) -> list:
    """(memory variable, online variable) pairs, matched by relative path."""
    online = {relative_path(v, net): v for v in net.variables}
    source = (self.memory_net.trainable_variables if trainable_only
              else self.memory_net.variables)
    pairs = []
    for var in source:
      path = relative_path(var, self.memory_net)
      if path not in online:
        raise ValueError(
            f"The online network has no weight {path!r} for the memory "
            f"network; build the memory from the same ModelConfig.")
      other = online[path]
      if tuple(other.shape) != tuple(var.shape):
        raise ValueError(
            f"Weight {path!r} has shape {tuple(other.shape)} in the online "
            f"network but {tuple(var.shape)} in the memory network.")
      pairs.append((var, other))
    return pairs

  def initialize_from(self, net: keras.Model) -> None:
    """Copies every weight of `net` (BN statistics included) into the memory.

    Call once on a fresh run, after `net` is built (and restored from
    --init_from), in cross-replica context (e.g. under `strategy.scope()`).
    A restore from a checkpoint then overwrites it with the saved memory.

    Args:
      net: the online `SimCLR` network.
    """
    for var, other in self._pairs(net, trainable_only=False):
      var.assign(tf.cast(other, var.dtype))

  def ema_update(self, net: keras.Model) -> None:
    """theta_m <- m theta_m + (1 - m) theta_online (MoCo eq. 2).

    Over the trainable variables only; see the class docstring for the BN
    statistics. Works in replica context (via `merge_call`) and in
    cross-replica context.

    Args:
      net: the online network.
    """
    pairs = [(var.value, other.value)
             for var, other in self._pairs(net, trainable_only=True)]
    m = self.momentum

    def update(var, online):
      online = tf.cast(online, var.dtype)
      return var.assign(m * var + (1.0 - m) * online)

    def merge_fn(strategy):
      for var, online in pairs:
        strategy.extended.update(var, update, args=(online,), group=False)

    if tf.distribute.in_cross_replica_context():
      merge_fn(tf.distribute.get_strategy())
    else:
      tf.distribute.get_replica_context().merge_call(merge_fn)

  # --- Keys and queue ----------------------------------------------------------

  def keys(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
    """L2-normalised projections of `images` by the memory network.

    Args:
      images: [N, H, W, 3] images in [0, 1].
      training: batch norm mode of the memory network (see class docstring).
    Returns:
      [N, D] float32 keys, without gradient.
    """
    proj = self.memory_net(images, training=training)["proj_head_output"]
    return tf.stop_gradient(
        tf.math.l2_normalize(tf.cast(proj, tf.float32), axis=-1))

  def valid_mask(self) -> tf.Tensor:
    """[K] bool, True for the queue slots that hold a key."""
    return tf.range(self.size, dtype=tf.int64) < tf.convert_to_tensor(
        self.count)

  def contrast_kwargs(self, net: keras.Model, images: tf.Tensor,
                      training: bool = True) -> tuple[dict, tf.Tensor]:
    """Updates the memory network, then gives the queue and this batch's keys.

    Args:
      net: the online network (its weights as they are now).
      images: [2 B_local, H, W, 3], both views of the local batch.
      training: True in a training step: moving-average update first and
        batch norm in training mode. False: neither.
    Returns:
      (kwargs for `losses.nt_xent`: {'extra_negatives': [K, D] float32 queue
       as it was before this step, 'extra_negatives_mask': [K] bool},
       keys [2 B_local, D] float32 to pass to `enqueue` after the loss).
    """
    if training:
      self.ema_update(net)
    keys = self.keys(images, training=training)
    # Read before `enqueue` writes (program order = execution order for
    # stateful ops in tf.function).
    queue = tf.identity(tf.convert_to_tensor(self.queue))
    return ({"extra_negatives": queue,
             "extra_negatives_mask": self.valid_mask()}, keys)

  def enqueue(self, keys: tf.Tensor) -> None:
    """Pushes the GLOBAL batch's keys into the FIFO queue (wraps around).

    In a replica context with several replicas the keys are all-gathered
    (replica order), so every replica writes the same [2 B_global, D] block.
    Key j of the block goes to slot (pointer + j) mod K; when the block is
    longer than the queue only its last K keys are kept.

    Args:
      keys: [N_local, D] keys from `contrast_kwargs`.
    """
    keys = tf.stop_gradient(tf.cast(keys, tf.float32))
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      keys = ctx.all_gather(keys, axis=0)               # [N_global, D]
    n = tf.shape(keys, out_type=tf.int64)[0]
    size = tf.constant(self.size, tf.int64)
    first = tf.maximum(n - size, 0)                     # drop the oldest
    kept = keys[first:]
    slots = (tf.convert_to_tensor(self.pointer) + first +
             tf.range(n - first, dtype=tf.int64)) % size
    self.queue.value.scatter_update(tf.IndexedSlices(kept, slots))
    self.pointer.assign((tf.convert_to_tensor(self.pointer) + n) % size)
    self.count.assign(tf.minimum(tf.convert_to_tensor(self.count) + n, size))

  def fill_level(self) -> tf.Tensor:
    """Fraction of the queue that holds keys: scalar float32 in [0, 1]."""
    return (tf.cast(tf.convert_to_tensor(self.count), tf.float32) /
            float(self.size))

  def get_config(self) -> dict[str, Any]:
    config = super().get_config()
    config.update({"model_config": dataclasses.asdict(self.model_config),
                   "image_size": self.image_size, "size": self.size,
                   "momentum": self.momentum})
    return config
