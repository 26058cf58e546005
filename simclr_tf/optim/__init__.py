"""Optimizers and learning-rate schedules of SimCLR."""

from simclr_tf.optim.lars import LARS
from simclr_tf.optim.schedules import WarmUpAndCosineDecay

__all__ = ["LARS", "WarmUpAndCosineDecay"]
