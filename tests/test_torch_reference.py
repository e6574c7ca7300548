"""jfail's classifiers compute what the same PyTorch models compute, weight for weight.

The PyTorch reference models (`jfail.testing.torch_reference`) are written with plain
`torch.nn` in the layouts the paper's code and torchvision use (torchvision itself is not
imported). Random torch weights, and random BatchNorm running statistics in eval mode, are
copied into jfail's Flax variables; the logits, the pooled penultimate `features` and the last
`feature_map` must then agree to 1e-4 relative. The state-dict converter of
`jfail.models.convert` must build exactly the variables the module-by-module copy builds, and the
copy back into torch must give back the same weights.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from jfail.models import DefuseCNN, init_classifier, model_fns, resnet_variables_from_torch

torch = pytest.importorskip("torch")

from jfail.testing.torch_reference import (  # noqa: E402  (needs torch)
    TorchDefuseCNN,
    check_taps,
    jfail_taps,
    load_flax_variables,
    randomize_batchnorm,
    resnet_pair,
    torch_taps,
    torch_to_flax,
)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Reproducible random torch weights in every test."""
    torch.manual_seed(0)


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)])
def test_defuse_cnn_matches_torch(image_shape):
    """28 px flattens a 1x1 map; 32 px a 2x2 one, which checks the NCHW -> NHWC flatten order."""
    height, width, channels = image_shape
    reference = TorchDefuseCNN(channels, (height, width), num_classes=10)
    module = DefuseCNN(num_classes=10)
    variables = torch_to_flax(reference)
    _check_against_torch(module, variables, reference, image_shape, batch=4)


@pytest.mark.parametrize(
    "name, stem, width, image_shape, batch",
    [
        ("resnet18", "small", 16, (28, 28, 1), 4),
        ("resnet18", "imagenet", 64, (64, 64, 3), 4),
        ("resnet50", "imagenet", 64, (64, 64, 3), 2),
    ],
)
def test_resnet_matches_torch(name, stem, width, image_shape, batch):
    module, reference = resnet_pair(name, stem, width, image_shape[-1], num_classes=10)
    randomize_batchnorm(reference, seed=1)
    _check_against_torch(module, torch_to_flax(reference), reference, image_shape, batch)


@pytest.mark.parametrize(
    "name, stem, image_shape",
    [("resnet18", "small", (28, 28, 1)), ("resnet50", "small", (32, 32, 3)),
     ("resnet50", "imagenet", (64, 64, 3))],
)
def test_weight_copy_fills_exactly_jfails_variables(name, stem, image_shape):
    """Same tree, same shapes: nothing missing, nothing extra (e.g. a downsample branch)."""
    module, reference = resnet_pair(name, stem, 4, image_shape[-1], num_classes=7)
    init = jax.eval_shape(lambda key: init_classifier(module, image_shape, key), jax.random.key(0))
    params, state = jax.tree_util.tree_map(np.shape, init)
    got = jax.tree_util.tree_map(np.shape, torch_to_flax(reference))
    assert got == {"params": params, **state}


@pytest.mark.parametrize(
    "name, stem, width, in_channels",
    [("resnet18", "small", 4, 1), ("resnet18", "imagenet", 8, 3), ("resnet50", "small", 4, 3),
     ("resnet50", "imagenet", 8, 3)],
)
def test_state_dict_converter_equals_module_copy(name, stem, width, in_channels):
    """`resnet_variables_from_torch(state_dict)` == the module-by-module copy, leaf for leaf."""
    module, reference = resnet_pair(name, stem, width, in_channels, num_classes=7)
    randomize_batchnorm(reference, seed=2)
    got = resnet_variables_from_torch(reference.state_dict(), module)
    want = torch_to_flax(reference)
    chex.assert_type(jax.tree_util.tree_leaves(got), np.float32)
    chex.assert_trees_all_equal(got, want)  # the same structure and values


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_copy_back_into_torch_restores_every_tensor(name):
    """`load_flax_variables` inverts `torch_to_flax`, BatchNorm statistics included."""
    module, reference = resnet_pair(name, "small", 4, 3, num_classes=7)
    randomize_batchnorm(reference, seed=3)
    _, fresh = resnet_pair(name, "small", 4, 3, num_classes=7)
    load_flax_variables(fresh, torch_to_flax(reference))
    want, got = reference.state_dict(), fresh.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        if tensor.is_floating_point():
            assert torch.equal(got[key], tensor), key


def _check_against_torch(module, variables, reference, image_shape, batch):
    """jfail's three taps on `[batch, *image_shape]` noise equal the torch model's (eval mode)."""
    x = np.random.default_rng(0).normal(size=(batch, *image_shape)).astype(np.float32)
    check_taps(jfail_taps(model_fns(module, variables), x), torch_taps(reference, x))
