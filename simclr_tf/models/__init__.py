"""Encoder and heads of SimCLRv2; `simclr.py` wires them into a Model."""

from simclr_tf.models.heads import ProjectionHead, SupervisedHead
from simclr_tf.models.resnet import ResNet

__all__ = ["ProjectionHead", "ResNet", "SupervisedHead"]
