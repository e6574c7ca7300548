"""Every JSON file jfail writes is strict: NaN and infinities become null, NumPy values plain
numbers, and anything else is refused unless a conversion is given."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jfail import jsonfile


def reject_constant(name):
    raise ValueError(f"{name} is not strict JSON")


def test_non_finite_numbers_become_null_and_numpy_values_plain_ones(tmp_path):
    report = {"a": float("nan"), "b": [1.0, float("inf"), np.float32(2.5)], "g": jnp.arange(2),
              "c": {"d": np.int64(3), 4: np.array([[1, 2]])}, "e": (np.bool_(True), None),
              "f": np.float64(-np.inf)}
    expected = {"a": None, "b": [1.0, None, 2.5], "g": [0, 1], "c": {"d": 3, "4": [[1, 2]]},
                "e": [True, None], "f": None}
    assert json.loads(jsonfile.dumps(report), parse_constant=reject_constant) == expected
    path = tmp_path / "out.json"
    jsonfile.write(path, report)
    assert json.loads(path.read_text(), parse_constant=reject_constant) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_other_objects_are_refused_or_converted():
    with pytest.raises(TypeError, match="cannot write PosixPath"):
        jsonfile.dumps({"where": Path("/x")})
    assert json.loads(jsonfile.dumps({"where": Path("/x")}, default=str)) == {"where": "/x"}


def test_the_pipelines_writer_is_strict(tmp_path):
    from jfail.train.run import write_json

    write_json(tmp_path / "m.json", {"loss": float("nan"), "dir": tmp_path})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=reject_constant) == {
        "loss": None, "dir": str(tmp_path)}
