r"""The whole of SimCLRv2 on the bundled CIFAR-10 sample, in a few minutes.

  python demo.py                      # what `make demo` runs
  python demo.py --dataset=image_folder --data_dir=../shared/data/cifar10

Stages, each a `run.py` command consuming the previous stage's export:
  1. pretrain      contrastive, no labels, all training images;
  2. finetune      10% of the labels, from the first projection layer;
  3. distill       self-distillation on all training images (no labels);
  4. supervised    baseline: the same network from scratch on the same 10%.
It ends with a table (stage, top-1, top-5, time, export) and the TensorBoard
command to look at the runs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import simclr_tf  # chooses oneDNN for this CPU; every stage's run.py inherits it

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(ROOT, "demo_runs"),
                 help="Folder for the four runs (replaced).")
  p.add_argument("--dataset", default="cifar10_sample")
  p.add_argument("--data_dir", default="")
  p.add_argument("--precision", default="auto")
  p.add_argument("--width_multiplier", type=float, default=0.25,
                 help="ResNet-18 width: 0.25 (16-128 channels) keeps the demo "
                 "to minutes on a laptop CPU; 1 is the paper's network.")
  p.add_argument("--pretrain_epochs", type=int, default=40)
  p.add_argument("--finetune_epochs", type=int, default=60)
  p.add_argument("--distill_epochs", type=int, default=20)
  p.add_argument("--label_fraction", type=float, default=0.1)
  p.add_argument("--batch_size", type=int, default=100)
  p.add_argument("--knn_eval_epochs", type=int, default=5,
                 help="Log the online kNN accuracy every N pretraining "
                 "epochs.")
  p.add_argument("--extra", nargs="*", default=[],
                 help="More run.py flags for every stage.")
  return p.parse_args(argv)


def stages(a) -> list[tuple[str, list[str]]]:
  common = [f"--dataset={a.dataset}", f"--data_dir={a.data_dir}",
            "--image_size=32", "--resnet_depth=18",
            f"--width_multiplier={a.width_multiplier:g}",
            f"--precision={a.precision}",
            "--mode=train_then_eval", "--ft_proj_selector=1", "--seed=0",
            *a.extra]
  out = lambda name: os.path.join(a.out, name)
  finetune = ["--train_mode=finetune", f"--label_fraction={a.label_fraction}",
              f"--train_batch_size={min(a.batch_size, 50)}",
              f"--train_epochs={a.finetune_epochs}", "--optimizer=lars",
              "--learning_rate=0.1", "--learning_rate_scaling=linear",
              "--weight_decay=0", "--warmup_epochs=0"]
  return [
      ("pretrain", common + [
          "--train_mode=pretrain", f"--model_dir={out('pretrain')}",
          f"--train_batch_size={a.batch_size}",
          f"--train_epochs={a.pretrain_epochs}", "--learning_rate=1.0",
          "--weight_decay=1e-4", "--temperature=0.5",
          "--color_jitter_strength=0.5", "--warmup_epochs=2",
          f"--knn_eval_epochs={a.knn_eval_epochs}"]),
      ("finetune", common + finetune + [
          f"--model_dir={out('finetune')}",
          f"--init_from={out('pretrain')}/saved_model"]),
      ("distill", common + [
          "--train_mode=distill", f"--model_dir={out('distill')}",
          f"--teacher={out('finetune')}/saved_model",
          # The student starts from its teacher's encoder, with a new head.
          f"--init_from={out('finetune')}/saved_model",
          f"--train_batch_size={a.batch_size}",
          f"--train_epochs={a.distill_epochs}", "--distill_temperature=0.1",
          "--learning_rate=0.3", "--weight_decay=0", "--warmup_epochs=1"]),
      ("supervised", common + finetune + [
          f"--model_dir={out('supervised')}", "--learning_rate=0.3",
          "--weight_decay=1e-4"]),
  ]


# What TensorFlow's GPU build prints at start on a machine without a GPU:
# expected there, and read as a failure. Dropped only when no NVIDIA device
# exists; every other line of the stage is shown as it comes.
_NO_GPU_NOISE = ("failed call to cuInit", "Could not find cuda drivers")


def _relay(stream, no_gpu: bool) -> None:
  for line in stream:
    if not (no_gpu and any(n in line for n in _NO_GPU_NOISE)):
      sys.stderr.write(line)
      sys.stderr.flush()


def run_stage(name: str, args: list[str]) -> dict:
  cmd = [sys.executable, os.path.join(ROOT, "run.py"), *args]
  print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
  start = time.time()
  no_gpu = not glob.glob("/dev/nvidia[0-9]*")
  with subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                        errors="replace") as proc:
    _relay(proc.stderr, no_gpu)
  if proc.returncode:
    sys.exit(f"demo: stage {name} failed with exit status {proc.returncode}")
  model_dir = next(a.split("=", 1)[1] for a in args
                   if a.startswith("--model_dir="))
  with open(os.path.join(model_dir, "result.json")) as f:
    result = json.load(f)
  result["seconds"] = time.time() - start
  return result


def _shown(path: str) -> str:
  """`path` relative to the project when it is inside it."""
  rel = os.path.relpath(path, ROOT)
  return path if rel.startswith("..") else rel


def table(rows: list[tuple[str, dict]]) -> str:
  lines = [f"{'stage':<12}{'top-1':>8}{'top-5':>8}{'time':>9}  export",
           "-" * 78]
  for name, r in rows:
    top1 = f"{100 * r['top1']:.1f}" if "top1" in r else "-"
    top5 = f"{100 * r['top5']:.1f}" if "top5" in r else "-"
    lines.append(f"{name:<12}{top1:>8}{top5:>8}{r['seconds']:>8.0f}s  "
                 f"{_shown(r.get('export', '-'))}")
  return "\n".join(lines)


def main(argv=None):
  a = parse_args(argv)
  start = time.time()
  rows = [(name, run_stage(name, args)) for name, args in stages(a)]
  print(f"\nSimCLRv2 demo on {a.dataset} ({100 * a.label_fraction:g}% labels),"
        f" ResNet-18 {a.width_multiplier:g}x, --precision={a.precision}, "
        f"{time.time() - start:.0f} s in all")
  print("(pretrain's top-1 is its linear classifier trained alongside on all "
        "labels.)")
  print(simclr_tf.ONEDNN.describe())
  print(table(rows))
  print(f"\nTensorBoard:  {sys.executable} -m tensorboard.main "
        f"--logdir {_shown(a.out)}")


if __name__ == "__main__":
  main()
