r"""The whole of SimCLRv2 on the bundled CIFAR-10 sample, in a few minutes.

  python demo.py                      # what `make demo` runs
  python demo.py --dataset=image_folder --data_dir=../shared/data/cifar10

Stages, each a call of the Python API (`simclr_tf.pretrain`, `finetune`,
`distill`) in this process, consuming the previous stage's export:
  1. pretrain      contrastive, no labels, all training images;
  2. finetune      10% of the labels, from the first projection layer;
  3. distill       self-distillation on all training images (no labels);
  4. supervised    baseline: the same network from scratch on the same 10%.
Then the distilled student is exported for deployment (`simclr_tf.deploy`):
one LiteRT file with dynamic-range quantization (int8 weights), checked
against its SavedModel on the test split (needs the deploy extra).
It ends with a table (stage, top-1, top-5, time, export; the deployed
student with its size and latency) and the TensorBoard command to look at
the runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time

import simclr_tf  # first: chooses oneDNN for this CPU before TensorFlow loads
from simclr_tf import cli

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
                 help="More options for every stage, as run.py flags "
                 "(--name=value).")
  return p.parse_args(argv)


def stages(a) -> list[tuple[str, callable, dict]]:
  """(name, API function, its arguments) of each stage."""
  folder = a.dataset == "image_folder"
  common = dict(data=a.data_dir if folder else a.dataset, image_size=32,
                resnet_depth=18,
                width_multiplier=a.width_multiplier, precision=a.precision,
                seed=0, **extra_options(a.extra))
  if a.data_dir and not folder:   # a TFDS data directory
    common["data_dir"] = a.data_dir
  out = lambda name: os.path.join(a.out, name)
  finetune = dict(label_fraction=a.label_fraction,
                  train_batch_size=min(a.batch_size, 50),
                  train_epochs=a.finetune_epochs, optimizer="lars",
                  learning_rate=0.1, learning_rate_scaling="linear",
                  weight_decay=0.0, warmup_epochs=0.0)
  return [
      ("pretrain", simclr_tf.pretrain, dict(
          common, model_dir=out("pretrain"), train_batch_size=a.batch_size,
          train_epochs=a.pretrain_epochs, learning_rate=1.0,
          weight_decay=1e-4, temperature=0.5, color_jitter_strength=0.5,
          warmup_epochs=2.0, knn_eval_epochs=a.knn_eval_epochs)),
      ("finetune", simclr_tf.finetune, dict(
          common, **finetune, model_dir=out("finetune"),
          init_from=os.path.join(out("pretrain"), "saved_model"))),
      ("distill", simclr_tf.distill, dict(
          common, model_dir=out("distill"),
          teacher=os.path.join(out("finetune"), "saved_model"),
          # The student starts from its teacher's encoder, with a new head.
          init_from=os.path.join(out("finetune"), "saved_model"),
          train_batch_size=a.batch_size, train_epochs=a.distill_epochs,
          distill_temperature=0.1, learning_rate=0.3, weight_decay=0.0,
          warmup_epochs=1.0)),
      ("supervised", simclr_tf.finetune, dict(
          common, **dict(finetune, learning_rate=0.3, weight_decay=1e-4),
          model_dir=out("supervised"))),
  ]


def extra_options(flags: list[str]) -> dict:
  """{name: value} of run.py-style flags (--name=value, --name, --noname)."""
  types = {f.name: type(getattr(simclr_tf.Config(), f.name))
           for f in dataclasses.fields(simclr_tf.Config)}
  options = {}
  for flag in flags:
    name, has_value, value = flag.lstrip("-").partition("=")
    if not has_value:
      negated = name.startswith("no") and name[2:] in types
      name, value = (name[2:], "false") if negated else (name, "true")
    kind = types.get(name, str)
    if kind is bool:
      options[name] = value.lower() in ("1", "true", "yes")
    else:
      options[name] = kind(value)
  return options


def run_stage(name: str, fn, kwargs: dict) -> dict:
  shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "data")
  print(f"\n=== {name}: simclr_tf.{fn.__name__}({kwargs['data']!r}, "
        f"{shown})", flush=True)
  start = time.time()
  data = kwargs.pop("data")
  result = fn(data, **kwargs)
  metrics = dict(result.metrics, export=result.export_path)
  metrics["seconds"] = time.time() - start
  return metrics


def deploy_student(a, student: str) -> dict | None:
  """The distilled student exported to LiteRT with dynamic-range
  quantization (simclr_tf.deploy) and checked on the test split: its table
  row, or None without the extra."""
  from simclr_tf import deploy  # pylint: disable=g-import-not-at-top
  missing = deploy.missing_packages("litert")
  if missing:
    print(f"\n(skipping the deployable student: {', '.join(missing)} is not "
          "installed; pip install -c requirements/constraints.txt -e "
          "'.[deploy]')")
    return None
  folder = a.data_dir if a.dataset == "image_folder" else ""
  data_dir = folder or a.data_dir
  out = os.path.join(a.out, "student_litert_dynamic")
  print(f"\n=== deploy: simclr_tf.deploy.export({_shown(student)!r}, "
        f"{_shown(out)!r}, export_format='litert', quantize='dynamic')",
        flush=True)
  start = time.time()
  test, labels = deploy.read_split(a.dataset, data_dir, "test", 32)
  shutil.rmtree(out, ignore_errors=True)   # the demo's own, replaced
  row = {"export": out, "seconds": 0.0}
  try:
    # The demo's student is weak (about 20% top-1 after minutes of
    # training): its two most probable classes are nearly tied on many test
    # images. Dynamic-range quantization flipped 1-1.5% of those ties on
    # the 200 test images, full int8 2.5-7.5% (docs/deploy.md, "In make
    # demo"), so the demo deploys dynamic-range and holds it to 0.95; a
    # real model is held to the default 0.98.
    report = deploy.export(student, out, export_format="litert",
                           quantize="dynamic", eval_images=test,
                           eval_labels=labels, min_agreement=0.95)
  except deploy.DeployError as e:
    print(f"deploy: {e}")
    return dict(row, note="not kept (see above)",
                seconds=time.time() - start)
  print(deploy.summary_line(report))
  row["export"] = os.path.join(out, report["model_file"])
  if report.get("top1_converted") is not None:
    row["top1"] = report["top1_converted"]
  row["note"] = (f"{report['file_bytes'] / 1e6:.2f} MB, "
                 f"{report['latency_ms_per_image']:.2f} ms/image, "
                 f"{100 * report['top1_agreement']:.1f}% agree")
  row["seconds"] = time.time() - start
  return row


def _shown(path: str) -> str:
  """`path` relative to the project when it is inside it."""
  rel = os.path.relpath(path, ROOT)
  return path if rel.startswith("..") else rel


def table(rows: list[tuple[str, dict]]) -> str:
  lines = [f"{'stage':<15}{'top-1':>8}{'top-5':>8}{'time':>9}  export",
           "-" * 78]
  for name, r in rows:
    top1 = f"{100 * r['top1']:.1f}" if "top1" in r else "-"
    top5 = f"{100 * r['top5']:.1f}" if "top5" in r else "-"
    note = f" ({r['note']})" if r.get("note") else ""
    lines.append(f"{name:<15}{top1:>8}{top5:>8}{r['seconds']:>8.0f}s  "
                 f"{_shown(r.get('export', '-'))}{note}")
  return "\n".join(lines)


def main(argv=None):
  a = parse_args(argv)
  cli.setup_logging()   # the library's progress, as run.py shows it
  start = time.time()
  rows = []
  for name, fn, kwargs in stages(a):
    rows.append((name, run_stage(name, fn, kwargs)))
    if name == "distill":
      deployed = deploy_student(a, rows[-1][1]["export"])
      if deployed:
        rows.append(("litert dynamic", deployed))
  print(f"\nSimCLRv2 demo on {a.data_dir if a.dataset == 'image_folder' else a.dataset} "
        f"({100 * a.label_fraction:g}% labels), ResNet-18 "
        f"{a.width_multiplier:g}x, precision={a.precision}, "
        f"{time.time() - start:.0f} s in all")
  print("(pretrain's top-1 is its linear classifier trained alongside on all "
        "labels.)")
  print(simclr_tf.ONEDNN.describe())
  print(table(rows))
  print(f"\nTensorBoard:  {sys.executable} -m tensorboard.main "
        f"--logdir {_shown(a.out)}")


if __name__ == "__main__":
  main()
