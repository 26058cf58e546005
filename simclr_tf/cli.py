r"""The command line: SimCLRv2's stages, evaluation, embed and predict.

The only module that defines or reads flags: it turns them into a frozen
`simclr_tf.config.Config` and hands it to `simclr_tf.api.run`, the same
code the Python API runs. `run.py`, `python -m simclr_tf` and the
`simclr-tf` command all call `entry_point`.

  python run.py --mode=train_then_eval --train_mode=pretrain
  python -m simclr_tf --flagfile=flags/cifar10_pretrain.cfg \
      --dataset=image_folder --data_dir=../shared/data/cifar10

Exit status (each failure is one line, the last of stderr, and leaves
every file that was there before as it was):
  0    done;
  2    bad flags, data, exports or model_dir: refused before any model is
       built (a damaged or inconsistent export, a model_dir that holds
       another run, a split that is not there, ...);
  3    training stopped on a non-finite loss, or a checkpoint, export,
       result or output file could not be written (nothing half-written;
       the last checkpoint and export are left untouched);
  4    --mode=export: the converted file disagrees with the SavedModel on
       more than 1 - --min_agreement of the eval split (nothing kept);
  130  stopped by SIGINT (Ctrl-C) after saving a checkpoint;
  143  stopped by SIGTERM after saving a checkpoint (rerun the same command
       to continue, in both cases).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from simclr_tf import config as config_lib  # noqa: E402
from simclr_tf.models import config as model_config_lib  # noqa: E402

FLAGS = flags.FLAGS
_DEFAULTS = config_lib.Config()
# The architecture's flags, with their helps, come from its one definition.
_ARCH_FLAGS = model_config_lib.user_fields()

_ENUMS = {
    "mode": config_lib.MODES,
    "train_mode": config_lib.TRAIN_MODES,
    "proj_head_mode": config_lib.PROJ_HEAD_MODES,
    "optimizer": config_lib.OPTIMIZERS,
    "learning_rate_scaling": config_lib.LR_SCALINGS,
    "precision": config_lib.PRECISIONS,
    "strategy": config_lib.STRATEGIES,
    "output_format": config_lib.OUTPUT_FORMATS,
    "export_format": config_lib.EXPORT_FORMATS,
    "quantize": config_lib.QUANTIZATIONS,
    "onednn": config_lib.ONEDNN_SETTINGS,
}

_HELP = {
    "mode": "train, eval (on the latest checkpoint or --init_from), "
            "train_then_eval, embed / predict (apply the --init_from "
            "export to the images of --data_dir/--eval_split: "
            "embeddings.npy or predictions.csv in --model_dir), or export "
            "(the --init_from export as one LiteRT or ONNX file for devices, "
            "checked on the eval split, into a new --model_dir).",
    "export_format": "--mode=export: litert (a .tflite file for "
                     "ai-edge-litert / TFLite runtimes) or onnx.",
    "quantize": "--mode=export: none (float32), dynamic (int8 weights) or "
                "int8 (full integer, calibrated on 300 training images); "
                "int8 and dynamic are LiteRT only.",
    "min_agreement": "--mode=export: keep the file only if its top-1 "
                     "prediction (nearest neighbour for an embedding) "
                     "equals the SavedModel's on at least this fraction of "
                     "the eval split.",
    "train_mode": "pretrain (contrastive), finetune (labeled subset) or "
                  "distill (teacher's soft labels on unlabeled images).",
    "model_dir": "Where checkpoints, TensorBoard logs, result.json, "
                 "flags.json and saved_model/ are written. Rerunning the "
                 "same command continues from the latest checkpoint.",
    "init_from": "A saved_model/ written by a previous stage; its encoder "
                 "and projection head initialise this run (checked).",
    "init_head": "Also restore --init_from's supervised head (same "
                 "classes) instead of a new zero one: a self-distillation "
                 "student then starts as its teacher.",
    "teacher": "Distillation teacher: a SavedModel with a 'logits_sup' "
               "output (e.g. a fine-tune export).",
    "seed": "Seed of the label subset, data order, augmentations and "
            "initialisation.",
    "dataset": "'cifar10_sample' (bundled, offline), 'image_folder' "
               "(--data_dir=ROOT with ROOT/<split>/<class>/<image>, or "
               "ROOT/<split>/<image> unlabeled) or a TFDS name such as "
               "cifar10, imagenet2012, imagenet2012_subset/1pct.",
    "data_dir": "Image-folder root, or the TFDS data directory.",
    "train_split": "Split to train on.",
    "eval_split": "Split to evaluate on.",
    "image_size": "Input resolution; <= 32 uses the CIFAR stem (3x3 conv, "
                  "stride 1, no max-pool), >= 64 the ImageNet stem.",
    "color_jitter_strength": "Strength s of colour jitter (SimCLR: 1.0 "
                             "ImageNet, 0.5 CIFAR).",
    "use_blur": "Gaussian blur in pretraining augmentation (off for CIFAR).",
    "cache_dataset": "Cache decoded images in memory (decode once).",
    "label_fraction": "Fine-tune on a class-balanced fraction of the labels "
                      "(0, 1], chosen by --seed; written to "
                      "model_dir/label_subset.txt.",
    "strict_data": "Fail on the first unreadable image instead of skipping "
                   "and reporting it.",
    "ft_proj_selector": "Fine-tune from this projection layer (0: encoder "
                        "output as in SimCLR v1; 1: SimCLRv2's choice). "
                        "Layers above it are dropped.",
    "lineareval_while_pretraining": "Train a linear classifier on the "
                                    "stop-gradient representation during "
                                    "pretraining.",
    "fine_tune_after_block": "Freeze everything before block group K (-1: "
                             "train everything; 4: linear evaluation).",
    "train_batch_size": "Global training batch size (all replicas).",
    "eval_batch_size": "Global evaluation batch size.",
    "train_epochs": "Training epochs (ignored when --train_steps > 0).",
    "train_steps": "Training steps; 0 means --train_epochs.",
    "optimizer": "lars, momentum or adam.",
    "momentum": "Momentum of LARS and SGD.",
    "learning_rate": "Base learning rate, scaled by --learning_rate_scaling.",
    "learning_rate_scaling": "linear (lr x B/256) or sqrt (lr x sqrt(B)).",
    "warmup_epochs": "Linear warm-up epochs before cosine decay to 0.",
    "weight_decay": "Weight decay (L2) of kernels; never of batch norm or "
                    "biases.",
    "temperature": "NT-Xent temperature (0.1 ImageNet, 0.5 CIFAR).",
    "hidden_norm": "L2-normalise projections before NT-Xent.",
    "distill_temperature": "Distillation temperature (0.1 self-"
                           "distillation, 1.0 big-to-small).",
    "distill_label_weight": "Weight of the labeled cross-entropy added to "
                            "the distillation loss (paper: 0).",
    "memory_size": "Memory queue of momentum-encoder negatives (0: off; "
                   "paper: 65536).",
    "memory_momentum": "Moving-average momentum of the memory network.",
    "precision": "auto (mixed_bfloat16 on TPUs, GPUs of compute "
                 "capability >= 8 and CPUs with AVX512_BF16 or AMX, else "
                 "float32), float32, mixed_bfloat16 or mixed_float16 (with "
                 "loss scaling).",
    "jit_compile": "Compile the training step with XLA.",
    "steps_per_execution": "Training steps per tf.function call.",
    "onednn": "TensorFlow's oneDNN CPU kernels: auto (TensorFlow's "
              "default on CPUs with VNNI, AVX512_BF16 or AMX; on where "
              "TensorFlow would leave them off on an AVX2 CPU, being "
              "several times faster there), on or off. "
              "TF_ENABLE_ONEDNN_OPTS in the environment is kept under auto.",
    "checkpoint_steps": "Checkpoint every N steps (0: use "
                        "--checkpoint_epochs).",
    "checkpoint_epochs": "Checkpoint every N epochs.",
    "keep_checkpoint_max": "Checkpoints kept.",
    "log_images": "Write a few augmented pairs to TensorBoard at the start.",
    "knn_eval_epochs": "Pretraining: every N epochs, log the kNN top-1 (k=200, "
                       "cosine) of the eval split's encoder features against "
                       "the train split's; -1: every 10 epochs when the data "
                       "has labels; 0: off.",
    "knn_max_examples": "At most this many train (and eval) images for the "
                        "kNN monitor, spread over the split.",
    "output_format": "--mode=embed: npy (embeddings.npy + "
                     "embeddings_files.txt) or csv (embeddings.csv).",
    "strategy": "auto (TPU with --tpu, mirrored with several GPUs, else one "
                "device), one_device, mirrored, multi_worker_mirrored "
                "(reads TF_CONFIG) or tpu.",
    "tpu": "TPU name or address for the cluster resolver ('local' on a "
           "Cloud TPU VM).",
    "cpu_replicas": "Split the CPU into N logical devices under a mirrored "
                    "strategy (to try distributed code on a laptop).",
}


def _define_flags() -> None:
  for field in dataclasses.fields(config_lib.Config):
    name, default = field.name, getattr(_DEFAULTS, field.name)
    help_text = (model_config_lib.field_help(name) if name in _ARCH_FLAGS
                 else _HELP[name])
    if name in _ENUMS:
      flags.DEFINE_enum(name, default, _ENUMS[name], help_text)
    elif isinstance(default, bool):
      flags.DEFINE_bool(name, default, help_text)
    elif isinstance(default, int):
      flags.DEFINE_integer(name, default, help_text)
    elif isinstance(default, float):
      flags.DEFINE_float(name, default, help_text)
    else:
      flags.DEFINE_string(name, default, help_text)


_define_flags()


def config_from_flags() -> config_lib.Config:
  values = {f.name: FLAGS[f.name].value
            for f in dataclasses.fields(config_lib.Config)}
  return config_lib.Config(**values)


def config_from_args(args) -> config_lib.Config:
  """The validated Config that `run.py ARGS` would run.

  For scripts that write their recipes as flags and run them in-process
  with `simclr_tf.run`. Raises absl's flags.Error or ConfigError.
  """
  FLAGS.unparse_flags()
  FLAGS(["run.py", *args])
  return config_lib.validate(config_from_flags())


# Exit statuses (see the module docstring).
EXIT_BAD_CONFIG = 2
EXIT_TRAINING_FAILED = 3
EXIT_CHECK_FAILED = 4       # --mode=export: the file disagrees; not kept
EXIT_PREEMPTED = 128 + 15   # what a shell reports for a SIGTERM'd program
EXIT_INTERRUPTED = 128 + 2  # ... and for a SIGINT'd (Ctrl-C) one
_SIGNAL_EXITS = {"SIGTERM": EXIT_PREEMPTED, "SIGINT": EXIT_INTERRUPTED}


def _fail(message: str, status: int = EXIT_BAD_CONFIG) -> None:
  """Prints the one-line error and exits with `status`.

  The line must be the last of stderr: the process ends here, without
  the interpreter's shutdown, where TensorFlow's runtime can still log (its
  own buffers are flushed first)."""
  message = " ".join(str(message).split("\n")[0].split())
  sys.stdout.flush()
  sys.stderr.flush()
  print(f"run.py: error: {message}", file=sys.stderr, flush=True)
  if "tensorflow" in sys.modules:
    logging.shutdown()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


_HELP_FLAGS = ("--help", "-h", "-?", "--helpfull", "--helpshort",
               "--helpxml")


def _parse(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except SystemExit:
    # absl exits 1 after printing help; asking for help is not an error.
    if any(a in _HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise


def setup_logging() -> None:
  """Our progress at INFO on stderr; TensorFlow's own chatter at WARNING."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)
  ours = logging.getLogger("simclr_tf")
  ours.setLevel(logging.INFO)
  ours.propagate = False
  if not ours.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s simclr_tf %(levelname)s: %(message)s", "%H:%M:%S"))
    ours.addHandler(handler)


def format_result(result: dict) -> str:
  """One line per value, for the console."""
  return "\n".join(["Result:"] + [
      f"  {k}: {f'{v:.4f}' if isinstance(v, float) else v}"
      for k, v in result.items()])


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every option is a --flag "
          "(see --helpfull).")
  setup_logging()
  try:
    cfg = config_lib.validate(config_from_flags())
  except config_lib.ConfigError as e:
    _fail(str(e))
  # Before TensorFlow is imported; `import simclr_tf` chose for 'auto'.
  from simclr_tf import cpu  # pylint: disable=g-import-not-at-top
  logging.getLogger("simclr_tf").info(
      cpu.configure_onednn(cfg.onednn).describe())
  from simclr_tf import distribute  # pylint: disable=g-import-not-at-top
  distribute.split_cpu(cfg.cpu_replicas)
  # pylint: disable=g-import-not-at-top
  from simclr_tf import api
  from simclr_tf import atomic
  from simclr_tf import callbacks
  from simclr_tf import checkpoints
  from simclr_tf import deploy
  from simclr_tf import inference
  from tf_hub_export import load as load_lib
  try:
    result = api.run(cfg)
  except deploy.AgreementError as e:
    _fail(str(e), EXIT_CHECK_FAILED)
  except (config_lib.ConfigError, inference.InferenceError,
          load_lib.ExportError, deploy.DeployError) as e:
    _fail(str(e))
  except (callbacks.NonFiniteLossError, checkpoints.CheckpointWriteError,
          atomic.WriteError) as e:
    _fail(str(e), EXIT_TRAINING_FAILED)
  except KeyboardInterrupt:
    _fail("interrupted (Ctrl-C) before training started or after it ended; "
          "nothing was half-written: rerun the same command to continue "
          "from the last checkpoint.", EXIT_INTERRUPTED)
  print(format_result(result))
  if result.get("preempted"):
    sys.stdout.flush()
    sys.exit(_SIGNAL_EXITS.get(result.get("signal"), EXIT_PREEMPTED))


def entry_point():
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  entry_point()
