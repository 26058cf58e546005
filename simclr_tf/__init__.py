"""simclr-tf: SimCLRv2 (Chen et al., NeurIPS 2020) in Keras 3 / TensorFlow."""

__version__ = "0.1.0"
