r"""Checks of the distillation stage against a real fine-tuned teacher.

  .venv/bin/python benchmarks/distill_checks.py \
      --teacher=runs/label_efficiency/finetune_010/saved_model \
      --data_dir=runs/label_efficiency/data --split=val

The suspects when a self-distilled student ends below its teacher, each
measured on real images (the --split of the image folder --data_dir):

  bn_mode      the teacher as the distillation stage calls it
               (`load_logits_fn`) against the SavedModel called with
               training=False and with training=True: it must equal the
               first (batch norm in inference mode), not the second.
  precision    the teacher's logits in mixed_bfloat16 (what the stage runs
               where bfloat16 is native) against float32: top-1 agreement,
               accuracy of each, and the KL divergence between their
               softened labels at --temperature (bfloat16 rounding is
               amplified by 1/T).
  temperature  the loss applies 1/T to both sides: at student = teacher it
               equals T^2 times the entropy of the teacher's soft labels
               and its gradient is zero.
  soft_labels  how soft the teacher's labels are at T and at 1: the mean
               top probability and entropy (T = 0.1 makes them nearly
               one-hot pseudo-labels).
  student      the student as the stage builds it from --init_from=teacher:
               top-1 at step 0 with a new zero head (the default) and with
               --init_head (the teacher's head restored).
  paired       with --student=EXPORT (a distilled model): teacher and
               student on the same images, the images only one of them gets
               right, and the difference in standard errors (McNemar), which
               says whether a student below its teacher is more than noise.

Prints one line per check and writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import simclr_tf  # pylint: disable=unused-import,g-import-not-at-top  (cpu)
import keras  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from simclr_tf import losses  # pylint: disable=g-import-not-at-top
from simclr_tf import handover  # pylint: disable=g-import-not-at-top
from simclr_tf.data import pipeline  # pylint: disable=g-import-not-at-top
from simclr_tf.models import simclr as simclr_lib  # pylint: disable=g-import-not-at-top
from tf_hub_export import load as load_lib  # pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--teacher", required=True, help="A fine-tune export.")
  p.add_argument("--data_dir", required=True, help="Image folder ROOT.")
  p.add_argument("--split", default="val")
  p.add_argument("--temperature", type=float, default=0.1)
  p.add_argument("--max_images", type=int, default=0,
                 help="Use at most this many images (0: the whole split).")
  p.add_argument("--student", default="",
                 help="A distilled export to compare with the teacher.")
  p.add_argument("--json", default="")
  return p.parse_args(argv)


def load_images(a, image_size: int):
  ds = pipeline.build_dataset(
      dataset="image_folder", data_dir=a.data_dir, split=a.split,
      stage="eval", image_size=image_size, batch_size=250, cache=False)
  images, labels = [], []
  for batch in ds:
    images.append(batch["image"].numpy())
    labels.append(batch["label"].numpy())
  images, labels = np.concatenate(images), np.concatenate(labels)
  if a.max_images and a.max_images < len(labels):
    # Every k-th image: the folder is listed class by class.
    keep = np.linspace(0, len(labels) - 1, a.max_images).astype(int)
    images, labels = images[keep], labels[keep]
  return images, labels


def batched(fn, images, size=250):
  return np.concatenate([np.asarray(fn(tf.constant(images[i:i + size])),
                                    np.float32)
                         for i in range(0, len(images), size)])


def softmax(x, t):
  z = x / t - (x / t).max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def main(argv=None):
  a = parse_args(argv)
  meta = load_lib.read_meta(a.teacher, "teacher")
  images, labels = load_images(a, meta.image_size)
  t = a.temperature
  report = {"teacher": a.teacher, "split": a.split, "images": len(images),
            "temperature": t}

  keras.config.set_dtype_policy("float32")
  stage_fn, _ = load_lib.load_logits_fn(a.teacher)
  fp32 = batched(stage_fn, images)
  loaded = tf.saved_model.load(load_lib.resolve_export(a.teacher))
  inference = batched(lambda x: loaded(x, training=False)["logits_sup"],
                      images)
  train_bn = batched(lambda x: loaded(x, training=True)["logits_sup"], images)
  report["bn_mode"] = {
      "max_abs_diff_vs_training_false": float(np.abs(fp32 - inference).max()),
      "max_abs_diff_vs_training_true": float(np.abs(fp32 - train_bn).max()),
      "top1_training_false": float((inference.argmax(-1) == labels).mean()),
      "top1_training_true": float((train_bn.argmax(-1) == labels).mean())}

  keras.config.set_dtype_policy("mixed_bfloat16")
  bf16_fn, _ = load_lib.load_logits_fn(a.teacher)
  bf16 = batched(bf16_fn, images)
  keras.config.set_dtype_policy("float32")
  p32, p16 = softmax(fp32, t), softmax(bf16, t)
  kl = (p32 * (np.log(p32 + 1e-12) - np.log(p16 + 1e-12))).sum(-1)
  report["precision"] = {
      "top1_fp32": float((fp32.argmax(-1) == labels).mean()),
      "top1_bf16": float((bf16.argmax(-1) == labels).mean()),
      "argmax_agreement": float((fp32.argmax(-1) == bf16.argmax(-1)).mean()),
      "max_abs_logit_diff": float(np.abs(fp32 - bf16).max()),
      "mean_kl_at_T": float(kl.mean()),
      "logit_range": [float(fp32.min()), float(fp32.max())]}

  logits = tf.constant(fp32)
  with tf.GradientTape() as tape:
    student = tf.Variable(fp32)
    loss = losses.distillation_loss(logits, student, t)
  grad = tape.gradient(loss, student)
  entropy = -(p32 * np.log(p32 + 1e-12)).sum(-1)
  report["temperature"] = {
      "loss_at_student_eq_teacher": float(tf.reduce_mean(loss)),
      "t2_times_entropy": float(t * t * entropy.mean()),
      "max_abs_grad_at_student_eq_teacher": float(tf.reduce_max(
          tf.abs(grad)))}

  report["soft_labels"] = {}
  for temp in (t, 1.0):
    p = softmax(fp32, temp)
    report["soft_labels"][f"T={temp:g}"] = {
        "mean_top_prob": float(p.max(-1).mean()),
        "mean_entropy_nats": float(-(p * np.log(p + 1e-12)).sum(-1).mean())}

  report["student"] = {}
  for name, restore_head in (("new_zero_head", False), ("init_head", True)):
    model, _, _ = load_lib.load_model(
        a.teacher,
        new_weights=None if restore_head else handover.is_supervised_head)
    out = batched(lambda x: model(x, training=False)["logits_sup"], images)
    report["student"][name] = {
        "top1_at_step_0": float((out.argmax(-1) == labels).mean()),
        "agreement_with_teacher": float((out.argmax(-1) ==
                                         fp32.argmax(-1)).mean())}

  if a.student:
    student_fn, _ = load_lib.load_logits_fn(a.student, "student")
    right_s = batched(student_fn, images).argmax(-1) == labels
    right_t = fp32.argmax(-1) == labels
    only_t, only_s = int((right_t & ~right_s).sum()), int(
        (right_s & ~right_t).sum())
    report["paired"] = {
        "student": a.student, "top1_teacher": float(right_t.mean()),
        "top1_student": float(right_s.mean()),
        "student_minus_teacher_points": 100 * float(right_s.mean() -
                                                    right_t.mean()),
        "only_teacher_right": only_t, "only_student_right": only_s,
        "standard_error_points": 100 * float(np.sqrt(only_t + only_s)) /
                                 len(labels),
        "z": float((only_s - only_t) / max(1.0, np.sqrt(only_t + only_s)))}

  for key in ("bn_mode", "precision", "temperature", "soft_labels",
              "student", "paired"):
    if key not in report:
      continue
    print(f"{key:<12} {json.dumps(report[key])}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
