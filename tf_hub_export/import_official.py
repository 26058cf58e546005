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

Which projection output feeds `head_supervised` (the official
`--ft_proj_selector`) is read off the official graph where the source has one
(a SavedModel, a TF1 hub module or `model.ckpt-N.meta`, or the `saved_model/`
tf2/run.py wrote beside its checkpoints); a flag that contradicts the graph is
refused. Without a graph the weights decide when only one output has the
head's input width; otherwise 0 is assumed and the summary line says so.

Every tensor the import needs is read and checksum-checked before any model
is built. Nothing is written to DIR unless the import completed: the export is
built in a temporary folder beside it, reloaded and compared with the imported
Keras model, then renamed into place; on any failure the temporary folder is
removed and every file that was there before is left as it was.

Exit status (the error is one line, `import_official: error: ...`, the last
line of stderr, naming the problem and the fix):
  0  imported; the summary line says how the selector was decided and counts
     unneeded tensors (optimizer slots, ...) that could not be read;
  2  bad input: not an official SimCLR checkpoint, a truncated or damaged
     file (data, index, saved_model.pb, .meta), a layout this importer does
     not know, a flag out of range or contradicting the graph, an unreadable
     or non-UTF-8 --class_names file, an existing --output;
  3  the export could not be written (disk full, read-only or unwritable
     folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import time
from typing import Optional, Sequence

from simclr_tf import atomic
from simclr_tf.config import (MIN_IMAGE_SIZE_CIFAR_STEM,
                              MIN_IMAGE_SIZE_IMAGENET_STEM)
from simclr_tf import config as config_lib
from simclr_tf.models.config import CIFAR_STEM_MAX_SIZE, fields_of_kind

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 3
# The export's nominal image size: its outputs do not depend on it, but the
# next stage builds its stem and batches from it (run.py's own limit).
MAX_IMAGE_SIZE = config_lib.MAX_IMAGE_SIZE


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
  head_input: object = None          # official_arch.HeadInput
  unreadable_unused: tuple = ()      # keys not imported that cannot be read

  def arch_flags(self) -> str:
    """The run.py flags a run on this export needs: its architecture, the
    image size and, with a supervised head, the projection output the head
    reads (run.py's own default differs from the official one)."""
    flags = [f"--{name}={getattr(self.model_config, name)}"
             for name in fields_of_kind("arch")]
    flags.append(f"--image_size={self.image_size}")
    if self.model_config.num_classes:
      flags.append(f"--ft_proj_selector={self.model_config.sup_head_input}")
    return " ".join(flags)

  def summary(self) -> str:
    """The one line printed after an import."""
    from tf_hub_export import official  # pylint: disable=g-import-not-at-top
    notes = []
    if self.head_input is not None:
      notes.append(self.head_input.describe())
    if self.unreadable_unused:
      notes.append(
          f"{official.describe_unused(list(self.unreadable_unused))} "
          "unreadable and not needed: skipped (the data file is damaged "
          "there; download it again before training it further)")
    return (f"Imported {self.num_weights} weights from a {self.form} "
            f"({_describe(self.model_config)}, step {self.global_step}) into "
            f"{self.output} in {self.seconds:.1f} s"
            + "".join(f"; {n}" for n in notes) + ".")


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


def _write_failed(output: str, reason: str) -> atomic.WriteError:
  """One line naming --output, the reason and the fix."""
  return atomic.WriteError(
      f"cannot write --output={output!r} ({reason}); nothing was written "
      "there and the source is untouched: free some space or choose a "
      "writable folder, then rerun the same command.")


def _reason(error: BaseException) -> str:
  """The OS or TensorFlow reason under a failed write ('No space left on
  device'), without TensorFlow's op decorations and temporary paths."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if not isinstance(e, atomic.WriteError):
      text = str(getattr(e, "strerror", None) or getattr(e, "message", None)
                 or e)
      text = re.sub(r"\{\{.*?\}\}|\s*\[Op:\w+\]", "", text).strip()
      if text:
        return text.splitlines()[0].split("; ")[-1].strip()[:160]
    e = e.__cause__ or e.__context__
  return str(error).strip().splitlines()[0][:160] or type(error).__name__


def _check_writable(output: str) -> None:
  """Fails early (before reading anything) when --output cannot be created:
  makes and removes a staging folder where the import will write."""
  folder = os.path.dirname(output)
  while not os.path.isdir(folder):
    if os.path.exists(folder):
      raise atomic.WriteError(
          f"cannot write --output={output!r}: {folder} is a file, not a "
          "folder; choose another --output.")
    folder = os.path.dirname(folder)
  try:
    os.rmdir(tempfile.mkdtemp(prefix=atomic.staging_prefix(output),
                              dir=folder))
  except OSError as e:
    raise _write_failed(output, _reason(e)) from e


class FlagError(ValueError):
  """A flag value that cannot work, found before TensorFlow is imported."""


def _image_size_problem(image_size: Optional[int],
                        cifar_stem: Optional[bool] = None) -> Optional[str]:
  """Why --image_size cannot work (with the stem, once known), or None."""
  if image_size is None:
    return None
  low, high, what = MIN_IMAGE_SIZE_CIFAR_STEM, MAX_IMAGE_SIZE, ""
  if cifar_stem is True:
    high, what = CIFAR_STEM_MAX_SIZE, " for this checkpoint's CIFAR stem"
  elif cifar_stem is False:
    low, what = MIN_IMAGE_SIZE_IMAGENET_STEM, (
        " for this checkpoint's ImageNet stem")
  if low <= image_size <= high:
    return None
  return (f"--image_size={image_size} is out of range{what}: use {low} to "
          f"{high} pixels (or leave it out: 32 for a CIFAR stem, 224 for an "
          "ImageNet one).")


def _selector_problem(ft_proj_selector: Optional[int]) -> Optional[str]:
  if ft_proj_selector is None or ft_proj_selector >= 0:
    return None
  return (f"--ft_proj_selector={ft_proj_selector} is negative: use 0 (the "
          "encoder output) or k (projection layer k), or leave it out to "
          "read it off the official graph.")


def import_checkpoint(src: str, output: str, ema: bool = False,
                      image_size: Optional[int] = None,
                      ft_proj_selector: Optional[int] = None,
                      class_names: Sequence[str] = ()) -> ImportReport:
  """Reads SRC, builds our model with its weights, exports it to `output`.

  Args:
    src: an official checkpoint (any form of `official.FORMS`).
    output: the folder to create (must not exist, or be empty).
    ema: import the TF1 `ema_model/` copy instead of the online weights.
    image_size: the export's nominal image size (its outputs do not depend
      on it; default 32 for a CIFAR stem, else 224).
    ft_proj_selector: which projection output feeds `head_supervised`; None
      reads it off the official graph, or assumes 0 where there is none. A
      value that contradicts the graph is refused.
    class_names: names of the supervised head's classes, if known.
  Returns:
    An ImportReport.
  Raises:
    OfficialFormatError: bad input (one line naming the problem and fix).
    simclr_tf.atomic.WriteError: `output` could not be written (nothing was;
      the staging folder is removed).
  """
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf

  from simclr_tf.models.simclr import build_float32
  from tf_hub_export import export as export_lib
  from tf_hub_export import load as load_lib
  from tf_hub_export import official
  start = time.time()
  problem = (_image_size_problem(image_size) or
             _selector_problem(ft_proj_selector))
  if problem:
    raise official.OfficialFormatError(problem)
  output = os.path.abspath(output)
  _check_output(output)
  _check_writable(output)
  weights = official.read(src, ema=ema)
  config, head_input = official.read_architecture(weights, ft_proj_selector)
  if class_names and len(class_names) != config.num_classes:
    has = (f"the supervised head has {config.num_classes} classes; give one "
           "name per class, one per line, in the head's order"
           if config.num_classes else
           "this checkpoint has no supervised head; drop --class_names")
    raise official.OfficialFormatError(
        f"--class_names lists {len(class_names)} names but {has}.")
  problem = _image_size_problem(image_size, config.cifar_stem)
  if problem:
    raise official.OfficialFormatError(problem)
  image_size = image_size or (32 if config.cifar_stem else 224)
  unreadable = official.verify(weights)
  model = build_float32(config, image_size)
  count = _assign(model, weights)

  reasons = []

  def write(staged):
    try:
      export_lib.export_saved_model(
          model, staged, image_size, class_names=class_names,
          train_mode=f"import:{weights.form}",
          global_step=weights.global_step)
    except atomic.WriteError as e:
      reasons.append(_reason(e))    # while its cause is still attached
      raise
    # The written export must compute what the imported model computes.
    load_lib.check_outputs(model, tf.saved_model.load(staged), image_size)
    _check_output(output)

  try:
    atomic.write_dir(output, write, replace=False)
  except atomic.WriteError as e:
    raise _write_failed(output, reasons[0] if reasons else _reason(e)) from e
  return ImportReport(form=weights.form, output=output, model_config=config,
                      image_size=image_size, num_weights=count,
                      global_step=weights.global_step,
                      seconds=time.time() - start, head_input=head_input,
                      unreadable_unused=tuple(unreadable))


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
  p.add_argument("--ft_proj_selector", type=int, default=None,
                 help="projection output that feeds head_supervised (0: "
                      "encoder output); default: read off the official "
                      "graph, else 0 (and the summary says it was assumed)")
  p.add_argument("--class_names", default=None,
                 help="text file with one class name per line")
  return p


def _read_names(path: Optional[str]) -> tuple:
  """Class names, one per line, from a UTF-8 text file; FlagError if not."""
  if not path:
    return ()
  fix = "give a UTF-8 text file with one class name per line"
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise FlagError(
        f"--class_names={path!r} cannot be read ({e.strerror or e}); "
        f"{fix}.") from e
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise FlagError(
        f"--class_names={path!r} is not UTF-8 text (byte "
        f"0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8, "
        "one class name per line.") from e
  names = tuple(line.strip() for line in text.splitlines() if line.strip())
  if not names:
    raise FlagError(f"--class_names={path!r} lists no names; {fix}.")
  return names


def _error(error: BaseException) -> None:
  message = str(error).strip().splitlines()
  print(f"import_official: error: "
        f"{message[0] if message else type(error).__name__}",
        file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  # Flags first, before TensorFlow is imported: a bad one fails at once.
  try:
    problem = (_image_size_problem(args.image_size) or
               _selector_problem(args.ft_proj_selector))
    if problem:
      raise FlagError(problem)
    names = _read_names(args.class_names)
  except FlagError as e:
    _error(e)
    return EXIT_BAD_INPUT
  # pylint: disable=g-import-not-at-top
  from tf_hub_export.official import OfficialFormatError
  try:
    report = import_checkpoint(args.src, args.output, ema=args.ema,
                               image_size=args.image_size,
                               ft_proj_selector=args.ft_proj_selector,
                               class_names=names)
  except atomic.WriteError as e:
    _error(e)
    return EXIT_WRITE_FAILED
  except (OfficialFormatError, OSError) as e:
    _error(e)
    return EXIT_BAD_INPUT
  print(report.summary())
  print(f"Use it with: --init_from={report.output} {report.arch_flags()}")
  return 0


def entry_point():
  sys.exit(main())


if __name__ == "__main__":
  entry_point()
