r"""SimCLRv2's big-to-small claim on CIFAR-10: a small distilled student beats
the small network's own fine-tuning.

  .venv/bin/python benchmarks/small_student.py \
      --data_dir=../shared/data/cifar10 --out=runs/small_student

The paper (section 2, Table 3) distills a big fine-tuned teacher into a
smaller network on unlabeled images and finds the student better than the
smaller network pretrained and fine-tuned on the same labels. Here, with
the label-efficiency benchmark's recipes (benchmarks/label_efficiency.py)
and 1% of the labels (450 images):

  teacher      ResNet-18 0.25x (16-128 channels): pretrained on all 50,000
               training images without labels, fine-tuned on 1%;
  distilled    ResNet-18 0.125x (8-64 channels) trained on the teacher's
               soft labels (temperature 1, the paper's choice for a smaller
               student) on the 45,000 unlabeled training images (labels
               unused). Smaller than its teacher, it cannot start from the
               teacher's encoder; two starts are trained and the better on
               `val` is kept: `pretrained`, from its own pretraining (the
               0.125x network pretrained with the teacher's recipe), with
               the label-efficiency distillation's optimiser (LARS lr 0.1,
               no weight decay, no warm-up); `scratch`, from random weights,
               with the pretraining's optimiser (LARS lr 1.0, weight decay
               1e-4, warm-up), as the paper trains a student from scratch;
  fine-tuned   the same 0.125x network pretrained, fine-tuned on the 1%;
  supervised   the same 0.125x network from scratch on the 1%;
  LiteRT int8  the kept student exported with simclr_tf's deploy module
               (full int8, 300 training images to calibrate, checked
               against its SavedModel on the test split).

Every distilled student (both starts) is also exported as LiteRT float32,
dynamic-range and int8, and ONNX float32 (run.py --mode=export, each file
checked beside its SavedModel on all 10,000 test images), and judged
against the deploy targets (DEPLOY_TARGETS: top-1 agreement >= 99.9% for
the float files, >= 99% dynamic-range, >= 98% int8 with top-1 within 1
point); the deploy table lists each with its size and latency, and the
script exits non-zero after writing results.json if one misses.

Every training stage is written as run.py flags (printed, so any stage can
be rerun alone) and run in this process through `simclr_tf.run(
cli.config_from_args(flags))`, as label_efficiency.py does; so are the
evaluations on `test` (--mode=eval, float32) and the export (--mode=export).
Training stages evaluate on `val` (the last 10% of each class of the
training images, held out as in label_efficiency.py): the student's start
is chosen there, and `test` is only read for the reported figures. A stage
whose result.json and export are already in --out with the same flags is
reused, so an interrupted run continues where it stopped (a half-trained
stage resumes from its last checkpoint).

Reported on the 10,000 test images: top-1, parameters (the trainable
weights of the SavedModel), size (the SavedModel folder, or the .tflite
file), milliseconds per image (median, batch 1, one CPU thread: TensorFlow
calling the SavedModel's `serve` in a separate process, the faster of its
oneDNN and Eigen kernels; or LiteRT's interpreter), and the paired
comparison of each model with the distilled student: the images only one
of the two gets right, their difference in standard errors (the McNemar
statistic z, as distill_checks.py gives it) and the exact two-sided sign
test on those images. Writes `results.json` and prints a markdown table and
the verdict on the claim.

Time at --budget=1 (every epoch count is scaled by --budget): about 2 hours
on a 2-core Intel Xeon with AMX in bfloat16, estimated from
label_efficiency's stages measured there (0.25x pretraining, 40 epochs: 51
min; fine-tuning on 1%: 1.5 min; a 0.25x student's distillation: 0.4 s a
step) and from step times of both widths measured on a 2-core AMD EPYC:
0.125x pretraining ~30 min, its fine-tuning and supervised runs ~3 min, two
15-epoch distillations ~12-15 min each, evaluations, export and latencies
~3 min. A CPU with AVX2 only runs in float32: on a 2-core AMD EPYC (Zen
3, oneDNN on, shared with other jobs) these narrow networks trained 2-5x
slower than the AMX figures (0.25x pretraining 0.7-2.0 s a step of 256
against 0.4 s; 0.125x 0.3-0.5 s), not the ~10x label_efficiency.py
assumes: --budget=0.15 took 66 minutes there (2026-12-03, the teacher's
pretraining 44 of them while tests shared the CPU), so --budget=0.25 is
about 2 hours. --smoke_steps caps every stage (a check of
the script; the figures then mean nothing).

Deviations from the paper, forced by the budget: the teacher is a 0.25x
ResNet-18 rather than a ResNet-152 3x+SK, pretrained 40 epochs rather than
1000, and the students are distilled 15 epochs rather than with the
pretraining's schedule of 400 or more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distill_checks  # pylint: disable=g-import-not-at-top,wrong-import-position
import label_efficiency  # pylint: disable=g-import-not-at-top,wrong-import-position
import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

import keras  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import simclr_tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf import atomic  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf import cpu  # pylint: disable=g-import-not-at-top,wrong-import-position
from simclr_tf import deploy  # pylint: disable=g-import-not-at-top,wrong-import-position
from tf_hub_export import load as load_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = label_efficiency.ROOT
# The student's starts, in the order they are tried.
STARTS = ("pretrained", "scratch")
# The table's rows: (key, label).
ROWS = (("teacher", "teacher 0.25x fine-tuned 1%"),
        ("distilled", "student 0.125x distilled"),
        ("finetuned", "0.125x fine-tuned 1%"),
        ("supervised", "0.125x supervised 1%"),
        ("litert_int8", "student LiteRT int8"))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  label_efficiency.add_common_args(
      p, "small_student", "about 2 hours on a 2-core CPU with native "
      "bfloat16; ~0.25 on a 2-core AVX2 CPU")
  p.add_argument("--teacher_width", type=float, default=0.25)
  p.add_argument("--student_width", type=float, default=0.125)
  p.add_argument("--fraction", type=float, default=0.01,
                 help="The labeled fraction of the training images.")
  p.add_argument("--student_start", default="auto",
                 choices=("auto",) + STARTS,
                 help="auto: distill both starts and keep the better on "
                 "val; or only the one named.")
  p.add_argument("--distill_epochs", type=float, default=15,
                 help="Epochs of each student's distillation (45,000 "
                 "images an epoch).")
  p.add_argument("--distill_batch_size", type=int, default=256)
  p.add_argument("--distill_temperature", type=float, default=1.0)
  p.add_argument("--max_test_images", type=int, default=0,
                 help="Paired comparison on at most this many test images "
                 "(0: all; for smoke runs).")
  # Internal: the latency worker (a fresh process, so that TensorFlow runs
  # on one thread).
  p.add_argument("--latency_of", nargs="*", default=None,
                 help=argparse.SUPPRESS)
  return p.parse_args(argv)


# === The stages ==============================================================

def recipe(a, width: float, out: str):
  """label_efficiency's arguments (its recipes) for one network."""
  return label_efficiency.parse_args([
      f"--data_dir={a.data_dir}", f"--out={out}", f"--budget={a.budget:g}",
      f"--precision={a.precision}", f"--width_multiplier={width:g}",
      f"--fractions={a.fraction:g}", f"--holdout={a.holdout:g}",
      f"--seed={a.seed}", f"--smoke_steps={a.smoke_steps}"])


def labeled_stages(a, data_root: str) -> dict:
  """{name: run.py flags}: pretraining and 1% training, label_efficiency's.

  Its fine-tuned and supervised stages, evaluated on val instead of test.
  """
  wanted = {"pretrain": "pretrain", "fine-tuned": "finetune",
            "supervised": "supervised"}
  stages = {}
  for prefix, width in (("teacher", a.teacher_width),
                        ("small", a.student_width)):
    le = recipe(a, width, os.path.join(a.out, f"{prefix}_{width:g}x"))
    for method, _, flags in label_efficiency.plan(le, data_root):
      if method in wanted and not (prefix == "teacher" and
                                   method == "supervised"):
        stages[f"{prefix}_{wanted[method]}"] = [
            "--eval_split=val" if f == "--eval_split=test" else f
            for f in flags]
  return stages


def _flag(flags: list, name: str) -> str:
  values = [f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}=")]
  return values[-1]


def export_of(flags: list) -> str:
  return os.path.join(_flag(flags, "model_dir"), "saved_model")


def distill_stages(a, data_root: str, teacher: str,
                   small_pretrain: str) -> dict:
  """{start: run.py flags} of the 0.125x student distilled from the teacher.

  Both train on the unlabeled train split (distill_label_weight 0) and are
  evaluated on val; they differ in their start and its optimiser.
  """
  le = recipe(a, a.student_width, a.out)
  num_train = label_efficiency.count_images(os.path.join(data_root, "train"))
  common = [
      "--dataset=image_folder", f"--data_dir={data_root}", "--image_size=32",
      "--resnet_depth=18", f"--width_multiplier={a.student_width:g}",
      f"--precision={a.precision}", f"--seed={a.seed}",
      "--mode=train_then_eval", "--log_images=false",
      "--train_mode=distill", "--ft_proj_selector=1", "--train_split=train",
      "--eval_split=val", f"--teacher={teacher}",
      f"--train_batch_size={a.distill_batch_size}",
      f"--distill_temperature={a.distill_temperature:g}",
      "--distill_label_weight=0", "--optimizer=lars",
      "--learning_rate_scaling=linear",
      label_efficiency._length(  # pylint: disable=protected-access
          a.distill_epochs, a.budget, num_train, a.distill_batch_size)]
  warmup = le.pretrain_warmup_epochs * a.distill_epochs / le.pretrain_epochs
  recipes = {
      # The label-efficiency distillation's optimiser: refines a trained
      # encoder (new zero head).
      "pretrained": [f"--init_from={small_pretrain}",
                     f"--learning_rate={le.distill_lr:g}",
                     "--weight_decay=0", "--warmup_epochs=0"],
      # The pretraining's optimiser, as the paper trains a student from
      # random weights.
      "scratch": [f"--learning_rate={le.pretrain_lr:g}",
                  "--weight_decay=1e-4",
                  f"--warmup_epochs={warmup * a.budget:.3g}"]}
  starts = STARTS if a.student_start == "auto" else (a.student_start,)
  stages = {}
  for start in starts:
    flags = common + [f"--model_dir={os.path.join(a.out, 'distill_' + start)}"
                      ] + recipes[start]
    if a.smoke_steps:
      flags.append(f"--train_steps={a.smoke_steps}")
    stages[start] = flags
  return stages


def eval_flags(a, export: str, data_root: str, name: str) -> list:
  """run.py flags evaluating `export` on test, in float32."""
  return ["--mode=eval", f"--init_from={export}",
          f"--model_dir={os.path.join(a.out, 'test', name)}",
          "--dataset=image_folder", f"--data_dir={data_root}",
          "--eval_split=test", "--image_size=32", "--precision=float32",
          f"--seed={a.seed}"]


# The deployable files made of each distilled student: (format, quantize,
# the least top-1 agreement with its SavedModel on test, the most top-1
# points it may lose). Every export is kept (--min_agreement=0) so that a
# miss is reported with its figures; the verdict is in the deploy table.
DEPLOY_TARGETS = (("litert", "none", 0.999, None),
                  ("litert", "dynamic", 0.99, None),
                  ("litert", "int8", 0.98, 1.0),
                  ("onnx", "none", 0.999, None))


def deploy_name(student: str, export_format: str, quantize: str) -> str:
  return f"{student}_{export_format}_{quantize}"


def export_flags(a, export: str, data_root: str, name: str,
                 export_format: str, quantize: str) -> list:
  """run.py flags of one deployable export (int8 calibrated on 300 train
  images), checked on test."""
  flags = ["--mode=export", f"--init_from={export}",
           f"--model_dir={os.path.join(a.out, 'deploy', name)}",
           f"--export_format={export_format}", f"--quantize={quantize}",
           "--min_agreement=0", "--dataset=image_folder",
           f"--data_dir={data_root}", "--eval_split=test", f"--seed={a.seed}"]
  if quantize == "int8":
    flags.append("--train_split=train")
  return flags


def deploy_check(report: dict, min_agreement: float, max_drop) -> dict:
  """The export's figures against its targets."""
  drop = 100 * (report["top1_savedmodel"] - report["top1_converted"])
  met = report["top1_agreement"] >= min_agreement and (
      max_drop is None or drop <= max_drop)
  return {"format": report["format"], "quantize": report["quantize"],
          "file_bytes": report["file_bytes"],
          "top1_savedmodel": report["top1_savedmodel"],
          "top1_converted": report["top1_converted"],
          "top1_drop_points": drop,
          "top1_agreement": report["top1_agreement"],
          "max_probability_diff": report["max_probability_diff"],
          "ms_per_image": report["latency_ms_per_image"],
          "target_agreement": min_agreement, "target_max_drop_points": max_drop,
          "met": bool(met)}


def deploy_students(a, data_root: str, students: dict, stages: dict) -> dict:
  """{name: deploy_check} of every format of every distilled student."""
  checks = {}
  for student, export in students.items():
    for export_format, quantize, min_agreement, max_drop in DEPLOY_TARGETS:
      name = deploy_name(student, export_format, quantize)
      stages[name] = export_flags(a, export, data_root, name, export_format,
                                  quantize)
      report = run_stage(stages[name])
      print(deploy.summary_line(report))
      checks[name] = dict(deploy_check(report, min_agreement, max_drop),
                          student=student,
                          file=os.path.join(a.out, "deploy", name,
                                            report["model_file"]))
  return checks


def deploy_table(checks: dict) -> str:
  lines = ["| student | format | MB | top-1 SavedModel | top-1 file | "
           "agreement | max prob. diff | ms/image | target | met |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for c in checks.values():
    target = f">= {100 * c['target_agreement']:g}%"
    if c["target_max_drop_points"] is not None:
      target += f", top-1 within {c['target_max_drop_points']:g} pt"
    lines.append(
        f"| {c['student']} | {c['format']} {c['quantize']} | "
        f"{c['file_bytes'] / 1e6:.2f} | {100 * c['top1_savedmodel']:.2f}% | "
        f"{100 * c['top1_converted']:.2f}% | {100 * c['top1_agreement']:.2f}% "
        f"| {c['max_probability_diff']:.2g} | {c['ms_per_image']:.2f} | "
        f"{target} | {'yes' if c['met'] else 'NO'} |")
  return "\n".join(lines)


# === Running and reusing =====================================================

def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def finished(flags: list):
  """The result of an earlier run of exactly these flags, or None.

  A training stage is finished when its model_dir holds its result.json,
  its export and the flags.json of the same Config; the export stage when
  its folder holds the export_report.json of the same SavedModel, written
  after it (the deploy module writes the folder whole, and refuses one that
  is not empty). Evaluations (seconds) always run again.
  """
  model_dir, mode = _flag(flags, "model_dir"), _flag(flags, "mode")
  if mode == "eval":
    return None
  if mode == "export":
    path = os.path.join(model_dir, deploy.REPORT_FILE)
    report = _read_json(path)
    source = load_lib.resolve_export(_flag(flags, "init_from"))
    if report and report.get("init_from") == os.path.abspath(
        _flag(flags, "init_from")) and os.path.getmtime(path) > (
            os.path.getmtime(os.path.join(source, "saved_model.pb"))):
      return report
    return None
  result = _read_json(os.path.join(model_dir, "result.json"))
  if not result or result.get("preempted") or not os.path.exists(
      os.path.join(model_dir, "saved_model", "saved_model.pb")):
    return None
  recorded = _read_json(os.path.join(model_dir, "flags.json"))
  wanted = json.loads(cli.config_from_args(flags).to_json())
  return result if recorded == wanted else None


def run_stage(flags: list) -> dict:
  """Runs one stage through simclr_tf.run (or reuses its finished run)."""
  print("\n$ python run.py " + " ".join(flags), flush=True)
  done = finished(flags)
  if done is not None:
    print(f"  (reused: {_flag(flags, 'model_dir')} holds its finished run; "
          "delete that folder to rerun it)", flush=True)
    return dict(done, reused=True)
  start = time.time()
  result = dict(simclr_tf.run(cli.config_from_args(flags)))
  if result.get("preempted"):
    sys.exit(f"stopped by {result.get('signal')}; rerun the same command to "
             "continue.")
  result["seconds"] = round(time.time() - start, 1)
  return result


def check_same_labels(stages: dict) -> None:
  """The 1% runs must have trained on the same labeled images."""
  subsets = {}
  for name in ("teacher_finetune", "small_finetune", "small_supervised"):
    path = os.path.join(_flag(stages[name], "model_dir"), "label_subset.txt")
    with open(path, encoding="utf-8") as f:
      subsets[name] = f.read()
  if len(set(subsets.values())) != 1:
    raise RuntimeError(f"the 1% runs trained on different label subsets "
                       f"({', '.join(subsets)}); rerun them with one --seed.")


# === Measurements ============================================================

def test_predictions(a, data_root: str, exports: dict, litert_file: str):
  """(labels, {key: right [N] bool}) on the test images, float32.

  The SavedModels as distill_checks calls them (its images and batches);
  the LiteRT file on the same pixels as uint8.
  """
  keras.config.set_dtype_policy("float32")
  images, labels = distill_checks.load_images(types.SimpleNamespace(
      data_dir=data_root, split="test", max_images=a.max_test_images), 32)
  right = {}
  for key, export in exports.items():
    logits_fn, _ = load_lib.load_logits_fn(export, key)
    right[key] = distill_checks.batched(logits_fn, images).argmax(-1) == labels
  if litert_file:
    pixels = np.round(images * 255).astype(np.uint8)
    probabilities = deploy.run_batches(deploy.load(litert_file), pixels)[
        deploy.PROBABILITIES]
    right["litert_int8"] = probabilities.argmax(-1) == labels
  return labels, right


def check_same_top1(tests: dict, right: dict, max_test_images: int) -> None:
  """The paired comparison must see what the evaluations saw (both float32
  on the whole test split); a few images may flip on rounding."""
  if max_test_images:
    return
  for key, result in tests.items():
    if abs(result["top1"] - right[key].mean()) > 0.002:
      raise RuntimeError(
          f"{key}: top-1 {result['top1']:.4f} in --mode=eval but "
          f"{right[key].mean():.4f} in the paired comparison; they read "
          "different images or preprocess them differently.")


def sign_test_p(only_a: int, only_b: int) -> float:
  """Exact two-sided sign test (McNemar's exact test) on discordant pairs."""
  n = only_a + only_b
  if not n:
    return 1.0
  tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
  return min(1.0, 2 * tail / 2**n)


def paired(right_a: np.ndarray, right_b: np.ndarray) -> dict:
  """Model a against model b on the same images, as distill_checks' paired
  check: the images only one gets right, z in standard errors, p."""
  only_a = int((right_a & ~right_b).sum())
  only_b = int((right_b & ~right_a).sum())
  n = len(right_a)
  return {"images": n, "top1_a": float(right_a.mean()),
          "top1_b": float(right_b.mean()),
          "a_minus_b_points": 100 * float(right_a.mean() - right_b.mean()),
          "only_a_right": only_a, "only_b_right": only_b,
          "standard_error_points": 100 * math.sqrt(only_a + only_b) / n,
          "z": (only_a - only_b) / max(1.0, math.sqrt(only_a + only_b)),
          "sign_test_p": sign_test_p(only_a, only_b)}


def savedmodel_figures(exports: list) -> dict:
  """{export: {ms_per_image, params, ...}}, measured in fresh processes.

  TensorFlow runs on one thread, once with its oneDNN kernels and once
  with its Eigen kernels (a process reads TF_ENABLE_ONEDNN_OPTS once); at
  batch 1 they differ by up to ~15x on some CPUs, so the faster is kept.
  """
  figures = {}
  for onednn in ("1", "0"):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn)
    env.pop(cpu.CHOSEN_VAR, None)      # the setting is ours, keep it
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--latency_of", *exports],
        check=False, capture_output=True, text=True, env=env)
    if out.returncode:
      raise RuntimeError("the latency worker failed:\n" + out.stderr[-3000:])
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    for export, values in measured.items():
      entry = figures.setdefault(export, {"params": values["params"]})
      entry[f"ms_per_image_onednn_{onednn}"] = values["ms_per_image"]
  for entry in figures.values():
    entry["ms_per_image"] = min(entry["ms_per_image_onednn_1"],
                                entry["ms_per_image_onednn_0"])
  return figures


def latency_worker(exports: list) -> None:
  """Prints {export: {ms_per_image, params}} as one JSON line."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  figures = {}
  for export in exports:
    loaded = tf.saved_model.load(load_lib.resolve_export(export))
    image = np.random.default_rng(0).random([32, 32, 3], np.float32)
    figures[export] = {
        "ms_per_image": round(deploy.latency_ms(
            lambda x, m=loaded: m.serve(tf.constant(x)), image), 4),
        "params": int(sum(v.shape.num_elements()
                          for v in loaded.trainable_variables))}
  print(json.dumps(figures))


# === Report ==================================================================

def verdict(comparison: dict) -> str:
  """The claim, in one plain sentence (a: distilled, b: fine-tuned)."""
  c = comparison
  figures = (f"distilled {100 * c['top1_a']:.1f}% vs fine-tuned "
             f"{100 * c['top1_b']:.1f}% ({c['a_minus_b_points']:+.1f} points; "
             f"only the distilled right on {c['only_a_right']}, only the "
             f"fine-tuned on {c['only_b_right']} of {c['images']} test "
             f"images; z={c['z']:+.2f}, sign test p={c['sign_test_p']:.2g})")
  if c["only_a_right"] > c["only_b_right"] and c["sign_test_p"] < 0.05:
    return ("The paper's claim HELD: the distilled 0.125x student beats the "
            f"0.125x network fine-tuned on the same labels: {figures}.")
  if c["only_a_right"] > c["only_b_right"]:
    return ("The paper's claim was NOT SHOWN: the distilled 0.125x student "
            "is ahead of the 0.125x fine-tuned network, but within noise: "
            f"{figures}.")
  return ("The paper's claim did NOT HOLD: the distilled 0.125x student "
          f"does not beat the 0.125x fine-tuned network: {figures}.")


def table_rows(exports: dict, tests: dict, right: dict, figures: dict,
               deployed, litert_file: str) -> dict:
  """{row key: its figures}, each compared with the distilled student."""
  rows = {}
  for key, label in ROWS:
    if key == "litert_int8":
      rows[key] = {"label": label, "file": litert_file,
                   "top1": deployed["top1_converted"],
                   "params": figures[exports["distilled"]]["params"],
                   "bytes": deployed["file_bytes"],
                   "ms_per_image": deployed["ms_per_image"],
                   "top1_agreement": deployed["top1_agreement"]}
    else:
      rows[key] = {"label": label, "export": exports[key],
                   "top1": tests[key]["top1"],
                   "top1_float32_paired": float(right[key].mean()),
                   "bytes": atomic.folder_bytes(load_lib.resolve_export(
                       exports[key])),
                   **figures[exports[key]]}
    if key != "distilled":
      rows[key]["vs_distilled"] = paired(right["distilled"], right[key])
  return rows


def markdown_table(rows: dict) -> str:
  lines = ["| model | test top-1 | params | size MB | ms/image | "
           "vs distilled: only distilled right / only this right (p) |",
           "|---|---|---|---|---|---|"]
  for key, label in ROWS:
    row = rows.get(key)
    if row is None:
      lines.append(f"| {label} | failed | - | - | - | - |")
      continue
    vs = row.get("vs_distilled")
    cell = (f"{vs['only_a_right']} / {vs['only_b_right']} "
            f"(p={vs['sign_test_p']:.2g})" if vs else "-")
    lines.append(f"| {row['label']} | {100 * row['top1']:.1f}% | "
                 f"{row['params']:,} | {row['bytes'] / 1e6:.2f} | "
                 f"{row['ms_per_image']:.2f} | {cell} |")
  return "\n".join(lines)


# === Main ====================================================================

def train_all(a, data_root: str):
  """Runs every training stage; ({name: result}, stages, the kept start)."""
  stages = labeled_stages(a, data_root)
  results = {}
  for name in ("teacher_pretrain", "teacher_finetune", "small_pretrain",
               "small_finetune", "small_supervised"):
    results[name] = run_stage(stages[name])
  check_same_labels(stages)
  candidates = distill_stages(a, data_root,
                              export_of(stages["teacher_finetune"]),
                              export_of(stages["small_pretrain"]))
  for start, flags in candidates.items():
    stages[f"distill_{start}"] = flags
    results[f"distill_{start}"] = run_stage(flags)
  val = {s: results[f"distill_{s}"]["top1"] for s in candidates}
  kept = max(candidates, key=lambda s: (val[s], -STARTS.index(s)))
  print("\nstudent's start, on val: " + ", ".join(
      f"{s} {100 * v:.1f}%" for s, v in val.items()) + f" -> {kept}")
  return results, stages, kept


def main(argv=None):
  a = parse_args(argv)
  if a.latency_of is not None:
    latency_worker(a.latency_of)
    return
  cli.setup_logging()   # the library's progress, as run.py shows it
  if not os.path.isdir(os.path.join(a.data_dir, "train")):
    sys.exit(f"--data_dir={a.data_dir!r} has no train/ folder; point it at "
             "the CIFAR-10 image folder.")
  os.makedirs(a.out, exist_ok=True)
  data_root = label_efficiency.make_split_folder(a.data_dir, a.out,
                                                 a.holdout)
  start = time.time()
  results, stages, kept = train_all(a, data_root)
  exports = {"teacher": export_of(stages["teacher_finetune"]),
             "distilled": export_of(stages[f"distill_{kept}"]),
             "finetuned": export_of(stages["small_finetune"]),
             "supervised": export_of(stages["small_supervised"])}
  tests = {}
  for key, export in exports.items():
    stages[f"test_{key}"] = eval_flags(a, export, data_root, key)
    tests[key] = run_stage(stages[f"test_{key}"])

  students = {f"distilled_{start}": export_of(stages[f"distill_{start}"])
              for start in STARTS if f"distill_{start}" in stages}
  checks = deploy_students(a, data_root, students, stages)
  deployed = checks[deploy_name(f"distilled_{kept}", "litert", "int8")]
  litert_file = deployed["file"]

  labels, right = test_predictions(a, data_root, exports, litert_file)
  check_same_top1(tests, right, a.max_test_images)
  rows = table_rows(exports, tests, right,
                    savedmodel_figures(list(exports.values())), deployed,
                    litert_file)
  rows["distilled"]["label"] += f" (from {kept})"
  claim = verdict(rows["finetuned"]["vs_distilled"])

  report = {
      "date": time.strftime("%Y-%m-%d"), "machine": throughput.machine_info(),
      "command": " ".join(sys.argv), "budget": a.budget,
      "teacher_width": a.teacher_width, "student_width": a.student_width,
      "label_fraction": a.fraction, "student_start": kept,
      "student_start_val_top1": {s: results[f"distill_{s}"]["top1"]
                                 for s in STARTS
                                 if f"distill_{s}" in results},
      "test_images": int(len(labels)),
      "latency": "median ms of one image (batch 1), one CPU thread: "
                 "TensorFlow calling the SavedModel's serve (the faster of "
                 "oneDNN on and off), or LiteRT",
      "total_minutes": round((time.time() - start) / 60, 1),
      "flags": {name: flags for name, flags in stages.items()},
      "training": results, "test": tests, "deploy": checks,
      "rows": rows, "claim": claim}
  with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print("\n" + markdown_table(rows))
  print(f"\nThe student's start, chosen on val: {kept}. {claim}")
  print(f"total {report['total_minutes']} min; wrote {a.out}/results.json")
  print("\n" + deploy_table(checks))
  missed = [name for name, c in checks.items() if not c["met"]]
  if missed:
    sys.exit(f"deployable exports below their targets: {', '.join(missed)} "
             "(figures above and in results.json).")


if __name__ == "__main__":
  main()
