"""jfail: find, explain and correct the failures of image classifiers, in JAX.

The method packages load on first use, so `import jfail; jfail.attribution.gradient(...)` works
without importing every package up front.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = (
    "attribution", "barlow", "data", "debugtests", "defuse", "engine", "models", "prime", "train",
    "xla",
)


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"jfail.{name}")
    raise AttributeError(f"module 'jfail' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBPACKAGES])
