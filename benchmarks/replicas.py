r"""Pretraining throughput with --cpu_replicas=1 vs 2: the cost of the path.

Each run is a fresh worker process (the CPU is split into logical devices
before TensorFlow starts) that trains like `python run.py --mode=train
--train_mode=pretrain --cpu_replicas=R`: `runner.build_learner` under the
strategy `distribute.make_strategy` makes, `Learner.fit` on the real input
pipeline (`runner.train_dataset`). A callback times every step; the first
`--warmup` steps (tracing, pipeline start) are dropped. Runs alternate
between the replica counts (1, 2, 1, 2, ...) so that all see the same load on
a shared machine; figures are medians over every timed step.

On one machine, 2 replicas split the same cores: the figure shows the
overhead of the distributed path (cross-replica batch norm, all-gathered
negatives, gradient all-reduce), not a speed-up.

Usage:
  python benchmarks/replicas.py --steps 20 --repeats 2 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(replicas: int, steps: int, batch: int, out: str) -> None:
  """Trains `steps` pretraining steps; writes the step times to `out`."""
  sys.path.insert(0, REPO)
  from simclr_tf import distribute  # pylint: disable=g-import-not-at-top
  distribute.split_cpu(replicas)
  import keras  # pylint: disable=g-import-not-at-top
  from simclr_tf import runner  # pylint: disable=g-import-not-at-top
  from simclr_tf.config import Config  # pylint: disable=g-import-not-at-top

  class StepTimer(keras.callbacks.Callback):
    def __init__(self):
      super().__init__()
      self.ends = []

    def on_train_batch_end(self, batch, logs=None):
      self.ends.append(time.perf_counter())

  with tempfile.TemporaryDirectory() as model_dir:
    cfg = Config(mode="train", train_mode="pretrain", resnet_depth=18,
                 image_size=32, train_batch_size=batch, train_steps=steps,
                 cpu_replicas=replicas, cache_dataset=True, log_images=False,
                 model_dir=model_dir)
    strategy = distribute.make_strategy(cfg.strategy, cfg.tpu,
                                        cfg.cpu_replicas)
    plan = runner.make_plan(cfg)
    with strategy.scope():
      learner, _ = runner.build_learner(cfg, plan)
    timer = StepTimer()
    learner.fit(runner.train_dataset(cfg, plan, strategy, start_step=0),
                epochs=1, steps_per_epoch=steps, callbacks=[timer],
                verbose=0)
  times = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
  with open(out, "w") as f:
    json.dump({"replicas": strategy.num_replicas_in_sync,
               "step_seconds": times}, f)


def _run(replicas: int, args) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker",
         str(replicas), "--steps", str(args.steps), "--batch",
         str(args.batch), "--out", out.name], check=True, cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    with open(out.name) as f:
      return json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=4,
                      help="First step intervals of each run left out.")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--batch", type=int, default=64,
                      help="Global batch (images per view).")
  parser.add_argument("--replicas", default="1,2")
  parser.add_argument("--json", default="", help="Also write results here.")
  parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args.worker, args.steps, args.batch, args.out)
    return
  counts = [int(r) for r in args.replicas.split(",")]
  times = {r: [] for r in counts}
  runs = {r: [] for r in counts}
  for _ in range(args.repeats):
    for r in counts:   # interleaved: 1, 2, 1, 2, ...
      result = _run(r, args)
      kept = result["step_seconds"][args.warmup:]
      times[r].extend(kept)
      runs[r].append(statistics.median(kept))
      print(f"replicas={r}: median step {runs[r][-1]:.3f} s", flush=True)
  images = 2 * args.batch   # two views per example
  report = {}
  for r in counts:
    step = statistics.median(times[r])
    report[r] = {"median_step_s": step, "images_per_s": images / step,
                 "run_medians_s": runs[r], "timed_steps": len(times[r])}
    print(f"--cpu_replicas={r}: {images / step:.1f} images/s "
          f"(median step {step:.3f} s over {len(times[r])} steps; "
          f"per-run medians {', '.join(f'{m:.3f}' for m in runs[r])} s)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
