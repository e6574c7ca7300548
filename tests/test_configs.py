"""The files in configs/: each resolves through `load_config`, validates, and states exactly what
differs from its base (the dataclass defaults or another file), so a variant cannot drift from
the config it is a variant of."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

import jfail.prime
import jfail.prime.config
from jfail.config import (
    BarlowConfig,
    ClassifierRunConfig,
    ConfigError,
    DebugTestsConfig,
    DefuseConfig,
    PrimeConfig,
    UnknownConfigKeyError,
    derive_config,
    load_config,
    validate_config,
)
from jfail.train import Attack

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
METHOD_CONFIGS = (ClassifierRunConfig, BarlowConfig, DefuseConfig, DebugTestsConfig, PrimeConfig)

# Variants of another file in configs/: each must start from that file, not restate it.
VARIANTS = {
    "resnet18_fmnist_robust_l2.py": "resnet18_fmnist.py",
    "annotator_mlp_mnist5k.py": "annotator_mlp_fmnist.py",
}

_MISSING = object()


def _module(path):
    spec = importlib.util.spec_from_file_location(f"config_under_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaves(value, prefix=""):
    """{dotted path: value} of every leaf of a nested dataclass / dict."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        return {prefix: value}
    leaves = {}
    for name, item in items:
        leaves.update(_leaves(item, f"{prefix}.{name}" if prefix else str(name)))
    return leaves


def _at(config, key):
    for name in key.split("."):
        config = config[name] if isinstance(config, dict) else getattr(config, name)
    return config


def _drift(base, config, changes) -> list[str]:
    """What `config` changes from `base` without stating it in `changes`, and what `changes`
    states without changing it (a nested config or dict counts leaf by leaf)."""
    problems = []
    base_leaves, leaves = _leaves(base), _leaves(config)
    for path in sorted(set(base_leaves) | set(leaves)):
        if base_leaves.get(path, _MISSING) != leaves.get(path, _MISSING) and not any(
                path == key or path.startswith(key + ".") for key in changes):
            problems.append(f"{path} differs from the base but is not stated")
    for key, value in changes.items():
        before = _at(base, key)
        nested = (isinstance(value, dict) and isinstance(before, dict)) or (
            dataclasses.is_dataclass(value) and type(value) is type(before))
        if nested:
            before_leaves = _leaves(before)
            problems += [f"{key}.{path} restates the base's value {leaf!r}"
                         for path, leaf in _leaves(value).items()
                         if before_leaves.get(path, _MISSING) == leaf]
        elif value == before:
            problems.append(f"{key} restates the base's value {value!r}")
    return problems


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_a_config_file_resolves_validates_and_states_only_what_differs_from_its_base(path):
    config = load_config(path)
    assert type(config) in METHOD_CONFIGS
    validate_config(config)
    module = _module(path)
    base = derive_config(module.BASE)
    assert type(base) is type(config)
    assert config == derive_config(module.BASE, module.CHANGES)
    assert _drift(base, config, module.CHANGES) == []
    if path.name in VARIANTS:
        named = Path(module.BASE).name if isinstance(module.BASE, (str, Path)) else module.BASE
        assert named == VARIANTS[path.name], f"{path.name} must start from {VARIANTS[path.name]}"


def test_a_variant_copied_from_its_base_and_drifted_is_caught():
    standard = load_config(REPO / "configs" / "resnet18_fmnist.py")
    robust = load_config(REPO / "configs" / "resnet18_fmnist_robust_l2.py")
    copy = {"name": "resnet18_fmnist_robust_l2", "train.epochs": 2,
            "train.attack": robust.train.attack, "model": "resnet18",
            "model_kwargs": {"stem": "small", "width": 16}}
    drifted = derive_config(standard, {**copy, "train.learning_rate": 1e-3})
    changes = {k: v for k, v in copy.items() if k.startswith("train") or k == "name"}
    assert _drift(standard, drifted, changes) == [
        "train.learning_rate differs from the base but is not stated"]
    assert _drift(standard, robust, copy) == [
        "model restates the base's value 'resnet18'",
        "model_kwargs.stem restates the base's value 'small'",
        "model_kwargs.width restates the base's value 16"]


def test_derive_config_takes_a_dataclass_its_type_or_a_file_and_checks_each_key():
    path = REPO / "configs" / "resnet18_fmnist.py"
    assert derive_config(ClassifierRunConfig) == ClassifierRunConfig()
    assert derive_config(path) == derive_config(str(path)) == load_config(path)
    robust = derive_config(path, {"train.attack": Attack(epsilon=0.5), "model_kwargs.width": 8})
    assert robust.train.attack.epsilon == 0.5 and robust.model_kwargs == {"stem": "small",
                                                                           "width": 8}
    assert robust.train.learning_rate == load_config(path).train.learning_rate
    assert derive_config(DefuseConfig, {"lambdas": [1, 2]}).lambdas == (1, 2)
    with pytest.raises(UnknownConfigKeyError, match="train.epoch.*valid keys: optimizer"):
        derive_config(path, {"train.epoch": 3})
    with pytest.raises(ConfigError, match=r"^train\.epochs must be an integer, got 'x'"):
        derive_config(path, {"train.epochs": "x"})
    with pytest.raises(ConfigError, match="annotations: annotations must be 'simulated'"):
        derive_config(DefuseConfig, {"annotations": "crowd"})
    with pytest.raises(TypeError, match="base must be a config dataclass"):
        derive_config({"name": "x"})


def test_prime_config_is_one_class_however_it_is_imported():
    assert jfail.prime.PrimeConfig is jfail.prime.config.PrimeConfig is PrimeConfig
