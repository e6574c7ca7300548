"""Load PyTorch ResNet weights into jfail's `ResNet`: torchvision and robustness-library formats.

jfail's `ResNet` (`resnet.py`) has torchvision's layout, so a PyTorch state dict maps onto it name
for name:

==============================  ===========================================================
torch state-dict key            jfail (Flax) variable
==============================  ===========================================================
`conv1.weight` [O, I, kh, kw]   `params/conv1/kernel` [kh, kw, I, O]
`bn1.weight`, `bn1.bias`        `params/bn1/scale`, `params/bn1/bias`
`bn1.running_mean/_var`         `batch_stats/bn1/mean`, `batch_stats/bn1/var`
`layer2.0.conv1.weight`         `params/layer2_0/conv1/kernel`
`layer2.0.downsample.0.weight`  `params/layer2_0/downsample_conv/kernel`
`layer2.0.downsample.1.*`       `params|batch_stats/layer2_0/downsample_bn/*`
`fc.weight` [K, D], `fc.bias`   `params/fc/kernel` [D, K], `params/fc/bias`
==============================  ===========================================================

`*.num_batches_tracked` (a BatchNorm step counter) has no counterpart and is skipped. Every other
key must be used and every jfail variable filled, with matching shapes; otherwise the converter
raises a `ValueError` that names the offending keys. Weights are converted to float32.

Two file formats are read:

* torchvision: `torch.save(model.state_dict(), path)` of `torchvision.models.resnet18/50` (keys
  as above; ImageNet stem, width 64). The model expects inputs normalized by the caller.
* the robustness library (MadryLab, `robustness.model_utils`), whose ImageNet ResNet-50 trained
  under l2 attacks of radius 3 is the model the Barlow paper explains. A checkpoint is a dict
  `{'model': state_dict, 'optimizer': ..., 'schedule': ..., 'epoch': ...}` (`'state_dict'` in
  place of `'model'` in some releases) of the library's `AttackerModel`, saved from
  `DataParallel`, so each key starts with `module.`:

  - `module.normalizer.new_mean`, `module.normalizer.new_std` (`[C, 1, 1]`): the
    `InputNormalize` layer that maps images in [0, 1] to the classifier's input,
    `(clamp(x, 0, 1) - mean) / std`;
  - `module.model.<key>`: the classifier, a torchvision-layout ResNet;
  - `module.attacker.model.<key>` and `module.attacker.normalize.*`: the attacker's references to
    the same classifier and normalizer, duplicates of the tensors above.

  Single-GPU saves have the same keys without `module.`. `normalized_model_fns` puts the
  normalizer in front of the converted classifier, so the callables take images in [0, 1].

torch is needed only to read `.pth`/`.pt` files (`pip install 'jfail[torch]'`); state dicts of
NumPy arrays convert without it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jfail.models.callables import LinenOutput, ModelFns, as_callable
from jfail.models.resnet import ResNet, resnet18, resnet50

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalizer",
    "load_robustness_checkpoint",
    "load_torchvision_resnet",
    "normalized_model_fns",
    "resnet_variables_from_torch",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ARCHS: dict[str, Callable[..., ResNet]] = {"resnet18": resnet18, "resnet50": resnet50}
_SKIPPED_SUFFIX = ".num_batches_tracked"
_MAX_LISTED = 20


class Normalizer(NamedTuple):
    """Per-channel input normalization `(x - mean) / std`; `mean` and `std` are `[C]` float32."""

    mean: np.ndarray
    std: np.ndarray


def resnet_variables_from_torch(state_dict: Mapping[str, Any], module: ResNet) -> dict:
    """Flax variables `{'params', 'batch_stats'}` for `module` from a torchvision-layout state dict.

    `state_dict` maps torch names (`conv1.weight`, `layer1.0.bn1.running_mean`, ...) to torch
    tensors or NumPy arrays (NumPy input needs no torch). `module` is a jfail `ResNet` of any depth,
    stem and width; its input channels are those of `conv1.weight`. The conversion is strict:
    every variable of `module` must be filled and every key except `*.num_batches_tracked` used,
    with the shapes `module` needs. Otherwise a `ValueError` names the missing and unexpected keys
    and the shape mismatches (e.g. a ResNet-18 state dict for a ResNet-50 module).

    Args:
        state_dict: torch names -> torch tensors or NumPy arrays, torchvision's layout.
        module: the jfail `ResNet` the variables are for.

    Returns:
        dict `{'params': ..., 'batch_stats': ...}` of float32 `jax.Array`s.

    Raises:
        TypeError: if `module` is not a jfail `ResNet` or `state_dict` is not a mapping.
        ValueError: if keys are missing or unexpected, a shape does not fit `module`, or a
            weight is not floating point.
    """
    if not isinstance(module, ResNet):
        raise TypeError(f"module must be a jfail ResNet, got {type(module).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict)}")
    given = {key: value for key, value in state_dict.items() if not key.endswith(_SKIPPED_SUFFIX)}
    expected = _expected_torch_layout(module, _input_channels(given, module))
    _check_layout(given, expected, f"for {_describe(module)}")
    flat = {
        flax_path: jnp.asarray(to_flax(_float32(key, given[key])))
        for key, (_, flax_path, to_flax) in expected.items()
    }
    return traverse_util.unflatten_dict(flat)


def load_torchvision_resnet(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    arch: str = "resnet50",
    num_classes: int | None = None,
) -> tuple[ResNet, dict]:
    """`(module, variables)` from a torchvision ResNet state dict (a `.pth` file or a mapping).

    `arch` is `resnet18` or `resnet50` (ImageNet stem, width 64, as torchvision's);
    `num_classes` defaults to the rows of `fc.weight`. A file is read with
    `torch.load(path, map_location='cpu', weights_only=True)`. Inputs to the returned model are
    what the torch model takes (for torchvision's ImageNet weights: images in [0, 1] normalized
    with `IMAGENET_MEAN`/`IMAGENET_STD`, which `normalized_model_fns` can do).

    Args:
        path_or_state_dict: a `.pth` file's path, or the state dict itself.
        arch: "resnet18" or "resnet50".
        num_classes: the classifier's outputs; None = the rows of `fc.weight`.

    Returns:
        `(module, variables)`: the jfail `ResNet` and its Flax variables.

    Raises:
        TypeError: if `path_or_state_dict` is neither a path nor a mapping.
        ImportError: if a file must be read and torch is not installed.
        ValueError: if `arch` is unknown, the file holds no mapping, or the state dict does not
            fit the architecture (see `resnet_variables_from_torch`).
    """
    state_dict = _as_mapping(path_or_state_dict, "state dict")
    if num_classes is None:
        num_classes = _num_classes(state_dict)
    module = _build(arch, num_classes)
    return module, resnet_variables_from_torch(state_dict, module)


def load_robustness_checkpoint(
    path_or_dict: str | os.PathLike | Mapping[str, Any], arch: str = "resnet50"
) -> tuple[ResNet, dict, Normalizer]:
    """`(module, variables, normalizer)` from a robustness-library (MadryLab) checkpoint.

    `path_or_dict` is a checkpoint file (read with `torch.load(..., weights_only=True)`; for a
    trusted file that needs the full unpickler, load it yourself and pass the dict), the loaded
    checkpoint (`{'model': ...}` or `{'state_dict': ...}`) or the bare `AttackerModel` state dict.
    Keys may carry the `module.` prefix of `DataParallel` saves or not, but all or none of them.
    The classifier comes from `model.*`; `attacker.model.*`, if present, must hold the same keys
    and values. `normalizer` is `(mean [C], std [C])` from `normalizer.new_mean/new_std` (and
    `attacker.normalize.*`, which must agree), or ImageNet's mean and std if the checkpoint has no
    normalizer. `num_classes` is the rows of `fc.weight`.

    Use `normalized_model_fns(module, variables, *normalizer)` for callables on images in [0, 1].

    Args:
        path_or_dict: a checkpoint file's path, the loaded checkpoint, or its state dict.
        arch: "resnet18" or "resnet50".

    Returns:
        `(module, variables, normalizer)`: the jfail `ResNet`, its Flax variables and the
        input `Normalizer`.

    Raises:
        TypeError: if `path_or_dict` is neither a path nor a mapping.
        ImportError: if a file must be read and torch is not installed.
        ValueError: if the checkpoint has no classifier weights, keys outside the known groups,
            a mixed `module.` prefix, disagreeing `model.*` / `attacker.model.*` weights or
            normalizers, an incomplete or non-positive normalizer, an unknown `arch`, or
            weights that do not fit the architecture.
    """
    checkpoint = _as_mapping(path_or_dict, "checkpoint")
    state_dict = _strip_module_prefix(_robustness_state_dict(checkpoint))
    parts: dict[str, dict] = {"model.": {}, "attacker.model.": {}}
    normalizers: dict[str, dict] = {"normalizer.": {}, "attacker.normalize.": {}}
    unexpected = []
    for key, value in state_dict.items():
        part = _split_key(key, parts) or _split_key(key, normalizers)
        if part is None:
            unexpected.append(key)
        else:
            prefix, name = part
            (parts if prefix in parts else normalizers)[prefix][name] = value
    classifier = parts["model."]
    if not classifier:
        raise ValueError(
            "robustness checkpoint has no classifier weights (no 'module.model.*' or 'model.*' "
            f"keys; it has {_list_keys(state_dict)}). For a plain torchvision state dict use "
            "load_torchvision_resnet."
        )
    if unexpected:
        raise ValueError(
            "robustness checkpoint has keys outside model.*, attacker.model.*, normalizer.* and "
            f"attacker.normalize.*: {_list_keys(unexpected)}"
        )
    if parts["attacker.model."]:
        _check_duplicate(classifier, parts["attacker.model."], "model.", "attacker.model.")
    normalizer = _robustness_normalizer(normalizers, _input_channels(classifier, None))
    module = _build(arch, _num_classes(classifier))
    return module, resnet_variables_from_torch(classifier, module), normalizer


def normalized_model_fns(
    module: nn.Module, variables: Any, mean: Any, std: Any, clip: bool = True
) -> ModelFns:
    """`model_fns` for images `[B, H, W, C]` in [0, 1] of a classifier trained on normalized ones.

    Each callable computes `(clip(x, 0, 1) - mean) / std` and feeds it to `module` in eval mode,
    as the robustness library's `AttackerModel` does with its `InputNormalize` layer; `clip=False`
    drops the clamp. Like `torch.clamp`, the clamp passes gradients for pixels in [0, 1], bounds
    included, and zeroes those outside. `variables`, `mean` and `std` (`[C]`) are the pytree
    leaves of the returned `jax.tree_util.Partial`s.

    Args:
        module: a jfail classifier (e.g. from `load_robustness_checkpoint`).
        variables: its Flax variables.
        mean: per-channel mean `[C]`.
        std: per-channel standard deviation `[C]`.
        clip: clamp inputs to [0, 1] before normalizing.

    Returns:
        `ModelFns(logits, features, feature_map)` of images `[B, H, W, C]` in [0, 1].

    Raises:
        ValueError: if `mean` and `std` are not both `[C]` of one shape.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    if mean.ndim != 1 or mean.shape != std.shape:
        raise ValueError(f"mean and std must both be [C]; got {mean.shape} and {std.shape}")
    params = {"variables": variables, "mean": mean, "std": std}
    return ModelFns(
        *(
            as_callable(_NormalizedOutput(LinenOutput(module, tap), clip), params)
            for tap in ModelFns._fields
        )
    )


# --- private helpers ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _NormalizedOutput:
    """`fn(params, x)`: one tap of a classifier on `(clip(x) - mean) / std`; hashable, for jit."""

    output: LinenOutput
    clip: bool

    def __call__(self, params, x):
        if self.clip:
            x = _clip_unit(x)
        return self.output(params["variables"], (x - params["mean"]) / params["std"])


def _clip_unit(x):
    """`clip(x, 0, 1)` with `torch.clamp`'s gradient: 1 on [0, 1] (bounds included), 0 outside.

    (`jnp.clip` splits the gradient in half at the bounds, where pixels of real images often lie.)
    """
    return jnp.where((x >= 0) & (x <= 1), x, jnp.clip(x, 0, 1))


def _expected_torch_layout(module: ResNet, in_channels: int) -> dict[str, tuple]:
    """torch key -> (torch shape, flax path, conversion) for every variable of `module`.

    Cached per configuration (modules hash by value, unless e.g. `stage_sizes` is a list);
    callers must not mutate the result.
    """
    try:
        hash(module)
    except TypeError:
        return _torch_layout(module, in_channels)
    return _cached_torch_layout(module, in_channels)


def _torch_layout(module: ResNet, in_channels: int) -> dict[str, tuple]:
    dummy = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), dummy)
    flat = traverse_util.flatten_dict(dict(shapes))
    layout = {}
    for flax_path, leaf in flat.items():
        collection, *layers, name = flax_path
        torch_name, to_flax, torch_shape = _TORCH_LEAF[(collection, name)](leaf.shape)
        key = ".".join([*(_torch_module_name(layer) for layer in layers), torch_name])
        layout[key] = (torch_shape, flax_path, to_flax)
    return layout


_cached_torch_layout = functools.lru_cache(maxsize=16)(_torch_layout)


def _conv_or_dense_kernel(shape):
    if len(shape) == 4:  # flax [kh, kw, I, O] <- torch [O, I, kh, kw]
        return "weight", lambda w: w.transpose(2, 3, 1, 0), tuple(shape[i] for i in (3, 2, 0, 1))
    return "weight", lambda w: w.T, tuple(reversed(shape))  # flax [in, out] <- torch [out, in]


def _same(torch_name):
    return lambda shape: (torch_name, lambda w: w, tuple(shape))


_TORCH_LEAF = {
    ("params", "kernel"): _conv_or_dense_kernel,
    ("params", "bias"): _same("bias"),
    ("params", "scale"): _same("weight"),
    ("batch_stats", "mean"): _same("running_mean"),
    ("batch_stats", "var"): _same("running_var"),
}


def _torch_module_name(flax_name: str) -> str:
    """`layer2_0` -> `layer2.0`; `downsample_conv`/`_bn` -> `downsample.0`/`.1`; else unchanged."""
    match = re.fullmatch(r"layer(\d+)_(\d+)", flax_name)
    if match:
        return f"layer{match[1]}.{match[2]}"
    return {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
        flax_name, flax_name
    )


def _check_layout(given: Mapping[str, Any], expected: dict[str, tuple], context: str) -> None:
    """Raise a ValueError listing missing keys, unexpected keys and shape mismatches, if any."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        f"{key}: {_shape(given[key])} in the state dict, {expected[key][0]} needed"
        for key in expected
        if key in given and _shape(given[key]) != expected[key][0]
    ]
    problems = [
        f"{label} ({len(keys)}): {_list_keys(keys, sort=label != 'shape mismatches')}"
        for label, keys in [
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ]
        if keys
    ]
    if problems:
        raise ValueError(f"state dict does not fit {context}:\n  " + "\n  ".join(problems))


def _input_channels(state_dict: Mapping[str, Any], module: ResNet | None) -> int:
    """Input channels of `conv1.weight` `[O, I, kh, kw]`; a ValueError if it is absent."""
    if "conv1.weight" not in state_dict:
        context = f" for {_describe(module)}" if module is not None else ""
        raise ValueError(
            f"state dict has no 'conv1.weight'{context}: not a torchvision-layout ResNet "
            f"(keys: {_list_keys(state_dict)})"
        )
    shape = _shape(state_dict["conv1.weight"])
    if len(shape) != 4:
        raise ValueError(f"conv1.weight must be [O, I, kh, kw]; got shape {shape}")
    return shape[1]


def _num_classes(state_dict: Mapping[str, Any]) -> int:
    if "fc.weight" not in state_dict:
        raise ValueError(
            "cannot read the number of classes: the state dict has no 'fc.weight' "
            f"(keys: {_list_keys(state_dict)})"
        )
    shape = _shape(state_dict["fc.weight"])
    if len(shape) != 2:
        raise ValueError(f"fc.weight must be [num_classes, features]; got shape {shape}")
    return shape[0]


def _build(arch: str, num_classes: int) -> ResNet:
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    return _ARCHS[arch](num_classes, stem="imagenet", width=64)


def _as_mapping(source: Any, what: str) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        loaded = _torch_load(source)
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{os.fspath(source)} holds a {type(loaded).__name__}, not a {what}")
        return loaded
    raise TypeError(f"expected a path or a mapping for the {what}, got {type(source).__name__}")


def _torch_load(path: str | os.PathLike) -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "reading PyTorch checkpoints needs torch: pip install 'jfail[torch]' "
            "(or pass a state dict of NumPy arrays)"
        ) from error
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


def _robustness_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model state dict of a checkpoint: under 'model', else 'state_dict', else the dict."""
    for name in ("model", "state_dict"):
        if name in checkpoint:
            state_dict = checkpoint[name]
            if not isinstance(state_dict, Mapping):
                raise ValueError(
                    f"checkpoint[{name!r}] is a {type(state_dict).__name__}, not a state dict"
                )
            return state_dict
    return checkpoint


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop DataParallel's `module.` prefix, which all keys or none must carry."""
    prefixed = [key for key in state_dict if key.startswith("module.")]
    if not prefixed:
        return dict(state_dict)
    if len(prefixed) != len(state_dict):
        bare = [key for key in state_dict if not key.startswith("module.")]
        raise ValueError(
            "some keys have the 'module.' prefix and some do not: with it "
            f"{_list_keys(prefixed)}; without {_list_keys(bare)}"
        )
    return {key[len("module."):]: value for key, value in state_dict.items()}


def _split_key(key: str, groups: Mapping[str, Any]) -> tuple[str, str] | None:
    for prefix in groups:
        if key.startswith(prefix):
            return prefix, key[len(prefix):]
    return None


def _check_duplicate(
    main: Mapping[str, Any], copy: Mapping[str, Any], main_prefix: str, copy_prefix: str
) -> None:
    """`copy` must hold the keys and values of `main` (the attacker's view of the same model)."""
    only_main = [main_prefix + key for key in main if key not in copy]
    only_copy = [copy_prefix + key for key in copy if key not in main]
    differ = [
        copy_prefix + key
        for key in main
        if key in copy and not _equal(_numpy(main[key]), _numpy(copy[key]))
    ]
    if only_main or only_copy or differ:
        problems = []
        if only_main:
            problems.append(f"only under {main_prefix}: {_list_keys(only_main)}")
        if only_copy:
            problems.append(f"only under {copy_prefix}: {_list_keys(only_copy)}")
        if differ:
            problems.append(f"different values: {_list_keys(differ)}")
        raise ValueError(
            f"{copy_prefix}* must duplicate {main_prefix}* (the attacker shares the model); "
            + "; ".join(problems)
        )


def _robustness_normalizer(groups: Mapping[str, dict], channels: int) -> Normalizer:
    found = {}
    for prefix, entries in groups.items():
        unknown = [prefix + key for key in entries if key not in ("new_mean", "new_std")]
        if unknown:
            raise ValueError(f"unexpected normalizer keys: {_list_keys(unknown)}")
        if not entries:
            continue
        if set(entries) != {"new_mean", "new_std"}:
            have = prefix + next(iter(entries))
            raise ValueError(f"{have} without its counterpart: need {prefix}new_mean and new_std")
        mean = _channel_vector(prefix + "new_mean", entries["new_mean"], channels)
        std = _channel_vector(prefix + "new_std", entries["new_std"], channels)
        found[prefix] = Normalizer(mean, std)
    if not found:
        return Normalizer(*(np.asarray(v, np.float32) for v in (IMAGENET_MEAN, IMAGENET_STD)))
    (first, normalizer), *others = found.items()
    for prefix, other in others:
        if not all(np.array_equal(a, b) for a, b in zip(normalizer, other)):
            raise ValueError(
                f"{prefix}new_mean/new_std {other.mean.tolist()}/{other.std.tolist()} differ from "
                f"{first}new_mean/new_std {normalizer.mean.tolist()}/{normalizer.std.tolist()}"
            )
    if not np.all(normalizer.std > 0):
        raise ValueError(f"normalizer std must be positive, got {normalizer.std.tolist()}")
    return normalizer


def _channel_vector(key: str, value: Any, channels: int) -> np.ndarray:
    """`[C, 1, 1]` or `[C]` -> `[C]`, C being the classifier's input channels."""
    array = _float32(key, value)
    if array.shape not in ((channels, 1, 1), (channels,)):
        raise ValueError(
            f"{key} must have shape ({channels}, 1, 1) for a {channels}-channel classifier; "
            f"got {array.shape}"
        )
    return array.reshape(channels)


def _shape(value: Any) -> tuple[int, ...]:
    """The shape of a tensor or array without converting it."""
    shape = value.shape if hasattr(value, "shape") else np.shape(value)
    return tuple(int(size) for size in shape)


def _numpy(value: Any) -> np.ndarray:
    """A torch tensor (duck-typed, so torch is never imported) or array-like as a NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if not value.is_floating_point():
            return value.numpy()
        return value.float().numpy()  # also bfloat16, which NumPy lacks
    return np.asarray(value)


def _float32(key: str, value: Any) -> np.ndarray:
    array = _numpy(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{key} has dtype {array.dtype}; weights must be floating point")
    return array.astype(np.float32, copy=False)


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def _list_keys(keys, sort: bool = True) -> str:
    keys = list(keys)
    if sort:
        keys = sorted(keys, key=_natural_order)
    listed = ", ".join(keys[:_MAX_LISTED])
    return listed + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _natural_order(key: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _describe(module: ResNet) -> str:
    return (
        f"ResNet(stage_sizes={tuple(module.stage_sizes)}, bottleneck={module.bottleneck}, "
        f"num_classes={module.num_classes}, stem={module.stem!r}, width={module.width})"
    )
