"""SimCLRv2's memory on CIFAR-10: kNN accuracy and throughput, with and without.

Pretrains the same small model twice with `python run.py` at the same
budget, once without the memory (--memory_size=0) and once with it, then
classifies test images by weighted kNN (k=200, cosine, Wu et al. 2018) on
the exports' 'final_avg_pool' features, with the training subset as the
labelled memory bank. Throughput is training examples (pairs of views) per
second in steady state: the epochs after the first (which includes tracing),
from the per-epoch times Keras prints.

The data is a class-balanced subset of the CIFAR-10 image folder (symbolic
links), so that both runs fit in minutes on a CPU. At such budgets the
difference in kNN accuracy is expected to be within run-to-run noise; use
--seeds to repeat.

The defaults (ResNet-18, 32 px, mixed_bfloat16, 1280 training images,
batch 64, 3 epochs = 60 steps) take about 15 minutes on 2 CPU cores. At 60
steps the paper's momentum (0.999) would leave the memory network at 94% of
its initial weights, so the default is 0.9 (a horizon of ~10 steps) and the
queue holds the keys of the last 8 steps (1024 = 8 x 2 x 64).

Usage:
  python benchmarks/memory.py [--data_dir ../shared/data/cifar10]
      [--train_per_class 128] [--test_per_class 100] [--epochs 3]
      [--memory_size 1024] [--memory_momentum 0.9] [--seeds 0 1]
      [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import simclr_tf  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import  # noqa: F401  (oneDNN, before TensorFlow)
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from simclr_tf import knn  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

# "12/12 - 45s - 4s/step - ..." : Keras' per-epoch line at verbose=2.
EPOCH_LINE = re.compile(r"^(\d+)/(\d+) - (\d+)s - ")


def default_data_dir() -> str:
  return os.path.normpath(os.path.join(REPO, "..", "shared", "data",
                                       "cifar10"))


def make_subset(data_dir: str, out_dir: str, split: str,
                per_class: int) -> int:
  """Links the first `per_class` images (sorted names) of every class.

  Args:
    data_dir: image folder root with split/class/*.jpg.
    out_dir: root of the subset (created).
    split: 'train' or 'test'.
    per_class: images per class.
  Returns:
    Number of images linked.
  """
  count = 0
  src_split = os.path.join(data_dir, split)
  for name in sorted(os.listdir(src_split)):
    src = os.path.join(src_split, name)
    if not os.path.isdir(src):
      continue
    dst = os.path.join(out_dir, split, name)
    os.makedirs(dst, exist_ok=True)
    for file in sorted(os.listdir(src))[:per_class]:
      link = os.path.join(dst, file)
      if not os.path.lexists(link):
        os.symlink(os.path.join(src, file), link)
      count += 1
  return count


def pretrain(args, data_dir: str, model_dir: str, memory_size: int,
             seed: int) -> dict:
  """Runs `run.py` pretraining; returns timing figures and the export path."""
  flags = [
      "--mode=train", "--train_mode=pretrain", "--dataset=image_folder",
      f"--data_dir={data_dir}", f"--model_dir={model_dir}",
      "--resnet_depth=18", f"--image_size={args.image_size}",
      f"--train_batch_size={args.batch_size}",
      f"--train_epochs={args.epochs}", "--checkpoint_epochs=1",
      f"--precision={args.precision}", f"--seed={seed}",
      f"--memory_size={memory_size}",
      f"--memory_momentum={args.memory_momentum}", "--log_images=false",
  ]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.join(REPO, "run.py"),
                         *flags], capture_output=True, text=True, env=env,
                        cwd=REPO, check=False)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"run.py failed ({proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  epochs = []
  for line in (proc.stdout + "\n" + proc.stderr).splitlines():
    match = EPOCH_LINE.match(line.strip())
    if match and match.group(1) == match.group(2):
      epochs.append((int(match.group(2)), int(match.group(3)), line.strip()))
  steady = epochs[1:] or epochs
  steps = sum(e[0] for e in steady)
  seconds = sum(e[1] for e in steady)
  with open(os.path.join(model_dir, "result.json")) as f:
    result = json.load(f)
  return {
      "memory_size": memory_size,
      "seed": seed,
      "wall_seconds": round(wall, 1),
      "train_seconds": round(result.get("train_seconds", float("nan")), 1),
      "examples_per_second": (round(steps * args.batch_size / seconds, 2)
                              if seconds else None),
      "steady_steps": steps,
      "last_epoch_log": epochs[-1][2] if epochs else "",
      "load_average_at_start": round(load_before, 2),
      "load_average_at_end": round(os.getloadavg()[0], 2),
      "export": os.path.join(model_dir, "saved_model"),
  }


def features(export: str, data_dir: str, split: str, image_size: int):
  """'final_avg_pool' features and labels of a split (centre crop)."""
  model = tf.saved_model.load(export)
  ds = pipeline.build_dataset(dataset="image_folder", data_dir=data_dir,
                              split=split, stage="eval",
                              image_size=image_size, batch_size=250,
                              cache=False)
  feats, labels = [], []
  for batch in ds:
    out = model(batch["image"], training=False)["final_avg_pool"]
    feats.append(tf.cast(out, tf.float32).numpy())
    labels.append(batch["label"].numpy())
  return np.concatenate(feats), np.concatenate(labels)


def knn_eval(export: str, data_dir: str, image_size: int, k: int) -> dict:
  train_x, train_y = features(export, data_dir, "train", image_size)
  test_x, test_y = features(export, data_dir, "test", image_size)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  return {
      "knn_top1": knn.knn_accuracy(train_x, train_y, test_x, test_y,
                                   num_classes, k=k),
      "knn_top1_majority": knn.knn_accuracy(train_x, train_y, test_x, test_y,
                                            num_classes, k=k,
                                            temperature=None),
      "bank_size": len(train_x), "queries": len(test_x),
  }


def step_throughput(args, rounds: int = 3, steps: int = 4) -> dict:
  """Train-step examples/s without and with the memory, interleaved.

  Both setups live in this process and are timed in alternation (A B A B
  ...) on the same synthetic batch, so that load from other processes hits
  both alike; the input pipeline is left out. Returns the medians.
  """
  import statistics  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  from simclr_tf import tasks  # pylint: disable=g-import-not-at-top
  from simclr_tf.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from simclr_tf.memory import Memory  # pylint: disable=g-import-not-at-top
  from simclr_tf.models.simclr import build_model  # pylint: disable=g-import-not-at-top

  keras.config.set_dtype_policy(args.precision)
  config = ModelConfig(resnet_depth=18, cifar_stem=args.image_size <= 32)
  rng = np.random.default_rng(0)
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  batch = {"view1": tf.constant(rng.uniform(size=shape), tf.float32),
           "view2": tf.constant(rng.uniform(size=shape), tf.float32),
           "label": tf.zeros([args.batch_size], tf.int32)}
  steps_fns = {}
  for memory_size in (0, args.memory_size):
    net = build_model(config, args.image_size)
    memory = None
    if memory_size:
      memory = Memory(config, args.image_size, memory_size,
                      args.memory_momentum)
      memory.initialize_from(net)
    task = tasks.Pretrain(0.5, memory=memory)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)

    def step(batch, net=net, task=task, opt=opt):
      with tf.GradientTape() as tape:
        loss, _ = task(net, batch, training=True)
      grads = tape.gradient(loss, net.trainable_variables)
      opt.apply_gradients(zip(grads, net.trainable_variables))
      return loss

    steps_fns[memory_size] = tf.function(step)
    steps_fns[memory_size](batch).numpy()       # trace + warm up
  times = {m: [] for m in steps_fns}
  for _ in range(rounds):
    for memory_size, fn in steps_fns.items():
      start = time.perf_counter()
      for _ in range(steps):
        loss = fn(batch)
      loss.numpy()
      times[memory_size].append(time.perf_counter() - start)
  rates = {m: args.batch_size * steps / statistics.median(t)
           for m, t in times.items()}
  return {"examples_per_second_without": round(rates[0], 2),
          "examples_per_second_with": round(rates[args.memory_size], 2),
          "ratio_with_over_without": round(rates[args.memory_size] / rates[0],
                                           3),
          "rounds": rounds, "steps_per_round": steps}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=default_data_dir())
  parser.add_argument("--work_dir", default="/tmp/simclr_tf_memory_bench")
  parser.add_argument("--train_per_class", type=int, default=128)
  parser.add_argument("--test_per_class", type=int, default=100)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--precision", default="mixed_bfloat16")
  parser.add_argument("--memory_size", type=int, default=1024)
  parser.add_argument("--memory_momentum", type=float, default=0.9)
  parser.add_argument("--k", type=int, default=200)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--json", default="")
  parser.add_argument("--throughput_only", action="store_true",
                      help="only the interleaved train-step timing")
  args = parser.parse_args()
  if args.throughput_only:
    print(json.dumps(step_throughput(args)))
    return

  subset = os.path.join(args.work_dir, "data")
  n_train = make_subset(args.data_dir, subset, "train", args.train_per_class)
  n_test = make_subset(args.data_dir, subset, "test", args.test_per_class)
  print(f"Subset: {n_train} train / {n_test} test images in {subset}",
        flush=True)
  runs = []
  for seed in args.seeds:
    for memory_size in (0, args.memory_size):
      model_dir = os.path.join(args.work_dir, f"mem{memory_size}_seed{seed}")
      if os.path.exists(model_dir):
        subprocess.run(["rm", "-rf", model_dir], check=True)
      run = pretrain(args, subset, model_dir, memory_size, seed)
      run.update(knn_eval(run["export"], subset, args.image_size, args.k))
      print(json.dumps(run), flush=True)
      runs.append(run)
  throughput = step_throughput(args)
  print(json.dumps(throughput), flush=True)
  report = {"config": vars(args), "train_images": n_train,
            "test_images": n_test, "runs": runs,
            "step_throughput": throughput}
  print("\nmemory_size  seed  kNN top-1  (majority)  examples/s  wall s")
  for r in runs:
    print(f"{r['memory_size']:>11}  {r['seed']:>4}  {r['knn_top1']:9.4f}  "
          f"{r['knn_top1_majority']:11.4f}  {r['examples_per_second']!s:>10}"
          f"  {r['wall_seconds']:6.0f}")
  print(f"Interleaved train step (synthetic data): "
        f"{throughput['examples_per_second_without']} examples/s without, "
        f"{throughput['examples_per_second_with']} with the memory "
        f"(x{throughput['ratio_with_over_without']}).")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
