"""jfail: find, explain and correct the failures of image classifiers, in JAX."""

__version__ = "0.1.0"
