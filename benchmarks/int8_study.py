r"""Where a LiteRT int8 file's disagreement with its SavedModel comes from.

  .venv/bin/python benchmarks/int8_study.py \
      --data_dir=runs/small_student/data \
      --export student=runs/small_student/distill_scratch/saved_model \
      [--export NAME=PATH ...] [--json PATH]

For each export (one with a supervised head), on every image of the test
split of the image folder at --data_dir, beside the SavedModel's float32
probabilities (simclr_tf.deploy's serving function), this converts and runs:

  int8            what `run.py --mode=export --quantize=int8` writes: every
                  op in int8, calibrated on --calibration training images
                  chosen with the seed;
  int8, head f32  the same with the two dense layers and the softmax kept in
                  float32 (the quantization debugger's deny-list);
  int8, small f32 the same with every convolution and dense layer of fewer
                  than 1,024 weights kept in float32: the layers that
                  dynamic-range quantization leaves in float32;
  int16x8         int8 weights with int16 activations (TFLite's 16x8 mode);
  dynamic         int8 weights, float activations (`--quantize=dynamic`;
                  layers of fewer than 1,024 weights stay float32);

and reports each one's top-1 agreement, its top-1 against the SavedModel's
and its size; the SavedModel's own top-2 probability margins (how many test
images are near-ties); and, from the quantization debugger on the int8
conversion, each quantised tensor's root-mean-square error in units of its
quantisation step (1/sqrt(12) = 0.29 is pure rounding: larger values point
at clipped ranges).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# simclr_tf first: it chooses oneDNN before TensorFlow is imported.
from simclr_tf import deploy  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import throughput  # pylint: disable=g-import-not-at-top

_HEAD_OPS = ["FULLY_CONNECTED", "SOFTMAX"]


def _converter(source, representative, supported_ops=None):
  """deploy's int8 converter (its dynamic-range one without images), with
  other `supported_ops` if given."""
  # pylint: disable-next=protected-access
  converter = deploy._litert_converter(
      source, "dynamic" if representative is None else "int8", representative)
  if supported_ops:
    converter.target_spec.supported_ops = supported_ops
  return converter


def _small_layers(model: bytes, min_weights: int = 1024) -> list:
  """Output tensor names of the convolutions and dense layers of `model`
  with fewer than `min_weights` weights."""
  # pylint: disable=g-import-not-at-top,protected-access
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_content=model)
  tensor = lambda index: interpreter._get_tensor_details(index, 0)
  return [tensor(op["outputs"][0])["name"]
          for op in interpreter._get_ops_details()
          if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")
          and np.prod(tensor(op["inputs"][1])["shape"]) < min_weights]


def _denylisted(source, representative, **options) -> bytes:
  debugger = tf.lite.experimental.QuantizationDebugger(
      converter=_converter(source, representative,
                           [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                            tf.lite.OpsSet.TFLITE_BUILTINS]),
      debug_options=tf.lite.experimental.QuantizationDebugOptions(**options))
  return debugger.get_nondebug_quantized_model()


def _variants(source, representative) -> dict:
  """{name: (tflite bytes, debugger or None)}."""
  ops = tf.lite.OpsSet
  full_int8 = _converter(source, representative).convert()
  out = {"dynamic": (_converter(source, None).convert(), None)}
  debugger = tf.lite.experimental.QuantizationDebugger(
      converter=_converter(source, representative),
      debug_dataset=lambda: ([image[None]] for image in representative[:100]))
  debugger.run()
  out["int8"] = (full_int8, debugger)
  out["int8, head f32"] = (_denylisted(source, representative,
                                       denylisted_ops=_HEAD_OPS), None)
  out["int8, small f32"] = (_denylisted(
      source, representative,
      denylisted_nodes=_small_layers(out["int8"][0])), None)
  out["int16x8"] = (_converter(
      source, representative,
      [ops.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
       ops.TFLITE_BUILTINS]).convert(), None)
  return out


def _layer_errors(debugger) -> dict:
  """RMSE / scale of every quantised tensor: summary and the worst three."""
  buf = io.StringIO()
  debugger.layer_statistics_dump(buf)
  rows = [(r["op_name"], r["tensor_name"],
           float(r["mean_squared_error"]) ** 0.5 / float(r["scale"]))
          for r in csv.DictReader(io.StringIO(buf.getvalue()))
          if float(r["scale"]) > 0 and r["op_name"] not in ("PAD", "RESHAPE")]
  values = np.array([v for _, _, v in rows])
  worst = sorted(rows, key=lambda r: -r[2])[:3]
  return {"tensors": len(rows), "median": float(np.median(values)),
          "max": float(values.max()),
          "worst": [{"op": o, "tensor": t[:80], "rmse_over_scale": round(v, 3)}
                    for o, t, v in worst]}


def study(name: str, path: str, data_dir: str, calibration: int,
          seed: int, tmp: str) -> dict:
  # pylint: disable-next=protected-access
  source = deploy._load_source(path, 32, deploy.OUTPUTS)
  train, _ = deploy.read_split("image_folder", data_dir, "train", 32,
                               count=calibration, seed=seed)
  test, labels = deploy.read_split("image_folder", data_dir, "test", 32)
  reference = deploy.run_batches(source.function, test)[deploy.PROBABILITIES]
  top2 = np.sort(reference, axis=1)[:, -2:]
  margin = top2[:, 1] - top2[:, 0]
  expected = reference.argmax(1)
  result = {"export": path, "images": len(test),
            "top1_savedmodel": float((expected == labels).mean()),
            "margin_median": float(np.median(margin)),
            "share_margin_below_0.02": float((margin < 0.02).mean()),
            "variants": {}}
  for variant, (model, debugger) in _variants(source, train).items():
    file = os.path.join(tmp, f"{name}.tflite")
    with open(file, "wb") as f:
      f.write(model)
    got = deploy.run_batches(deploy.load(file), test)[
        deploy.PROBABILITIES].argmax(1)
    row = {"agreement": float((got == expected).mean()),
           "agreement_margin_above_0.02": float(
               (got == expected)[margin >= 0.02].mean()),
           "top1": float((got == labels).mean()), "bytes": len(model)}
    if debugger is not None:
      row["layer_errors"] = _layer_errors(debugger)
    result["variants"][variant] = row
    print(f"{name:12s} {variant:16s} agreement {row['agreement']:.2%} "
          f"(margin>=0.02: {row['agreement_margin_above_0.02']:.2%}) "
          f"top-1 {row['top1']:.2%} vs {result['top1_savedmodel']:.2%} "
          f"{len(model) / 1e6:.2f} MB", flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True,
                      help="an image folder with train/ and test/")
  parser.add_argument("--export", action="append", required=True,
                      metavar="NAME=PATH", help="an export with a head")
  parser.add_argument("--calibration", type=int,
                      default=deploy.REPRESENTATIVE_COUNT)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  start = time.time()
  tmp = tempfile.mkdtemp(prefix="int8_study_")
  results = {"date": time.strftime("%Y-%m-%d"),
             "machine": throughput.machine_info(),
             "command": " ".join(sys.argv),
             "versions": deploy._versions("litert"),  # pylint: disable=protected-access
             "calibration_images": args.calibration, "exports": {}}
  for item in args.export:
    name, path = item.split("=", 1)
    results["exports"][name] = study(name, path, args.data_dir,
                                     args.calibration, args.seed, tmp)
    print(json.dumps(results["exports"][name]["variants"]["int8"]
                     ["layer_errors"]))
  shutil.rmtree(tmp)
  results["seconds"] = round(time.time() - start, 1)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
