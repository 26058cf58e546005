r"""SimCLRv2's claim on CIFAR-10: few labels + unlabeled images beat labels alone.

  .venv/bin/python benchmarks/label_efficiency.py \
      --data_dir=../shared/data/cifar10 --out=runs/label_efficiency

Under one compute budget (about 90 minutes on a 2-core CPU with native
bfloat16 at the defaults; --budget scales every epoch count, so on a
2-core AVX2 CPU, where float32 runs ~10x slower, --budget=0.1 takes about as
long; --width_multiplier sets the network):

  supervised   ResNet-18 from scratch on 1% and on 10% of the labels;
  linear eval  a linear classifier on the frozen pretrained encoder, on the
               same labels (the paper's linear evaluation);
  fine-tuned   SimCLRv2: pretrain on all 50,000 training images without
               labels, fine-tune from the first projection layer on the same
               1% and 10%;
  distilled    self-distillation of each fine-tuned model on the 45,000
               unlabeled training images (labels unused); the student
               starts from its teacher's encoder with a new head.

Every stage is written as run.py flags (printed, so any stage can be rerun
alone from the shell) and run in this process: `simclr_tf.cli.config_from_args`
parses them exactly as run.py does and `simclr_tf.run` runs the Config.
Choices are made on a validation split held out from the training images
(the last 10% of each class); the test split is only used for the reported
figures. Writes `results.json`, `results.png` and prints the table.

Deviations from the paper's CIFAR recipe, forced by the budget: a ResNet-18
of a quarter width (16-128 channels; every method uses the same network),
40 pretraining epochs instead of 1000, batch 256 instead of 512-4096,
2 distillation epochs instead of 400 (the paper trains its student with the
pretraining schedule), and the student starts from its teacher's encoder
(with a new head), so a short distillation can refine rather than re-learn
it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

import simclr_tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data", "cifar10")


def add_common_args(p: argparse.ArgumentParser, out: str,
                    budget_help: str) -> None:
  """The arguments every CIFAR-10 recipe benchmark takes (this one and
  small_student.py): data, output folder, budget, precision, holdout, seed
  and smoke steps."""
  p.add_argument("--data_dir", default=SHARED,
                 help="CIFAR-10 image folder with train/ and test/.")
  p.add_argument("--out", default=os.path.join(ROOT, "runs", out))
  p.add_argument("--budget", type=float, default=1.0,
                 help="Scales every epoch count (1.0: " + budget_help + ").")
  p.add_argument("--precision", default="auto",
                 help="run.py's --precision for training (auto: "
                 "mixed_bfloat16 where bfloat16 is native, else float32).")
  p.add_argument("--holdout", type=float, default=0.1,
                 help="Fraction of each class held out from train as 'val'.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke_steps", type=int, default=0,
                 help="Cap every stage at this many steps (a quick check of "
                 "the script; the figures then mean nothing).")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_common_args(p, "label_efficiency", "about 90 min on a 2-core CPU with "
                  "native bfloat16; use ~0.1 on AVX2 only")
  p.add_argument("--width_multiplier", type=float, default=0.25,
                 help="ResNet-18 width (1.0: the paper's; 0.25 runs ~6x "
                 "faster on a CPU, which is what fits the budget).")
  p.add_argument("--fractions", default="0.01,0.1")
  p.add_argument("--pretrain_epochs", type=float, default=40)
  p.add_argument("--pretrain_warmup_epochs", type=float, default=2)
  p.add_argument("--pretrain_batch_size", type=int, default=256)
  p.add_argument("--pretrain_lr", type=float, default=1.0,
                 help="LARS, x batch/256.")
  p.add_argument("--finetune_epochs_1pct", type=float, default=100,
                 help="Also the supervised and linear-eval epochs at 1%%.")
  p.add_argument("--finetune_epochs_10pct", type=float, default=30)
  p.add_argument("--finetune_batch_size", type=int, default=128)
  p.add_argument("--finetune_lr", type=float, default=0.3,
                 help="LARS, x batch/256, no weight decay.")
  p.add_argument("--linear_lr", type=float, default=0.3)
  p.add_argument("--supervised_lr", type=float, default=1.0,
                 help="LARS, x batch/256, weight decay 1e-4.")
  p.add_argument("--distill_epochs", type=float, default=2)
  p.add_argument("--distill_batch_size", type=int, default=256)
  p.add_argument("--distill_lr", type=float, default=0.1)
  p.add_argument("--distill_temperature", type=float, default=0.1)
  p.add_argument("--distill_init_head", type=int, default=0,
                 help="1: the student starts as its teacher (--init_head); "
                 "0: from the teacher's encoder with a new zero head.")
  return p.parse_args(argv)


def make_split_folder(data_dir: str, out: str, holdout: float) -> str:
  """ROOT/{train,val,all,test}/<class>/ of symlinks to the CIFAR-10 images.

  val holds the last `holdout` of each class's training images; all = train
  + val (pretraining uses every training image, without labels).
  """
  root = os.path.join(out, "data")
  if os.path.exists(os.path.join(root, ".complete")):
    return root
  for cls in sorted(os.listdir(os.path.join(data_dir, "train"))):
    files = sorted(os.listdir(os.path.join(data_dir, "train", cls)))
    cut = len(files) - int(round(holdout * len(files)))
    for split, names in (("train", files[:cut]), ("val", files[cut:]),
                         ("all", files)):
      folder = os.path.join(root, split, cls)
      os.makedirs(folder, exist_ok=True)
      for name in names:
        link = os.path.join(folder, name)
        if not os.path.lexists(link):
          os.symlink(os.path.abspath(os.path.join(data_dir, "train", cls,
                                                  name)), link)
  test = os.path.join(root, "test")
  if not os.path.lexists(test):
    os.symlink(os.path.abspath(os.path.join(data_dir, "test")), test)
  open(os.path.join(root, ".complete"), "w").close()
  return root


def _epochs(value: float, budget: float) -> str:
  """--train_steps is derived by run.py from epochs; keep at least one."""
  return str(max(1, int(round(value * budget))))


def _length(epochs: float, budget: float, examples: int, batch: int) -> str:
  """A stage's length flag: whole epochs, or steps for a fraction of one."""
  scaled = epochs * budget
  if scaled >= 1 and abs(scaled - round(scaled)) < 1e-9:
    return f"--train_epochs={int(round(scaled))}"
  return f"--train_steps={max(1, math.ceil(scaled * examples / batch))}"


def count_images(folder: str) -> int:
  return sum(len(files) for _, _, files in os.walk(folder, followlinks=True))


def plan(a, data_root: str) -> list[tuple[str, str, list[str]]]:
  """(row, column, run.py flags) for every stage, in dependency order."""
  out = lambda name: os.path.join(a.out, name)
  common = ["--dataset=image_folder", f"--data_dir={data_root}",
            "--image_size=32", "--resnet_depth=18",
            f"--width_multiplier={a.width_multiplier:g}",
            f"--precision={a.precision}", f"--seed={a.seed}",
            "--mode=train_then_eval", "--log_images=false"]
  stages = [("pretrain", "-", common + [
      "--train_mode=pretrain", f"--model_dir={out('pretrain')}",
      "--ft_proj_selector=1", "--train_split=all", "--eval_split=val",
      f"--train_batch_size={a.pretrain_batch_size}",
      f"--learning_rate={a.pretrain_lr:g}",
      "--learning_rate_scaling=linear", "--weight_decay=1e-4",
      "--temperature=0.5", "--color_jitter_strength=0.5", "--use_blur=false",
      f"--warmup_epochs={_epochs(a.pretrain_warmup_epochs, a.budget)}",
      f"--checkpoint_epochs={max(1, int(a.pretrain_epochs * a.budget) // 10)}",
      f"--knn_eval_epochs={max(1, int(a.pretrain_epochs * a.budget) // 10)}",
      f"--train_epochs={_epochs(a.pretrain_epochs, a.budget)}"])]
  pretrained = f"--init_from={out('pretrain')}/saved_model"
  num_train = count_images(os.path.join(data_root, "train"))
  for fraction in [float(f) for f in a.fractions.split(",")]:
    pct = f"{100 * fraction:g}%"
    epochs = a.finetune_epochs_1pct if fraction <= 0.01 else (
        a.finetune_epochs_10pct)
    labeled = common + [
        "--train_mode=finetune", f"--label_fraction={fraction}",
        "--train_split=train", "--eval_split=test",
        f"--train_batch_size={a.finetune_batch_size}", "--optimizer=lars",
        "--learning_rate_scaling=linear", "--warmup_epochs=0",
        f"--train_epochs={_epochs(epochs, a.budget)}"]
    tag = f"{int(round(1000 * fraction)):03d}"
    teacher = f"{out('finetune_' + tag)}/saved_model"
    stages.append(("supervised", pct, labeled + [
        f"--model_dir={out('supervised_' + tag)}", "--ft_proj_selector=1",
        f"--learning_rate={a.supervised_lr:g}", "--weight_decay=1e-4"]))
    # The paper's linear evaluation: a linear classifier on the frozen
    # encoder output (batch norm in inference mode), on the same labels.
    stages.append(("linear eval", pct, labeled + [
        f"--model_dir={out('linear_' + tag)}", "--ft_proj_selector=0",
        "--fine_tune_after_block=4", f"--learning_rate={a.linear_lr:g}",
        "--weight_decay=0", pretrained]))
    stages.append(("fine-tuned", pct, labeled + [
        f"--model_dir={out('finetune_' + tag)}", "--ft_proj_selector=1",
        f"--learning_rate={a.finetune_lr:g}", "--weight_decay=0",
        pretrained]))
    distill = common + [
        "--train_mode=distill", f"--model_dir={out('distill_' + tag)}",
        "--ft_proj_selector=1", "--train_split=train", "--eval_split=test",
        f"--teacher={teacher}", f"--init_from={teacher}",
        f"--train_batch_size={a.distill_batch_size}",
        f"--distill_temperature={a.distill_temperature:g}",
        f"--learning_rate={a.distill_lr:g}", "--learning_rate_scaling=linear",
        "--weight_decay=0", "--warmup_epochs=0",
        _length(a.distill_epochs, a.budget, num_train, a.distill_batch_size)]
    if a.distill_init_head:
      distill.append("--init_head")
    stages.append(("distilled", pct, distill))
  if a.smoke_steps:
    stages = [(m, c, f + [f"--train_steps={a.smoke_steps}"])
              for m, c, f in stages]
  return stages


def run_stage(flags: list[str]) -> dict:
  print("\n$ python run.py " + " ".join(flags), flush=True)
  start = time.time()
  result = dict(simclr_tf.run(cli.config_from_args(flags)))
  result["seconds"] = round(time.time() - start, 1)
  return result


def table(rows: dict, columns: list[str]) -> str:
  lines = [f"{'method':<14}" + "".join(f"{c + ' top-1':>13}" for c in columns)
           + f"{'time':>10}", "-" * (14 + 13 * len(columns) + 10)]
  for method, cells in rows.items():
    line = f"{method:<14}"
    for c in columns:
      cell = cells.get(c)
      line += f"{100 * cell['top1']:>12.1f}%" if cell else f"{'-':>13}"
    seconds = sum(c["seconds"] for c in cells.values())
    lines.append(line + f"{seconds / 60:>9.1f}m")
  return "\n".join(lines)


def chart(rows: dict, columns: list[str], path: str,
          width_multiplier: float = 1.0) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  methods = [m for m in rows if m != "pretrain"]
  width = 0.8 / len(methods)
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, method in enumerate(methods):
    values = [100 * rows[method][c]["top1"] if c in rows[method] else 0
              for c in columns]
    xs = [j + i * width for j in range(len(columns))]
    bars = ax.bar(xs, values, width, label=method)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
  ax.set_xticks([j + width * (len(methods) - 1) / 2
                 for j in range(len(columns))])
  ax.set_xticklabels([f"{c} labels" for c in columns])
  ax.set_ylabel("CIFAR-10 test top-1 (%)")
  ax.set_ylim(0, 1.25 * max(100 * cell["top1"] for m in methods
                            for cell in rows[m].values()))
  ax.set_title(f"SimCLRv2 vs supervised, ResNet-18 {width_multiplier:g}x, "
               "same CPU budget")
  ax.legend(loc="upper left", ncol=len(methods))
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  a = parse_args(argv)
  cli.setup_logging()   # the library's progress, as run.py shows it
  if not os.path.isdir(os.path.join(a.data_dir, "train")):
    sys.exit(f"--data_dir={a.data_dir!r} has no train/ folder; point it at "
             "the CIFAR-10 image folder.")
  os.makedirs(a.out, exist_ok=True)
  data_root = make_split_folder(a.data_dir, a.out, a.holdout)
  start = time.time()
  rows: dict = {}
  columns = []
  for method, column, flags in plan(a, data_root):
    result = run_stage(flags)
    rows.setdefault(method, {})[column] = result
    if column != "-" and column not in columns:
      columns.append(column)
  report = {
      "date": time.strftime("%Y-%m-%d"), "machine": throughput.machine_info(),
      "width_multiplier": a.width_multiplier,
      "command": " ".join(sys.argv), "budget": a.budget,
      "total_minutes": round((time.time() - start) / 60, 1),
      "results": rows,
  }
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(report, f, indent=2)
  shown = {m: c for m, c in rows.items() if m != "pretrain"}
  print("\n" + table(shown, columns))
  for c in columns:
    top1 = {m: 100 * rows[m][c]["top1"] for m in shown if c in rows[m]}
    print(f"{c}: fine-tuned - supervised "
          f"{top1['fine-tuned'] - top1['supervised']:+.1f} points; "
          f"distilled - its teacher "
          f"{top1['distilled'] - top1['fine-tuned']:+.1f}")
  print(f"pretraining: {rows['pretrain']['-']['seconds'] / 60:.1f} min "
        f"(linear head on val: {100 * rows['pretrain']['-'].get('top1', 0):.1f}%)"
        f"; total {report['total_minutes']} min")
  chart(rows, columns, os.path.join(a.out, "results.png"), a.width_multiplier)
  print(f"wrote {a.out}/results.json and results.png")


if __name__ == "__main__":
  main()
