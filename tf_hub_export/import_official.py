r"""Imports a released SimCLRv2 checkpoint (TF1 or TF2) as our own export.

  python -m tf_hub_export.import_official SRC --output=DIR [--ema]
      [--image_size=N] [--ft_proj_selector=K] [--class_names=FILE]

SRC is any form the official code wrote (see `tf_hub_export.official`): a
TF2 training checkpoint, a TF2 `saved_model/`, a TF1 `model.ckpt-N` or a TF1
`hub/` module, or the released model folder holding them. The architecture
is read off the weights (depth, width, selective kernels and their ratio,
SE, stem, projection head, classes), every tensor is placed by structure and
shape-checked, and the result is written as a reusable SavedModel with
`assets.extra/simclr_tf.json`, usable wherever an export of ours is:
`run.py --init_from=DIR` or `--teacher=DIR`, `keras.layers.TFSMLayer`,
`hub.KerasLayer`.

Nothing is written to DIR unless the import completed: the export is built in
a temporary folder beside it, reloaded and compared with the imported Keras
model, then renamed into place. Exit status 2 with one line naming what was
found and what was expected for anything that is not an official SimCLR
checkpoint, a damaged one, or a layout this importer does not know.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

from simclr_tf import atomic
from simclr_tf.models.config import fields_of_kind

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_BAD_INPUT = 2


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """What an import did."""

  form: str
  output: str
  model_config: object
  image_size: int
  num_weights: int
  global_step: int
  seconds: float

  def arch_flags(self) -> str:
    """The run.py flags that describe this architecture."""
    flags = [f"--{name}={getattr(self.model_config, name)}"
             for name in fields_of_kind("arch")]
    return " ".join(flags + [f"--image_size={self.image_size}"])


def _model_name_prefix(model) -> str:
  return model.name + "/"


def _assign(model, weights) -> int:
  """Copies every tensor onto the model's variable of the same path."""
  # pylint: disable=g-import-not-at-top
  from tf_hub_export.official import OfficialFormatError
  prefix = _model_name_prefix(model)
  used = set()
  for var in model.variables:
    path = var.path[len(prefix):] if var.path.startswith(prefix) else var.path
    if path not in weights.keys:
      raise OfficialFormatError(
          f"the checkpoint has no tensor for our {path} (architecture read "
          f"as {_describe(model.model_config)}); it is incomplete or of a "
          "layout this importer does not know.")
    shape = tuple(weights.shapes[path])
    if shape != tuple(var.shape):
      raise OfficialFormatError(
          f"{weights.keys[path]} has shape {shape} but our {path} needs "
          f"{tuple(var.shape)}; the checkpoint mixes architectures.")
    var.assign(weights.value(path))
    used.add(path)
  extra = sorted(set(weights.keys) - used) + list(weights.leftovers)
  if extra:
    shown = weights.keys.get(extra[0], extra[0])
    raise OfficialFormatError(
        f"{len(extra)} tensor(s) of the checkpoint map to no layer of the "
        f"model read from it (first: {shown!r}); refusing to drop weights.")
  return len(used)


def _describe(c) -> str:
  sk = f", sk {c.sk_ratio}" if c.sk_ratio else ""
  se = f", se {c.se_ratio}" if c.se_ratio else ""
  stem = "CIFAR stem" if c.cifar_stem else "ImageNet stem"
  return (f"ResNet-{c.resnet_depth} {c.width_multiplier}x{sk}{se}, {stem}, "
          f"{c.proj_head_mode} head x{c.num_proj_layers}, "
          f"{c.num_classes} classes")


def _check_output(output: str) -> None:
  from tf_hub_export.official import OfficialFormatError  # pylint: disable=g-import-not-at-top
  if os.path.exists(output) and (not os.path.isdir(output) or
                                 os.listdir(output)):
    raise OfficialFormatError(
        f"--output={output!r} already exists; choose a new folder (nothing "
        "was overwritten).")


def import_checkpoint(src: str, output: str, ema: bool = False,
                      image_size: Optional[int] = None,
                      ft_proj_selector: int = 0,
                      class_names: Sequence[str] = ()) -> ImportReport:
  """Reads SRC, builds our model with its weights, exports it to `output`.

  Args:
    src: an official checkpoint (any form of `official.FORMS`).
    output: the folder to create (must not exist, or be empty).
    ema: import the TF1 `ema_model/` copy instead of the online weights.
    image_size: the export's nominal image size (its outputs do not depend
      on it; default 32 for a CIFAR stem, else 224).
    ft_proj_selector: which projection output feeds `head_supervised`.
    class_names: names of the supervised head's classes, if known.
  Returns:
    An ImportReport. Raises OfficialFormatError with a one-line message.
  """
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf

  from simclr_tf.models.simclr import build_float32
  from tf_hub_export import export as export_lib
  from tf_hub_export import load as load_lib
  from tf_hub_export import official
  start = time.time()
  output = os.path.abspath(output)
  _check_output(output)
  weights = official.read(src, ema=ema)
  config = official.infer_model_config(weights, ft_proj_selector)
  if class_names and len(class_names) != config.num_classes:
    raise official.OfficialFormatError(
        f"--class_names lists {len(class_names)} names but the supervised "
        f"head has {config.num_classes} classes.")
  image_size = image_size or (32 if config.cifar_stem else 224)
  model = build_float32(config, image_size)
  count = _assign(model, weights)

  def write(staged):
    export_lib.export_saved_model(
        model, staged, image_size, class_names=class_names,
        train_mode=f"import:{weights.form}", global_step=weights.global_step)
    # The written export must compute what the imported model computes.
    load_lib.check_outputs(model, tf.saved_model.load(staged), image_size)
    _check_output(output)

  atomic.write_dir(output, write, replace=False)
  return ImportReport(form=weights.form, output=output, model_config=config,
                      image_size=image_size, num_weights=count,
                      global_step=weights.global_step,
                      seconds=time.time() - start)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="import_official",
      description="Import a released SimCLR (v1/v2, TF1 or TF2) checkpoint "
                  "as a reusable SavedModel of simclr-tf.")
  p.add_argument("src", help="checkpoint prefix, or a folder with a "
                             "checkpoint, saved_model/ or hub/")
  p.add_argument("--output", required=True,
                 help="new folder for the export (must not exist)")
  p.add_argument("--ema", action="store_true",
                 help="import the TF1 ema_model/ copy of the weights")
  p.add_argument("--image_size", type=int, default=None,
                 help="nominal image size (default 32 for a CIFAR stem, "
                      "else 224)")
  p.add_argument("--ft_proj_selector", type=int, default=0,
                 help="projection output that feeds head_supervised "
                      "(0: encoder output, as the official default)")
  p.add_argument("--class_names", default=None,
                 help="text file with one class name per line")
  return p


def _read_names(path: Optional[str]) -> tuple:
  if not path:
    return ()
  with open(path, encoding="utf-8") as f:
    return tuple(line.strip() for line in f if line.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  # pylint: disable=g-import-not-at-top
  from tf_hub_export.official import OfficialFormatError
  try:
    names = _read_names(args.class_names)
    report = import_checkpoint(args.src, args.output, ema=args.ema,
                               image_size=args.image_size,
                               ft_proj_selector=args.ft_proj_selector,
                               class_names=names)
  except (OfficialFormatError, OSError) as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"import_official: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(f"Imported {report.num_weights} weights from a {report.form} "
        f"({_describe(report.model_config)}, step {report.global_step}) "
        f"into {report.output} in {report.seconds:.1f} s.")
  print(f"Use it with: --init_from={report.output} {report.arch_flags()}")
  return 0


def entry_point():
  sys.exit(main())


if __name__ == "__main__":
  entry_point()
