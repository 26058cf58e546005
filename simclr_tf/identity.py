"""What a model_dir is: the run that owns it, so a rerun cannot be another.

A training run writes `model_dir/run.json` when it starts: its stage, its
architecture, its image size and the exports it starts from (`--init_from`,
`--teacher`), each by path and by a digest of its files. A later run in the
same folder resumes only if it asks for the same run; anything else is
refused with one line naming both runs and the fix, before a model is built
(otherwise it would resume another stage's checkpoint and export it under
its own name).

A folder without `run.json` but with checkpoints (written before this
record existed) is compared with its `flags.json` on what that records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

from simclr_tf import atomic
from simclr_tf.config import Config, ConfigError
from simclr_tf.models.config import fields_of_kind, user_fields

log = logging.getLogger("simclr_tf")

RUN_FILE = "run.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 22


def export_digest(path: str) -> str:
  """sha256 of an export's files (relative names and contents)."""
  # pylint: disable=g-import-not-at-top
  from tf_hub_export import load as load_lib
  root = load_lib.resolve_export(path)
  digest = hashlib.sha256()
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(folder, name)
      digest.update(os.path.relpath(full, root).encode("utf-8", "replace"))
      with open(full, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):  # pylint: disable=cell-var-from-loop
          digest.update(chunk)
  return digest.hexdigest()


def _source(path: str) -> Optional[dict]:
  return {"path": path, "sha256": export_digest(path)} if path else None


def of(cfg: Config) -> dict:
  """The identity of the run `cfg` asks for (exports digested)."""
  return {
      "format_version": FORMAT_VERSION,
      "train_mode": cfg.train_mode,
      "image_size": cfg.image_size,
      # Not how the step is computed: a resume may change that.
      "architecture": {name: getattr(cfg, name) for name in user_fields()
                       if name not in fields_of_kind("compute")},
      "init_from": _source(cfg.init_from),
      "teacher": _source(cfg.teacher) if cfg.teacher else None,
  }


def _describe(identity: dict) -> str:
  parts = [f"a {identity.get('train_mode', '?')} run"]
  for flag in ("init_from", "teacher"):
    source = identity.get(flag)
    if source:
      digest = source.get("sha256")
      parts.append(f"--{flag}={source['path']!r}" +
                   (f" (sha256 {digest[:12]})" if digest else ""))
  return " from ".join(parts[:2]) + "".join(f", {p}" for p in parts[2:])


def _differences(recorded: dict, wanted: dict) -> list:
  """Names of what differs (only what the record holds)."""
  names = []
  for key in ("train_mode", "image_size"):
    if key in recorded and recorded[key] != wanted[key]:
      names.append(key)
  for name, value in (recorded.get("architecture") or {}).items():
    if name in wanted["architecture"] and wanted["architecture"][name] != value:
      names.append(name)
  for flag in ("init_from", "teacher"):
    if flag not in recorded:
      continue
    old, new = recorded[flag], wanted[flag]
    if bool(old) != bool(new):
      names.append(flag)
    elif old and old.get("sha256") and old["sha256"] != new["sha256"]:
      names.append(f"{flag} (content)")
    elif old and not old.get("sha256") and old["path"] != new["path"]:
      names.append(flag)
  return names


def _legacy(model_dir: str) -> Optional[dict]:
  """What flags.json records of an older run (no run.json)."""
  path = os.path.join(model_dir, "flags.json")
  try:
    with open(path, encoding="utf-8") as f:
      flags = json.load(f)
  except (OSError, ValueError):
    return None
  recorded = {"train_mode": flags.get("train_mode"),
              "init_from": ({"path": flags["init_from"]}
                            if flags.get("init_from") else None)}
  if flags.get("train_mode") == "distill":
    recorded["teacher"] = ({"path": flags["teacher"]}
                           if flags.get("teacher") else None)
  return recorded


def holds_a_run(model_dir: str) -> bool:
  """Checkpoints or an export that a run would resume from or replace."""
  # pylint: disable=g-import-not-at-top
  from simclr_tf import checkpoints
  return bool(checkpoints.list_checkpoints(
      checkpoints.checkpoint_dir(model_dir))) or os.path.exists(
          os.path.join(model_dir, "saved_model", "saved_model.pb"))


def read(model_dir: str) -> Optional[dict]:
  """The recorded identity (run.json, else flags.json of an older run)."""
  path = os.path.join(model_dir, RUN_FILE)
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        return json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(
          f"{path} is damaged ({str(e).splitlines()[0][:80]}); it records "
          "which run owns --model_dir: choose another --model_dir, or "
          "delete the folder to start over.") from e
  return _legacy(model_dir)


def check(cfg: Config, wanted: Optional[dict] = None,
          training: bool = True) -> Optional[dict]:
  """Refuses a run that is not the one model_dir holds.

  Args:
    cfg: the run's config.
    wanted: `of(cfg)` (computed here when None).
    training: a training run (compares everything); False for evaluating
      model_dir's checkpoint (compares the stage and the architecture).
  Returns:
    The identity of this run (to record when it starts).
  Raises:
    ConfigError: model_dir holds checkpoints or an export of another run.
  """
  wanted = wanted or of(cfg)
  if not holds_a_run(cfg.model_dir):
    return wanted
  recorded = read(cfg.model_dir)
  if recorded is None:
    return wanted
  if not training:
    recorded = {k: v for k, v in recorded.items()
                if k in ("train_mode", "architecture", "image_size")}
  differ = _differences(recorded, wanted)
  if differ:
    raise ConfigError(
        f"--model_dir={cfg.model_dir!r} holds {_describe(recorded)}, not "
        f"{_describe(wanted)} (differs in {', '.join(differ)}); choose "
        "another --model_dir, or rerun with the flags that started it "
        f"({os.path.join(cfg.model_dir, 'flags.json')}).")
  return wanted


def record(model_dir: str, identity: dict) -> None:
  """Writes model_dir/run.json (when the run starts)."""
  atomic.write_text(os.path.join(model_dir, RUN_FILE),
                    json.dumps(identity, indent=2, sort_keys=True))
