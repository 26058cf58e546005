"""Shared test harness: quiet TensorFlow, tiny configs, a CLI runner."""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# What run.py and `make demo` do first: choose oneDNN before TensorFlow is
# imported (simclr_tf.cpu), so the suite runs the same kernels they do.
import simclr_tf  # noqa: E402,F401
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CIFAR = os.path.join(ROOT, "..", "shared", "data", "cifar10")


def run_cli(*args, timeout=600, env=None, cwd=ROOT):
  """Runs `python run.py ARGS` and returns the CompletedProcess."""
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"),
                         *args], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=cwd)


# Flags of a run small enough for a test: ResNet-18 at 32 px, a few steps.
TINY_FLAGS = (
    "--resnet_depth=18", "--image_size=32", "--train_batch_size=16",
    "--eval_batch_size=64", "--train_steps=3", "--log_images=false",
    "--proj_out_dim=32", "--cache_dataset=false",
    # Not `auto`: the same numerics on every machine the tests run on.
    "--precision=float32",
)


@pytest.fixture
def tiny_flags():
  return list(TINY_FLAGS)
