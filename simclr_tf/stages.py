"""What each training stage needs and uses, in one table.

Pretraining, fine-tuning and distillation share the runner, the learner and
the input pipeline; every difference between them that is not the loss
(`simclr_tf.tasks`) is a field of their `Stage` here. `config.validate`
rejects a flag that the chosen stage does not use (`unused_flags`), so no
value is silently ignored.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
  """The needs and uses of one `--train_mode`.

  Attributes:
    name: the --train_mode value.
    needs_labels: refuses unlabeled data.
    label_fraction: trains on the class-balanced --label_fraction subset
      (written to model_dir/label_subset.txt).
    teacher: distils the --teacher export's logits.
    memory: may keep SimCLRv2's memory of negatives (--memory_size,
      --memory_momentum).
    freezes: freezes the blocks before --fine_tune_after_block.
    two_views: an example is two augmented views with colour distortion
      (and blur with --use_blur), a few of which are logged to TensorBoard;
      otherwise one cropped and flipped image.
    whole_proj_head: keeps the whole projection head and trains the
      supervised head on a stop-gradient input; otherwise the head is cut
      at --ft_proj_selector and the supervised head trains the encoder.
    monitor: the online kNN monitor (--knn_eval_epochs) and, at the end,
      a TensorBoard projector view of the eval features.
  """

  name: str
  needs_labels: bool = False
  label_fraction: bool = False
  teacher: bool = False
  memory: bool = False
  freezes: bool = True
  two_views: bool = False
  whole_proj_head: bool = False
  monitor: bool = False


STAGES = {
    "pretrain": Stage("pretrain", memory=True, freezes=False, two_views=True,
                      whole_proj_head=True, monitor=True),
    "finetune": Stage("finetune", needs_labels=True, label_fraction=True),
    "distill": Stage("distill", teacher=True),
}

# Flags that only some stages use: (flag, Stage field, value meaning unset).
STAGE_FLAGS = (
    ("label_fraction", "label_fraction", 1.0),
    ("teacher", "teacher", ""),
    ("memory_size", "memory", 0),
    ("fine_tune_after_block", "freezes", -1),
    ("knn_eval_epochs", "monitor", -1),
    ("knn_max_examples", "monitor", 10000),
)


def get(train_mode: str) -> Stage:
  """The stage of a --train_mode value.

  Args:
    train_mode: 'pretrain', 'finetune' or 'distill'.
  Returns:
    Its `Stage`.
  Raises:
    ValueError: another value.
  """
  if train_mode not in STAGES:
    raise ValueError(f"Received: train_mode={train_mode!r}; use one of "
                     f"{', '.join(STAGES)}.")
  return STAGES[train_mode]


def unused_flags(stage: Stage, values: dict) -> list:
  """The stage-specific flags set (away from unset) that `stage` ignores.

  Args:
    stage: the run's stage.
    values: {flag: value} of the run.
  Returns:
    [(flag, value, names of the stages that use it)], in STAGE_FLAGS order.
  """
  found = []
  for flag, field, unset in STAGE_FLAGS:
    if not getattr(stage, field) and values[flag] != unset:
      users = [s.name for s in STAGES.values() if getattr(s, field)]
      found.append((flag, values[flag], users))
  return found
