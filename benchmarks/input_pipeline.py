"""Throughput of the SimCLR pretraining input pipeline (augmented images/s).

Two recipes, both pretraining (two views per example):
  cifar:     32 px, colour jitter 0.5, no blur, batch 256 (SimCLR CIFAR-10).
  imagenet:  224 px, colour jitter 1.0, blur; the images are the same CIFAR
             images upsampled from 32 px by the random crop, so decoding is
             cheaper than with real ImageNet JPEGs: the figure measures the
             augmentation cost at 224 px, not JPEG decoding of large files.

"views/s" counts augmented images, "examples/s" pairs of views. Figures are
steady state: after warm-up batches, the median of several timed runs.

Usage:
  python benchmarks/input_pipeline.py [--data_dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from simclr_tf import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position


def default_data_dir() -> str:
  """The shared CIFAR-10 folder if present, else '' (the bundled sample)."""
  shared = os.path.join(REPO, "..", "shared", "data", "cifar10")
  return os.path.normpath(shared) if os.path.isdir(shared) else ""


def measure(dataset: str, data_dir: str, image_size: int, batch_size: int,
            jitter: float, blur: bool, warmup: int, batches: int,
            runs: int) -> dict:
  """Times one recipe.

  Args:
    dataset: dataset name for build_dataset.
    data_dir: its data_dir.
    image_size: output size.
    batch_size: batch size.
    jitter: colour jitter strength.
    blur: use Gaussian blur.
    warmup: batches before timing.
    batches: batches per timed run.
    runs: timed runs.
  Returns:
    dict of the figures.
  """
  start = time.perf_counter()
  info = sources.get_info(dataset, data_dir, "train", "test")
  list_s = time.perf_counter() - start
  start = time.perf_counter()
  ds = pipeline.build_dataset(
      dataset=dataset, data_dir=data_dir, split="train", stage="pretrain",
      image_size=image_size, batch_size=batch_size,
      color_jitter_strength=jitter, use_blur=blur, cache=True)
  iterator = iter(ds)
  for _ in range(warmup):
    next(iterator)
  build_s = time.perf_counter() - start
  rates = []
  for _ in range(runs):
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    rates.append(batches * batch_size / (time.perf_counter() - start))
  examples = statistics.median(rates)
  return {
      "image_size": image_size, "batch_size": batch_size,
      "color_jitter_strength": jitter, "blur": blur,
      "num_train_examples": info.num_train_examples,
      "listing_s": round(list_s, 2), "build_and_warmup_s": round(build_s, 2),
      "examples_per_s": round(examples, 1),
      "views_per_s": round(2 * examples, 1),
      "runs_examples_per_s": [round(r, 1) for r in rates],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=default_data_dir(),
                      help="image folder ROOT with a train/ split; default "
                      "../shared/data/cifar10 if present, else the bundled "
                      "sample")
  parser.add_argument("--recipes", default="cifar,imagenet")
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--json", default="", help="also write figures here")
  args = parser.parse_args()
  dataset = config_lib.IMAGE_FOLDER if args.data_dir else (
      config_lib.BUNDLED_DATASET)
  recipes = {
      "cifar": dict(image_size=32, batch_size=256, jitter=0.5, blur=False,
                    warmup=10, batches=20),
      "imagenet": dict(image_size=224, batch_size=64, jitter=1.0, blur=True,
                       warmup=3, batches=4),
  }
  results = {"data": args.data_dir or "bundled cifar10_sample",
             "cpu_count": os.cpu_count(), "recipes": {}}
  for name in args.recipes.split(","):
    figures = measure(dataset, args.data_dir, runs=args.runs,
                      **recipes[name])
    results["recipes"][name] = figures
    print(f"{name:9s} {figures['image_size']:3d}px batch "
          f"{figures['batch_size']:3d}: {figures['views_per_s']:8.1f} views/s "
          f"= {figures['examples_per_s']:8.1f} examples/s (runs: "
          f"{figures['runs_examples_per_s']} examples/s; listing "
          f"{figures['listing_s']} s, build+warm-up "
          f"{figures['build_and_warmup_s']} s)", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
