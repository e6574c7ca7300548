"""Test-session settings shared by every test module and the processes the tests start.

One persistent JAX compilation cache per test run: the suite compiles the same small programs in
many tests, in both xdist workers and in the `jfail` commands and scripts the tests start as
subprocesses (which inherit the environment); each compiles once per run instead. A cache is
keyed by the program, its options and the backend, so a hit gives the same executable.
"""

import os
import tempfile
from pathlib import Path

_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"jfail-tests-jax-{_RUN}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
