"""LARS: layer-wise adaptive rate scaling with momentum (You et al. 2017).

The update is the one of the official SimCLR code (arXiv 2002.05709, section
B.1; SimCLRv2 arXiv 2006.10029 uses the same optimizer). For a variable `w`
with gradient `g`, learning rate `lr` and momentum buffer `v`:

  g <- g + weight_decay * w                      if w is decayed
  trust_ratio = eta * ||w|| / ||g||              if w is adapted and both
                                                 norms are > 0, else 1
  v <- momentum * v + lr * trust_ratio * g
  w <- w - v

`eta` is `trust_coefficient`. Weight decay is coupled (added to the gradient
before the trust ratio is computed), so the Keras decoupled weight decay of
the base class is switched off. Which variables are decayed and which are
adapted is decided by variable identity (`exclude_from_weight_decay`,
`exclude_from_layer_adaptation`), never by name: the model code picks the
batch-norm parameters, biases and heads it wants excluded.
"""

from __future__ import annotations

from typing import Iterable, Optional

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="simclr_tf")
class LARS(keras.optimizers.Optimizer):
  """LARS with classic (heavy-ball) momentum and coupled L2 weight decay.

  Works in eager mode, inside `tf.function` (also with `jit_compile=True`),
  under `tf.distribute` strategies (Keras all-reduces the gradients, then
  calls `update_step` once per variable in the cross-replica update context;
  the step uses only local, element-wise and reduction ops) and wrapped by
  `keras.optimizers.LossScaleOptimizer` for float16 (the variables, and hence
  the update, stay float32).
  """

  def __init__(self,
               learning_rate=0.001,
               momentum: float = 0.9,
               weight_decay: float = 0.0,
               trust_coefficient: float = 0.001,
               name: str = "lars",
               **kwargs):
    """Creates the optimizer.

    Args:
      learning_rate: a float, a `LearningRateSchedule` or a callable.
      momentum: momentum of the velocity buffer, in [0, 1].
      weight_decay: L2 coefficient added to the gradient of decayed
        variables (not the Keras decoupled decay).
      trust_coefficient: `eta` of the trust ratio (You et al. 2017).
      name: name of the optimizer and its variable scope.
      **kwargs: other arguments of `keras.optimizers.Optimizer` (clipnorm,
        use_ema, loss_scale_factor, ...).
    """
    # The base class would apply decoupled decay if it saw weight_decay; it
    # gets None, and `_apply_weight_decay` is a no-op below as well.
    super().__init__(learning_rate=learning_rate, weight_decay=None,
                     name=name, **kwargs)
    if not 0.0 <= float(momentum) <= 1.0:
      raise ValueError(f"LARS momentum must be in [0, 1]; received {momentum}.")
    if float(weight_decay) < 0.0:
      raise ValueError(
          f"LARS weight_decay must be >= 0; received {weight_decay}.")
    if float(trust_coefficient) <= 0.0:
      raise ValueError("LARS trust_coefficient must be > 0; received "
                       f"{trust_coefficient}.")
    self.momentum = float(momentum)
    # Stored under the base-class attribute so that `get_config` and
    # `_use_weight_decay` bookkeeping see it; the base never applies it
    # because `_apply_weight_decay` is overridden.
    self.weight_decay = float(weight_decay)
    self.trust_coefficient = float(trust_coefficient)
    self._exclude_from_layer_adaptation = set()

  def build(self, variables):
    """Creates one momentum buffer per variable (same shape and dtype).

    Args:
      variables: the trainable variables this optimizer updates.
    """
    if self.built:
      return
    super().build(variables)
    self._momentums = self.add_optimizer_variables(variables, "momentum")

  def exclude_from_weight_decay(self, var_list: Optional[Iterable] = None,
                                var_names=None):
    """Variables that get no weight decay (e.g. BN gamma/beta, biases).

    Replaces any earlier exclusion list, as the Keras base method does. Must
    be called before the optimizer is built (before the first `apply`).

    Args:
      var_list: `keras.Variable`s or `tf.Variable`s (mirrored ones too);
        matched by identity through `self._var_key`.
      var_names: kept for Keras compatibility (name substrings); SimCLR code
        should pass `var_list`.
    """
    self._check_not_built("exclude_from_weight_decay")
    super().exclude_from_weight_decay(
        var_list=list(var_list) if var_list is not None else None,
        var_names=var_names)

  def exclude_from_layer_adaptation(self,
                                    var_list: Optional[Iterable] = None):
    """Variables updated with the plain learning rate (trust ratio 1).

    Replaces any earlier list. Must be called before the optimizer is built.

    Args:
      var_list: `keras.Variable`s or `tf.Variable`s, matched by identity.
    """
    self._check_not_built("exclude_from_layer_adaptation")
    self._exclude_from_layer_adaptation = set(
        self._var_key(v) for v in (var_list or ()))

  def _check_not_built(self, method: str) -> None:
    # The Keras base checks a `_built` attribute that Keras 3 never sets, so
    # the check is repeated here with `built`. After a build, an update step
    # may already be traced with the old choice baked in.
    if self.built:
      raise ValueError(
          f"LARS.{method}() must be called before the optimizer is built "
          "(before its first apply/build); create a new optimizer instead.")

  def _use_layer_adaptation(self, variable) -> bool:
    return self._var_key(variable) not in self._exclude_from_layer_adaptation

  def _apply_weight_decay(self, variables):
    # LARS couples the decay with the gradient inside `update_step`.
    del variables

  def update_step(self, gradient, variable, learning_rate):
    """One LARS step for one variable (You et al. 2017, algorithm 1).

    Args:
      gradient: dense (or IndexedSlices, densified) gradient, summed over
        replicas; any float dtype.
      variable: the variable to update (a replica component under a
        strategy; `_var_key` maps it back to the distributed variable).
      learning_rate: scalar tensor, the current learning rate.
    """
    dtype = variable.dtype
    w = tf.convert_to_tensor(variable)
    g = tf.cast(tf.convert_to_tensor(gradient), dtype)
    lr = tf.cast(learning_rate, dtype)
    velocity = self._momentums[self._get_variable_index(variable)]

    if self.weight_decay > 0.0 and self._use_weight_decay(variable):
      g = g + tf.cast(self.weight_decay, dtype) * w  # coupled L2 decay

    scaled_lr = lr
    if self._use_layer_adaptation(variable):
      # Trust ratio eta * ||w|| / ||g||; 1 if either norm is zero (a freshly
      # zero-initialised variable or a variable with no signal).
      w_norm = tf.norm(w, ord=2)
      g_norm = tf.norm(g, ord=2)
      ratio = tf.math.divide_no_nan(
          tf.cast(self.trust_coefficient, dtype) * w_norm, g_norm)
      one = tf.ones_like(ratio)
      trust_ratio = tf.where(w_norm > 0.0,
                             tf.where(g_norm > 0.0, ratio, one), one)
      scaled_lr = lr * trust_ratio

    # v <- momentum * v + scaled_lr * g ; w <- w - v
    new_velocity = (tf.cast(self.momentum, dtype) * tf.convert_to_tensor(
        velocity) + scaled_lr * g)
    self.assign(velocity, new_velocity)
    self.assign_sub(variable, new_velocity)

  def get_config(self):
    """The constructor arguments (the base config plus the LARS ones).

    Returns:
      A dict that `LARS.from_config` turns back into an equal optimizer.
    """
    config = super().get_config()
    config.update({
        "momentum": self.momentum,
        "weight_decay": self.weight_decay,
        "trust_coefficient": self.trust_coefficient,
    })
    return config
