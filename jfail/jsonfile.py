"""Strict JSON for results and run directories: NaN and infinities written as null, NumPy values
as plain numbers and lists, files replaced atomically.

Python's `json` writes NaN as the bare token `NaN`, which strict parsers (browsers, `jq`,
JSON Schema validators) refuse; every JSON file jfail writes goes through `dumps`.

Example:
  >>> import numpy as np
  >>> print(dumps({"rate": float("nan"), "sizes": np.arange(2)}, indent=None))
  {"rate": null, "sizes": [0, 1]}
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["dumps", "strict", "write"]


def strict(value: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """`value` with only JSON's own types: non-finite floats become None, NumPy and JAX arrays
    lists, NumPy scalars Python numbers, tuples lists and dict keys strings.

    Args:
      value: dicts, lists, tuples, strings, booleans, numbers, NumPy values and None, nested.
      default: called on any other value, its result converted in turn; None to refuse them.

    Returns:
      A value `json.dumps(..., allow_nan=False)` accepts.

    Raises:
      TypeError: a value of another type and no `default`.
    """
    if isinstance(value, dict):
        return {str(k): strict(v, default) for k, v in value.items()}
    if isinstance(value, np.ndarray) or _is_jax_array(value):
        return strict(np.asarray(value).tolist(), default)
    if isinstance(value, (list, tuple)):
        return [strict(v, default) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if default is None:
        raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")
    return strict(default(value), default)


def _is_jax_array(value) -> bool:
    jax = sys.modules.get("jax")  # a jax.Array can only exist once jax is imported
    return jax is not None and isinstance(value, jax.Array)


def dumps(value: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None
          ) -> str:
    """`value` as strict JSON text (see `strict`), ending with a newline when indented.

    Args:
      value: what `strict` accepts.
      indent: spaces per nesting level; None for one line with no trailing newline.
      default: called on a value of another type (see `strict`); None to refuse them.

    Returns:
      The JSON text, NaN and infinities written as null.

    Raises:
      TypeError: a value of another type and no `default`.
    """
    text = json.dumps(strict(value, default), indent=indent, allow_nan=False)
    return text + "\n" if indent is not None else text


def write(path: str | Path, value: Any, *, default: Callable[[Any], Any] | None = None) -> None:
    """Write `value` as strict JSON to `path` atomically (a temporary file, then a rename).

    Args:
      path: the file to write; its folder must exist.
      value: what `strict` accepts.
      default: called on a value of another type (see `strict`); None to refuse them.

    Raises:
      TypeError: a value of another type and no `default`.
      OSError: the file cannot be written.
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(value, default=default))
    os.replace(tmp, path)
