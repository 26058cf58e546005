"""The keras.Model that trains a SimCLR network with one stage's task.

`train_step` is the same for pretraining, fine-tuning and distillation: the
task returns the loss and per-example metrics, the learner adds the L2 term,
differentiates and applies the optimizer (which all-reduces gradients under
tf.distribute). `test_step` measures top-1/top-5 of the supervised head.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from simclr_tf import distribute
from simclr_tf import tasks as tasks_lib

EVAL_METRICS = ("loss", "top1", "top5")


class Learner(keras.Model):
  """Wraps `net` (a SimCLR model) and a task; owns the metric trackers.

  Args:
    net: the `SimCLR` network.
    task: the stage's task (`simclr_tf.tasks`); None for a learner that
      only evaluates (`test_step` is the same for every stage).
    l2_variables: variables whose L2 term is added to the loss.
    weight_decay: the L2 coefficient.
    name: model name.
    **kwargs: other `keras.Model` arguments.
  """

  def __init__(self, net, task, l2_variables=(), weight_decay=0.0,
               name="learner", **kwargs):
    super().__init__(name=name, **kwargs)
    self.net = net
    self.task = task
    self._l2_variables = list(l2_variables)
    self._weight_decay = float(weight_decay)
    names = task.metric_names + ("weight_decay",) if task is not None else ()
    self.train_trackers = [keras.metrics.Mean(name=n) for n in names]
    self.eval_trackers = [keras.metrics.Mean(name=n) for n in EVAL_METRICS]

  @property
  def metrics(self):
    return self.train_trackers + self.eval_trackers

  def call(self, inputs, training=False):
    if isinstance(inputs, dict):   # a dataset element
      inputs = inputs["image"] if "image" in inputs else inputs["view1"]
    return self.net(inputs, training=training)

  def _l2_term(self):
    if not self._l2_variables or not self._weight_decay:
      return tf.constant(0.0)
    return self._weight_decay * tf.add_n(
        [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in self._l2_variables])

  def train_step(self, data):
    if self.task is None:
      raise ValueError("Received: task=None; this learner only evaluates.")
    data = _unpack(data)
    variables = self.net.trainable_variables
    with tf.GradientTape() as tape:
      loss, values = self.task(self.net, data, training=True)
      l2 = self._l2_term()
      # The L2 term is the same on every replica: divide so the all-reduced
      # gradient counts it once.
      total = loss + l2 / tasks_lib.num_replicas()
      scaled = self.optimizer.scale_loss(total)
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    values = dict(values, loss=total * tasks_lib.num_replicas(),
                  weight_decay=l2)
    return self._update(self.train_trackers, values)

  def test_step(self, data):
    data = _unpack(data)
    logits = self.net(data["image"], training=False)["logits_sup"]
    values = tasks_lib.classification_metrics(
        data["label"], logits, loss_name="loss",
        top_k_names=((1, "top1"), (5, "top5")))
    return self._update(self.eval_trackers, values)

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Keras' symbolic build, fed one replica's batch.

    Keras pulls a batch of a distributed dataset and all-reduces it to get
    a plain one, which fails for dict batches under
    `MultiWorkerMirroredStrategy` (its reduce takes one tensor, not a
    structure). The build only needs shapes and dtypes, which every
    replica's batch has.
    """
    if iterator is not None and data_batch is None:
      for _, _, batches in iterator:
        local = self.distribute_strategy.experimental_local_results
        data_batch = tf.nest.map_structure(
            lambda v: local(v)[0], next(batches))
        break
    super()._maybe_symbolic_build(data_batch=data_batch)

  @staticmethod
  def _update(trackers, values):
    """Updates the trackers the task produced values for (a pretraining run
    without labels has no `sup_*` values); returns their results."""
    logs = {}
    for tracker in trackers:
      if tracker.name not in values:
        continue
      value = values[tracker.name]
      if isinstance(value, tuple):
        tracker.update_state(value[0], sample_weight=value[1])
      else:
        tracker.update_state(value)
      logs[tracker.name] = tracker.result()
    return _with_batch_axis(logs)


def _with_batch_axis(logs):
  """Shape [1] logs under a multi-worker strategy, scalars otherwise.

  Keras reduces a multi-worker step's outputs with
  `strategy.reduce('MEAN', value, axis=0)`, which needs an axis to reduce.
  """
  if distribute.num_workers(tf.distribute.get_strategy()) <= 1:
    return logs
  return {name: tf.reshape(value, [1]) for name, value in logs.items()}


def _unpack(data):
  """`fit(dataset)` gives the element; `train_on_batch(x)` gives (x, y, w)."""
  return data[0] if isinstance(data, tuple) else data
