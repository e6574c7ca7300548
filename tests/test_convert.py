"""PyTorch ResNet checkpoints load into jfail's ResNet and compute what the torch models compute.

Randomly initialized torch reference models (`jfail.testing.torch_reference`, random BatchNorm
statistics) are saved with `torch.save` in torchvision's format (a bare state dict) and in the
robustness library's (the `AttackerModel` state dict, `DataParallel`'s `module.` prefix, under
`'model'`; or without the prefix under `'state_dict'`). jfail's loaders must give the same logits,
penultimate features and last feature map to 1e-4 relative, with the robustness normalizer
`(clamp(x, 0, 1) - mean) / std` applied on both sides; and reject what does not fit, by name.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfail.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DefuseCNN,
    load_robustness_checkpoint,
    load_torchvision_resnet,
    normalized_model_fns,
    resnet18,
    resnet50,
    resnet_variables_from_torch,
)

torch = pytest.importorskip("torch")

from jfail.testing.torch_reference import (  # noqa: E402  (needs torch)
    RTOL,
    TorchDefuseCNN,
    TorchRobustModel,
    check_taps,
    jfail_taps,
    randomize_batchnorm,
    resnet_pair,
    torch_taps,
    torch_to_flax,
)

tnn = torch.nn

IMAGE_SHAPE = (64, 64, 3)
MEAN = (0.45, 0.5, 0.38)  # not ImageNet's, so a loader that ignores the checkpoint's fails
STD = (0.21, 0.27, 0.24)
NORMALIZER_KEYS = {
    f"{owner}.{name}"
    for owner in ("normalizer", "attacker.normalize")
    for name in ("new_mean", "new_std")
}


@pytest.fixture(scope="module")
def references():
    """torchvision-layout ResNet-50 and ResNet-18 (ImageNet stem, width 64, 10 classes)."""
    torch.manual_seed(0)
    models = {}
    for seed, name in enumerate(("resnet50", "resnet18")):
        _, reference = resnet_pair(name, "imagenet", 64, 3, num_classes=10)
        randomize_batchnorm(reference, seed=seed)
        models[name] = reference.eval()
    return models


def test_torchvision_resnet50_file_matches_torch(references, tmp_path):
    """torchvision's weights take ImageNet-normalized images: normalize on both sides."""
    reference = references["resnet50"]
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    module, variables = load_torchvision_resnet(path)
    assert module == resnet50(10)
    x = _images(2)
    fns = normalized_model_fns(module, variables, IMAGENET_MEAN, IMAGENET_STD)
    want = torch_taps(TorchRobustModel(reference, IMAGENET_MEAN, IMAGENET_STD), x)
    check_taps(jfail_taps(fns, x), want)


@pytest.mark.parametrize(
    "arch, container, data_parallel",
    [("resnet50", "model", True), ("resnet50", "state_dict", False), ("resnet18", "model", True)],
)
def test_robustness_checkpoint_file_matches_torch(references, tmp_path, arch, container,
                                                  data_parallel):
    """Logits and features of `model(normalizer(x))`, including pixels outside [0, 1]."""
    robust = TorchRobustModel(references[arch], MEAN, STD).eval()
    state = _robustness_state(robust, data_parallel)
    prefix = "module." if data_parallel else ""
    classifier_keys = set(references[arch].state_dict())
    assert set(state) == {
        prefix + key
        for key in NORMALIZER_KEYS
        | {f"{owner}.{k}" for owner in ("model", "attacker.model") for k in classifier_keys}
    }
    path = tmp_path / "checkpoint.pt"
    torch.save({container: state, "epoch": 90}, path)

    module, variables, normalizer = load_robustness_checkpoint(path, arch=arch)
    assert module == {"resnet50": resnet50, "resnet18": resnet18}[arch](10)
    np.testing.assert_array_equal(normalizer.mean, np.float32(MEAN))
    np.testing.assert_array_equal(normalizer.std, np.float32(STD))
    x = _images(2)
    fns = normalized_model_fns(module, variables, *normalizer)
    check_taps(jfail_taps(fns, x), torch_taps(robust, x))


def test_normalized_gradients_match_torch():
    """Input gradients through the clamp: 1 on [0, 1] with the bounds, 0 outside, as torch's.

    On the small Defuse CNN, which compiles fast: the clamp does not depend on the classifier.
    """
    torch.manual_seed(3)
    reference = TorchDefuseCNN(3, (32, 32), num_classes=10)
    robust = TorchRobustModel(reference, MEAN, STD).eval()
    module = DefuseCNN(num_classes=10)
    variables = torch_to_flax(reference)
    x = _images(2, shape=(32, 32, 3))
    weights = np.random.default_rng(1).normal(size=(2, 10)).astype(np.float32)

    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_(True)
    (robust(x_torch) * torch.from_numpy(weights)).sum().backward()
    want = x_torch.grad.numpy().transpose(0, 2, 3, 1)

    logits = normalized_model_fns(module, variables, MEAN, STD).logits
    got = jax.jit(jax.grad(lambda fn, x: jnp.sum(fn(x) * weights), argnums=1))(logits, x)
    outside = (x < 0) | (x > 1)
    assert np.all(np.asarray(got)[outside] == 0) and np.all(want[outside] == 0)
    assert np.all(want[(x == 0) | (x == 1)] != 0)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5 * np.abs(want).max())


def test_robustness_checkpoint_without_normalizer_defaults_to_imagenet(references):
    """A bare `module.model.*` state dict, passed as a mapping, with no normalizer keys."""
    state = {f"module.model.{k}": v for k, v in references["resnet18"].state_dict().items()}
    module, variables, normalizer = load_robustness_checkpoint(state, arch="resnet18")
    np.testing.assert_array_equal(normalizer.mean, np.float32(IMAGENET_MEAN))
    np.testing.assert_array_equal(normalizer.std, np.float32(IMAGENET_STD))
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)


def test_resnet18_weights_into_resnet50_name_the_keys(references):
    with pytest.raises(ValueError) as error:
        load_torchvision_resnet(references["resnet18"].state_dict(), arch="resnet50")
    message = str(error.value)
    assert "ResNet(stage_sizes=(3, 4, 6, 3)" in message
    assert "missing keys" in message and "layer1.0.conv3.weight" in message
    assert "layer1.0.downsample.0.weight" in message
    assert (
        "layer1.0.conv1.weight: (64, 64, 3, 3) in the state dict, (64, 64, 1, 1) needed" in message
    )
    assert "unexpected keys" not in message

    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): .*layer1\.0\.conv3\.weight"):
        load_torchvision_resnet(references["resnet50"].state_dict(), arch="resnet18")


def test_shape_mismatch_names_key_and_shapes(references):
    state = dict(references["resnet18"].state_dict())
    with pytest.raises(ValueError, match=r"fc\.weight: \(10, 512\) in the state dict, \(5, 512\)"):
        load_torchvision_resnet(state, arch="resnet18", num_classes=5)
    state["layer2.1.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    pattern = (r"shape mismatches \(1\): layer2\.1\.conv2\.weight: "
               r"\(128, 128, 1, 1\) in the state dict, \(128, 128, 3, 3\) needed")
    with pytest.raises(ValueError, match=pattern):
        load_torchvision_resnet(state, arch="resnet18")


def _set(key, value):
    def edit(state):
        state[key] = value
    return edit


def _set_model(key, value):
    """Replace a classifier tensor in both copies, the model's and the attacker's."""
    def edit(state):
        state[f"module.model.{key}"] = state[f"module.attacker.model.{key}"] = value
    return edit


def _perturb(key):
    def edit(state):
        state[key] = state[key].clone() + 1e-3
    return edit


def _delete(key):
    def edit(state):
        del state[key]
    return edit


def _delete_all(prefix):
    def edit(state):
        for key in [key for key in state if key.startswith(prefix)]:
            del state[key]
    return edit


@pytest.mark.parametrize(
    "edit, pattern",
    [
        pytest.param(
            _perturb("module.attacker.model.layer3.1.bn2.running_var"),
            r"attacker\.model\.\* must duplicate model\.\*.*"
            r"different values: attacker\.model\.layer3\.1\.bn2\.running_var",
            id="attacker-weights-differ",
        ),
        pytest.param(
            _delete("module.attacker.model.fc.bias"),
            r"attacker\.model\.\* must duplicate.*only under model\.: model\.fc\.bias",
            id="attacker-weight-missing",
        ),
        pytest.param(
            _perturb("module.attacker.normalize.new_std"),
            r"attacker\.normalize\.new_mean/new_std .* differ from normalizer\.new_mean/new_std",
            id="attacker-normalizer-differs",
        ),
        pytest.param(
            _delete("module.normalizer.new_std"),
            r"normalizer\.new_mean without its counterpart",
            id="mean-without-std",
        ),
        pytest.param(
            _set("module.normalizer.new_mean", torch.zeros(4, 1, 1)),
            r"normalizer\.new_mean must have shape \(3, 1, 1\).*got \(4, 1, 1\)",
            id="normalizer-shape",
        ),
        pytest.param(
            _set("module.extra.weight", torch.zeros(3)),
            r"keys outside .*: extra\.weight",
            id="unknown-key",
        ),
        pytest.param(
            _set("fc.weight", torch.zeros(3)),
            r"some keys have the 'module\.' prefix and some do not",
            id="mixed-prefix",
        ),
        pytest.param(
            _set_model("conv1.weight", torch.zeros(64, 3, 7, 7, dtype=torch.int32)),
            r"conv1\.weight has dtype int32; weights must be floating point",
            id="integer-weights",
        ),
        pytest.param(
            _delete_all("module.model."),
            r"no classifier weights .*load_torchvision_resnet",
            id="no-classifier",
        ),
    ],
)
def test_malformed_robustness_checkpoints_are_rejected(references, edit, pattern):
    state = _robustness_state(TorchRobustModel(references["resnet18"], MEAN, STD), True)
    edit(state)
    with pytest.raises(ValueError, match=pattern):
        load_robustness_checkpoint({"model": state}, arch="resnet18")


def test_numpy_state_dict_converts_without_torch(monkeypatch, tmp_path):
    module, reference = resnet_pair("resnet18", "small", 4, 1, num_classes=3)
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    variables = resnet_variables_from_torch(state, module)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 1, 4)
    with pytest.raises(ImportError, match=r"pip install 'jfail\[torch\]'"):
        load_torchvision_resnet(path, arch="resnet18")


def test_only_resnets_convert():
    with pytest.raises(TypeError, match="jfail ResNet"):
        resnet_variables_from_torch({}, DefuseCNN(num_classes=10))
    with pytest.raises(ValueError, match="no 'conv1.weight'"):
        resnet_variables_from_torch({"fc.weight": np.zeros((10, 512))}, resnet18(10))
    with pytest.raises(ValueError, match="arch must be one of"):
        load_torchvision_resnet({"fc.weight": np.zeros((10, 512))}, arch="resnet34")


# --- helpers --------------------------------------------------------------------------------


def _robustness_state(robust, data_parallel: bool) -> dict:
    """The state dict the robustness library saves: from `DataParallel` (`module.`) or bare."""
    return dict((tnn.DataParallel(robust) if data_parallel else robust).state_dict())


def _images(batch: int, shape=IMAGE_SHAPE) -> np.ndarray:
    """Pixels mostly in [0, 1], some exactly 0 or 1 and some outside, which the clamp removes."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.1, 1.1, size=(batch, *shape)).astype(np.float32)
    x.flat[rng.choice(x.size, 20, replace=False)] = np.repeat(np.float32([0, 1]), 10)
    return x
