"""Names of a package loaded on first use (PEP 562), so that importing the
package imports no TensorFlow until a layer or function is asked for."""

from __future__ import annotations

import importlib


def attributes(package: str, names: dict):
  """`__getattr__` and `__dir__` for a package.

  Args:
    package: the package's `__name__`.
    names: {public name: module that defines it}.
  Returns:
    (__getattr__, __dir__).
  """
  def getattr_(name):
    if name in names:
      return getattr(importlib.import_module(names[name]), name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def dir_():
    return sorted(names)

  return getattr_, dir_
