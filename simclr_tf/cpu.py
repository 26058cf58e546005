"""The CPU's features, and whether TensorFlow runs its oneDNN kernels.

TensorFlow reads `TF_ENABLE_ONEDNN_OPTS` once, when it is imported. Left
unset, TensorFlow 2.21 on Linux turns oneDNN on only for CPUs with
AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (`DefaultOneDnnPolicy` in
tensorflow/core/util/util.cc); every other x86 CPU (AVX2 laptops, AMD Zen 2
and 3, older Xeons) runs the Eigen kernels, whose convolution gradients are
most of a ResNet's training step. oneDNN's own kernels need only AVX2 and are
several times faster there (docs/performance.md), so on such
CPUs we turn oneDNN on, and leave TensorFlow's default everywhere else.

This module imports nothing from TensorFlow, so that `import simclr_tf`
(and `run.py`, `demo.py`, the benchmarks and the test suite, all of which
import it first) can make the choice before TensorFlow is loaded. The user
decides first: `TF_ENABLE_ONEDNN_OPTS` set in the environment, or
`--onednn=on|off` on `run.py`, is kept as given.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Mapping, MutableMapping, Optional

ENV_VAR = "TF_ENABLE_ONEDNN_OPTS"
# Set beside ENV_VAR when the value is our choice, not the user's, so that a
# child process (demo.py -> run.py, tests -> run.py) makes the choice again
# instead of reporting it as the user's.
CHOSEN_VAR = "SIMCLR_TF_ONEDNN_CHOSEN"
SETTINGS = ("auto", "on", "off")

# The flags (as /proc/cpuinfo names them) for which TensorFlow's own policy
# turns oneDNN on.
TF_DEFAULT_ON_FLAGS = frozenset({"avx512_vnni", "avx512_bf16", "avx_vnni",
                                 "amx_tile", "amx_int8", "amx_bf16"})
# What oneDNN's fast x86 kernels need; below it, TensorFlow's default stands.
ONEDNN_MIN_FLAGS = frozenset({"avx2", "fma"})

_TRUE = ("1", "true")
_FALSE = ("0", "false")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
  """The CPU's feature flags (empty where /proc/cpuinfo is unreadable).

  Args:
    cpuinfo: the file to read (Linux's /proc/cpuinfo).
  Returns:
    The set of flag names of the first processor listed.
  """
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU's model name ('' where /proc/cpuinfo is unreadable)."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          return value.strip()
  except OSError:
    pass
  return ""


@dataclasses.dataclass(frozen=True)
class OneDnnChoice:
  """What was decided about oneDNN, and why.

  Attributes:
    value: '1' or '0' when `TF_ENABLE_ONEDNN_OPTS` is set (by the user or by
      us), None when TensorFlow's default is left to apply.
    enabled: whether oneDNN is (or, before TensorFlow is imported, will be)
      on in this process; None where it cannot be known (TensorFlow's
      default on a CPU whose flags are unreadable).
    source: 'user' (the environment or --onednn), 'auto' (this module's
      choice) or 'tensorflow' (TensorFlow was imported first and read the
      environment before we could choose).
    reason: one sentence for the log.
    conflict: True when TensorFlow, imported first, runs oneDNN the other
      way from what this module would have chosen.
  """
  value: Optional[str]
  enabled: Optional[bool]
  source: str
  reason: str
  conflict: bool = False

  def describe(self) -> str:
    """The log line: 'oneDNN on (auto): <reason>'."""
    state = {True: "on", False: "off", None: "TensorFlow's default"}[
        self.enabled]
    return f"oneDNN {state} ({self.source}): {self.reason}"


def _parse_bool(value: str) -> Optional[bool]:
  value = value.strip().lower()
  return True if value in _TRUE else False if value in _FALSE else None


def decide_onednn(flags: set, setting: str = "auto",
                  environ: Optional[Mapping[str, str]] = None
                  ) -> OneDnnChoice:
  """Chooses `TF_ENABLE_ONEDNN_OPTS` for a CPU (pure: reads nothing else).

  Args:
    flags: the CPU's feature flags (`cpu_flags()`).
    setting: 'auto', or 'on' / 'off' (`run.py --onednn`), which win over
      everything.
    environ: the environment (default: os.environ); a `TF_ENABLE_ONEDNN_OPTS`
      there that is not our own earlier choice is the user's and is kept.
  Returns:
    The OneDnnChoice.
  Raises:
    ValueError: for a setting not in SETTINGS.
  """
  if setting not in SETTINGS:
    raise ValueError(f"oneDNN setting must be one of {', '.join(SETTINGS)}."
                     f" Received: setting={setting!r}")
  environ = os.environ if environ is None else environ
  if setting != "auto":
    on = setting == "on"
    return OneDnnChoice("1" if on else "0", on, "user",
                        f"--onednn={setting}")
  given = environ.get(ENV_VAR)
  if given is not None and environ.get(CHOSEN_VAR) != given:
    return OneDnnChoice(given, _parse_bool(given), "user",
                        f"{ENV_VAR}={given} in the environment")
  default_on = sorted(flags & TF_DEFAULT_ON_FLAGS)
  if default_on:
    return OneDnnChoice(None, True, "auto",
                        "TensorFlow's default for this CPU ("
                        f"{', '.join(default_on)})")
  if ONEDNN_MIN_FLAGS <= flags:
    return OneDnnChoice("1", True, "auto",
                        "AVX2 CPU without VNNI, AVX512_BF16 or AMX: "
                        "TensorFlow would leave oneDNN off, and its Eigen "
                        "kernels train several times slower here")
  return OneDnnChoice(None, None, "auto",
                      "TensorFlow's default (no AVX2 and FMA among the CPU "
                      "flags, or the flags are unreadable)")


def _tensorflow_onednn() -> Optional[bool]:
  """Whether the TensorFlow already loaded runs oneDNN (None: unknown)."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):
    return None


def configure_onednn(setting: str = "auto",
                     flags: Optional[set] = None,
                     environ: Optional[MutableMapping[str, str]] = None,
                     modules: Optional[Mapping[str, object]] = None,
                     tensorflow_onednn: Callable[[], Optional[bool]] =
                     _tensorflow_onednn) -> OneDnnChoice:
  """Applies `decide_onednn` to the environment, if TensorFlow is not loaded.

  Safe to call more than once (`import simclr_tf` calls it with 'auto',
  `run.py` again with its --onednn flag).

  Args:
    setting: 'auto', 'on' or 'off'.
    flags: the CPU's flags (default: `cpu_flags()`).
    environ: the environment to update (default: os.environ).
    modules: the loaded modules (default: sys.modules).
    tensorflow_onednn: reports whether the loaded TensorFlow runs oneDNN.
  Returns:
    The OneDnnChoice. When TensorFlow was imported before this call, nothing
    is changed: the choice has source 'tensorflow', says what TensorFlow
    runs, and its reason says what would have been chosen.
  """
  environ = os.environ if environ is None else environ
  modules = sys.modules if modules is None else modules
  flags = cpu_flags() if flags is None else flags
  wanted = decide_onednn(flags, setting, environ)
  if "tensorflow" in modules:
    enabled = tensorflow_onednn()
    state = {True: "on", False: "off", None: "as TensorFlow chose"}[enabled]
    conflict = (wanted.enabled is not None and enabled is not None and
                wanted.enabled != enabled)
    if not conflict:
      reason = f"TensorFlow was imported first; {wanted.reason}"
    else:
      want = "on" if wanted.enabled else "off"
      reason = (f"TensorFlow was imported before simclr_tf, so oneDNN stays "
                f"{state} although {want} was chosen ({wanted.reason}); "
                f"import simclr_tf first or set {ENV_VAR}="
                f"{'1' if wanted.enabled else '0'}")
    return OneDnnChoice(environ.get(ENV_VAR), enabled, "tensorflow", reason,
                        conflict)
  if wanted.source == "user":
    environ.pop(CHOSEN_VAR, None)
    if wanted.value is not None:
      environ[ENV_VAR] = wanted.value
  elif wanted.value is None:
    # TensorFlow's default; drop a value an earlier call of ours had set.
    if environ.get(CHOSEN_VAR) is not None:
      environ.pop(ENV_VAR, None)
      environ.pop(CHOSEN_VAR, None)
  else:
    environ[ENV_VAR] = wanted.value
    environ[CHOSEN_VAR] = wanted.value
  return wanted
