"""Run configurations: plain dataclasses, loaded from Python files in `configs/`.

Every method's config is here (`ClassifierRunConfig`, `BarlowConfig`, `DefuseConfig`,
`DebugTestsConfig`, `PrimeConfig`). Their defaults are the papers' settings (each field's comment
names its section) or, where a paper gives none, the Fashion-MNIST experiment's. A config file
defines `get_config()` returning one of them, stating only what differs from its base with
`derive_config`: the dataclass's defaults or another file in `configs/` (the robust classifier is
the standard one plus an attack). `load_config(path, overrides)` imports it and applies
`key=value` overrides (dotted for nested fields, e.g. `train.epochs=3`); an unknown key is an
error that lists the valid ones, and every value is checked against its field's type
(`check_types`) before the dataclass sees it, so a bad value is reported by its key, before any
data is loaded or any file written.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jfail.defuse.vae import VAEConfig
from jfail.train.classifier import TrainConfig

__all__ = [
    "BarlowConfig",
    "ClassifierRunConfig",
    "DebugTestsConfig",
    "DefuseConfig",
    "PrimeConfig",
    "derive_config",
    "load_config",
    "write_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "check_types",
    "validate_config",
    "ConfigError",
    "UnknownConfigKeyError",
]


class ConfigError(ValueError):
    """A config file or `--set` override that cannot be used: the message names the key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownConfigKeyError(ConfigError, KeyError):
    """A key that names no config field (a `KeyError` too, as dict look-ups raise)."""


# Each field's comment says where its default comes from: a section of the method's paper (the
# class docstring names its seed), or "no paper value" for a choice of jfail's, kept as the
# Fashion-MNIST experiment's (data sets, run paths, held-out evidence, report layout, memory).


@dataclasses.dataclass(frozen=True)
class ClassifierRunConfig:
    """Train a classifier on a data set; `jfail train --config` runs it.

    Defaults are seed 001's MNIST classifier (appendix B.2, figure 7: the Defuse CNN, Adadelta
    with learning rate 1, batch 64, 5 epochs), the classifier that Defuse repairs and that the
    debugging tests and PRIME examine here.
    """

    name: str = "classifier"  # no paper value
    dataset: str = "fashion_mnist"  # no paper value: the Fashion-MNIST experiment
    val_fraction: float = 0.1  # no paper value: the share of training images held out
    model: str = "defuse_cnn"  # seed 001 B.2, figure 7
    model_kwargs: dict = dataclasses.field(default_factory=dict)  # no paper value
    train: TrainConfig = TrainConfig()  # seed 001 B.2: Adadelta, lr 1, batch 64, 5 epochs


@dataclasses.dataclass(frozen=True)
class BarlowConfig:
    """Barlow on a data set: explain a classifier's errors with robust and standard features.

    Each network is a classifier config plus the run directory that holds (or will hold) its
    trained weights; a missing run is trained first. Defaults are the paper's (seed 000: δ = 0.1,
    τ = 0.2, trees of depth 1 and 3, grouping by label and by prediction, the mutual information
    on every feature, the feature attack of appendix C) where it gives a value.

    The trees are fitted on `split` and every leaf is measured on `evidence_split`
    (`jfail.barlow.leaf_evidence`: held-out error rate, Wilson interval, exact binomial p-value,
    `fdr_method` q-value; significant where q <= `alpha`). Splits: "train" (the whole training
    split, the paper's choice), "val" (the standard classifier's validation part of it, held out
    from its training: same fraction and seed), "test". The two must not share images, so
    "train" and "val" cannot be paired. `screen`: None runs the mutual information on every
    feature as the paper does; an int screens each group to that many features first.

    `model`: instead of the two classifier runs, one's own model, `"package.module:function"`
    (`jfail.models.user`): its errors are explained with its own `features`. "val" is then a
    fixed share of the training split (`jfail.models.user.USER_VAL_FRACTION`, drawn with `seed`).
    """

    name: str = "barlow_fmnist"  # no paper value
    dataset: str = "fashion_mnist"  # no paper value (the paper: ImageNet, appendix F)
    model: str | None = None  # "package.module:function": the user's model, no classifier runs
    # Appendix F fits on ImageNet's training split; jfail fits on the classifier's validation
    # images instead, whose errors are those it makes on unseen data, and measures every leaf on
    # a second split (no paper value: the held-out evidence is jfail's).
    split: str = "val"
    evidence_split: str = "test"
    # no paper value: the paper's networks are an ImageNet ResNet-50 and its ℓ2 (ε = 3)
    # adversarially trained twin (appendix A)
    classifier_config: str = "configs/resnet18_fmnist.py"
    classifier_run: str = "runs/classifiers/resnet18_fmnist"
    robust_config: str = "configs/resnet18_fmnist_robust_l2.py"
    robust_run: str = "runs/barlow/resnet18_fmnist_robust_l2"
    num_features: int = 50  # k of Algorithm 1 (appendix D), which gives no value; jfail's 50
    depths: tuple = (1, 3)  # appendix E
    groupings: tuple = ("label", "prediction")  # appendices D and E
    delta: float = 0.1  # appendix E, Table 1
    tau: float = 0.2  # appendix E, Table 1
    screen: int | None = None  # Algorithm 1 (appendix D): mutual information on every feature
    fdr_method: str = "by"  # no paper value (held-out evidence)
    alpha: float = 0.05  # no paper value (held-out evidence)
    # appendix C (ε = 500, step 1, 500 steps at 224x224x3); None: that attack scaled to the
    # image size (`jfail.barlow.attack_settings`)
    attack_epsilon: float | None = None
    attack_step_size: float | None = None
    attack_steps: int | None = None
    panel_images: int = 6  # no paper value: images per row of a feature panel
    seed: int = 0  # no paper value


@dataclasses.dataclass(frozen=True)
class DefuseConfig:
    """Defuse end to end: β-VAE, identification, distillation, review, correction.

    Defaults are seed 001's MNIST settings (section 4.1, appendix B.2): z = 10, β = 4, Adam 1e-3,
    KL annealed over 500 steps; Beta(50, 50) noise, Q = 500 draws, at most 100 failures per
    image; K = 100 components, weight threshold 0.01, down-sampling to 50,000; τ = 0.5; 10
    reviewed samples per scenario, 5 annotators, ρ = 0.5; 256 fine-tuning and 256 test samples
    per scenario; Adam 1e-3, minibatch 256, 3 epochs per λ over the paper's 17 values of λ.

    `model`: instead of the classifier run, one's own model, `"package.module:function"`
    (`jfail.models.user`; the classifier must hold its weights as a pytree, for fine-tuning):
    the annotators and the β-VAE (unless the model gives an encoder and decoder) are then
    trained on `dataset` into the run's work directory, and "val" is a fixed share of the
    training split.
    """

    name: str = "defuse_fmnist"  # no paper value
    dataset: str = "fashion_mnist"  # no paper value (the paper: MNIST, SVHN, German signs)
    model: str | None = None  # "package.module:function": the user's model, no classifier run
    classifier_config: str = "configs/defuse_cnn_fmnist.py"  # no paper value (B.2's CNN)
    classifier_run: str = "runs/classifiers/defuse_cnn_fmnist"  # no paper value
    annotator_config: str = "configs/annotator_mlp_fmnist.py"  # no paper value
    annotator_runs: str = "runs/defuse/annotators_fmnist"  # one sub-directory per annotator
    num_annotators: int = 5  # section 4.1: 5 workers per image, majority vote
    annotations: str = "simulated"  # or "page": the votes given on `jfail annotate`'s page
    latent_dim: int = 10  # section 4.1, B.2: z = 10
    vae: VAEConfig = VAEConfig()  # B.2: β = 4, Adam 1e-3, batch 2048, 800 epochs, 500 steps
    vae_run: str = "runs/defuse/vae_fmnist"  # no paper value
    identify_images: int | None = None  # B.2: None, the whole training split
    num_draws: int = 500  # B.2: Q = 500
    a: float = 50.0  # section 4.1, B.2: Beta(50, 50)
    b: float = 50.0  # section 4.1, B.2
    max_per_image: int = 100  # B.2: at most 100 per image
    noise: str = "paper"  # Algorithm 1 (appendix A)
    compare_noise: bool = True  # no paper value: also identify with centred noise, report both
    max_components: int = 100  # section 4.1, B.2: K = 100
    min_weight: float = 0.01  # section 4.1, B.2: ε = 0.01
    max_points: int = 50_000  # section 4.1: down-sampled to 50,000
    tau: float = 0.5  # section 4.1, B.2: τ = 0.5 for MNIST
    review_samples: int = 10  # section 4.1: 10 instances reviewed per cluster
    rho: float = 0.5  # section 4.1: ρ = 0.5
    samples_per_scenario: int = 256  # section 4.1, B.2: 256 to fine-tune, 256 to test
    lambdas: tuple = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1,  # B.2
                      1.0, 2.0, 5.0, 10.0, 20.0, 100.0, 1000.0)
    finetune_epochs: int = 3  # section 4.1, B.2: 3 epochs per λ for MNIST
    finetune_batch_size: int = 256  # B.2
    finetune_learning_rate: float = 1e-3  # B.2: Adam 1e-3
    seed: int = 0  # no paper value

    def __post_init__(self):
        if self.annotations not in ("simulated", "page"):
            raise ValueError(
                f"annotations must be 'simulated' (annotator classifiers) or 'page' (votes from "
                f"`jfail annotate`), got {self.annotations!r}")


@dataclasses.dataclass(frozen=True)
class DebugTestsConfig:
    """The debugging tests for explanations (seed 002) on Fashion-MNIST-sized data.

    Every attribution method in `methods` (default: all of `jfail.attribution.METHODS`, with the
    paper's hyperparameters) is tested against four planted bugs: a spurious background (Table 2,
    SSIM to GT-1 and GT-2), mislabelled training examples (a model trained with
    `mislabel_fraction` of labels flipped against the model trained on correct labels),
    cascading re-initialization from the top layer down (Figure 7) and out-of-distribution inputs
    (Table 3, SSIM and Spearman rank correlation). Appendix G runs TCAV and influence functions
    on the same bugged models. `parts` picks what runs. Missing models are trained first.
    Defaults are the paper's where it gives a value (190 inputs per table, 200 for the
    randomization, 40 epochs for the spurious model, 10 % of labels flipped).
    """

    name: str = "debug_tests"  # no paper value
    dataset: str = "fashion_mnist"  # no paper value (section 3: birds vs dogs)
    classifier_config: str = "configs/defuse_cnn_fmnist.py"  # no paper value (C.2: BVD-CNN)
    classifier_run: str = "runs/classifiers/defuse_cnn_fmnist"  # no paper value
    ood_dataset: str = "mnist5k"  # section 5: Fashion-MNIST inputs on an MNIST model
    ood_config: str = "configs/defuse_cnn_mnist5k.py"  # no paper value
    ood_run: str = "runs/classifiers/defuse_cnn_mnist5k"  # no paper value
    spurious_classes: tuple = (0, 6)  # no paper value: T-shirt/top, Shirt (3.1: birds, dogs)
    backgrounds: tuple = ("brick", "grass")  # no paper value (3.1: sky, bamboo forest)
    spurious_epochs: int = 40  # C.2: the BVD-CNN trains 40 epochs
    mislabel_fraction: float = 0.1  # section 3.2, D.2: 10 percent flipped
    mislabel_epochs: int | None = None  # 3.2: None, the correct-label model's own settings
    workdir: str = "runs/debug_tests"  # no paper value
    methods: tuple | None = None  # appendix B: None, every method
    num_inputs: int = 190  # Tables 2 and 3 (sections 3.1 and 5): 190 inputs
    randomization_inputs: int = 200  # C.1, Figure 26: 200 images for model contamination
    batch_size: int = 40  # no paper value (memory)
    seed: int = 0  # no paper value
    # which parts run (`--parts` overrides): "table2", "mislabel", "table3", "figure7", "appendix_g"
    parts: tuple = ("table2", "mislabel", "table3", "figure7", "appendix_g")
    grid_inputs: int = 3  # no paper value: input columns of the per-bug attribution grids
    # Appendix G, TCAV on the spurious model: concept = crops of a spurious background alone;
    # random concepts = data-set images on crops of the other textures; t-test against
    # random-vs-random CAVs. `tcav_control`: also on the spurious architecture re-initialized.
    # Appendix G gives no TCAV settings: no paper value for the six below.
    tcav_layers: tuple = ("conv1", "conv2", "dense0")
    tcav_concept_images: int = 100
    tcav_random_sets: int = 10
    tcav_inputs: int = 100  # spurious test inputs per class
    tcav_alpha: float = 0.05
    tcav_control: bool = True
    # Appendix G, influence functions (Koh & Liang, last-layer Hessian): a pool of the spurious
    # model's training images and test inputs; top `influence_top` of the pool per input.
    influence_train: int = 2000  # no paper value (appendix G ranks the whole training set)
    influence_test: int = 50  # appendix G: 50 examples
    influence_top: float = 0.01  # appendix G: the top 1 percent
    influence_damping: float = 0.01  # no paper value
    # Appendix G, self-influence on the mislabelled model: a subset of its training set (with
    # the flipped labels in it) ranked by self-influence.
    self_influence_train: int = 5000  # no paper value (appendix G: the whole training set)


@dataclasses.dataclass(frozen=True)
class PrimeConfig:
    """PRIME on a data set with a trained classifier (seed 004). Defaults are the paper's where it
    gives a value.

    The classifier comes from `classifier_run` (a `run_classifier` directory); if that run has no
    metrics yet, `classifier_config` is trained into it first. Failure modes are searched on
    `search_split` and re-evaluated on `heldout_split`:
      "train": the images the classifier was fitted on (the paper searches its training data and
               checks unseen data, sections 4 and 4.1), where the model's errors are rarer
               than on unseen data and not those it makes there;
      "val":   the classifier's validation images (not fitted on, only used to pick the epoch;
               the default);
      "test":  the data set's test split (the default held-out split).
    On the held-out split each mode gets an interval, an exact p-value for its error rate and
    one for each tag's necessity, and q-values under `fdr_method` ("by": Benjamini-Yekutieli,
    "bh": Benjamini-Hochberg); it is significant when all its q-values are at most `alpha`
    (`jfail.prime.mode_evidence`).

    Search (section 3.2, A.2): min_size s = 30, min_drop a = 30 %, min_gain (b2, b3, b4) =
    (10, 5, 2.5) %, max_tags l = 4; tags on fewer than min_tag_count images of a class are
    dropped (section 3.1: 50 to 200 by data set size). greedy_beam_width is the beam of the
    greedy search (A.6), run alongside for comparison. sweep_* is the (s, a) grid of A.5.

    Shape tags: per-class quantiles (low, high) of each measurement, ink threshold on [0, 1]
    pixels. Planted description check (section 4.3 against ground truth): a synthetic problem of
    four classes with one planted mode of 1, 2, 3 and 4 tags each (planted tags on a share
    planted_prevalence[0] of images, the others on planted_prevalence[1]); the search sees the
    true tags flipped with planted_flip_probability.

    `model`: instead of the classifier run, one's own model, `"package.module:function"`
    (`jfail.models.user`); "val" is then a fixed share of the training split
    (`jfail.models.user.USER_VAL_FRACTION`, drawn with `seed`).
    """

    name: str = "prime_fmnist"  # no paper value
    dataset: str = "fashion_mnist"  # no paper value (the paper: Living17, CelebA, ...)
    model: str | None = None  # "package.module:function": the user's model, no classifier run
    classifier_config: str = "configs/defuse_cnn_fmnist.py"  # no paper value
    classifier_run: str = "runs/classifiers/defuse_cnn_fmnist"  # no paper value
    # section 4.1 searches one set and checks unseen (test) images; jfail searches the
    # classifier's validation images, never fitted on (no paper value for "val")
    search_split: str = "val"
    heldout_split: str = "test"  # section 4.1, A.5: unseen (test) data
    fdr_method: str = "by"  # no paper value (held-out evidence)
    alpha: float = 0.05  # no paper value (held-out evidence)
    # tags (the paper's come from RAM, section 3.1; shape tags are jfail's: no paper value)
    shape_quantiles: tuple = (0.2, 0.8)
    ink_threshold: float = 0.2
    min_tag_count: int = 50  # section 3.1: 50, 100 or 200 by data set size; the smallest
    # search
    min_size: int = 30  # section 3.2, Figure 4, A.2: s = 30
    min_drop: float = 0.30  # section 3.2, A.2: a = 30 %
    min_gain: tuple = (0.10, 0.05, 0.025)  # section 3.2, A.2: b2, b3, b4
    max_tags: int = 4  # section 3.2: l <= 4
    greedy_beam_width: int = 10  # no paper value (A.6 gives none)
    sweep_min_sizes: tuple = (30, 100)  # A.2: s = 30 and s = 100
    sweep_min_drops: tuple = (0.1, 0.2, 0.3)  # no paper value (A.5 lists no values of a)
    # report: no paper value
    grid_images: int = 8
    max_grid_modes_per_class: int = 8
    # planted description-quality check (jfail's ground truth for section 4.3): no paper value
    planted_images_per_class: int = 100_000
    planted_num_tags: int = 16
    planted_prevalence: tuple = (0.15, 0.3)
    planted_base_accuracy: float = 0.95
    planted_flip_probability: float = 0.05
    seed: int = 0  # no paper value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Import `path`, call its `get_config()`, apply `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"jfail_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} must define get_config()")
    config = module.get_config()
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{path}: get_config() must return a dataclass, "
                        f"got {type(config).__name__}")
    check_types(config, where=f"{path}: ")
    return apply_overrides(config, overrides)


def derive_config(base: Any, changes: Mapping[str, Any] | None = None) -> Any:
    """`base` with `changes` applied: how a file in `configs/` states only what differs.

    Args:
      base: a config dataclass instance; a config dataclass type, standing for its defaults; or
        the path of a config file, read with `load_config` (in a config file,
        `Path(__file__).with_name("resnet18_fmnist.py")` names a sibling).
      changes: `{key: value}`, keys as `--set` writes them (dotted for nested fields, e.g.
        `{"train.epochs": 2}`), values as Python objects (a nested dataclass, a tuple, ...).
        Each value is checked against its field's type, as an override is.

    Returns:
      A new config; `base` is left as it was.

    Raises:
      UnknownConfigKeyError: a key that names no field (the message lists the valid ones).
      ConfigError: a value that does not fit its field, naming the key.
    """
    if isinstance(base, (str, Path)):
        config = load_config(base)
    elif isinstance(base, type) and dataclasses.is_dataclass(base):
        config = base()
    elif dataclasses.is_dataclass(base):
        config = base
    else:
        raise TypeError(f"base must be a config dataclass, its type or a config file path, got "
                        f"{type(base).__name__}")
    for key, value in (changes or {}).items():
        try:
            config = _replace_path(config, key.split("."), value, key, source="")
        except ConfigError:
            raise
        except (ValueError, TypeError) as error:  # the dataclass's own check of the new value
            raise ConfigError(f"{key}: {error}") from error
    return config


def write_config(path: str | Path, config: Any, *, doc: str = "") -> Path:
    """Write `config` (a dataclass) as a config file that `load_config` reads back equal.

    The file imports every dataclass the config nests and returns the config's `repr`, so a run
    directory keeps the exact settings of each stage as a file that reruns it. doc: the file's
    docstring.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    imports = sorted({(type(c).__module__, type(c).__qualname__)
                      for c in _nested_dataclasses(config)})
    doc = (doc or f"{type(config).__name__}, written by jfail.").replace('"""', "'''")
    lines = [f'"""{doc}"""', ""]
    lines += [f"from {module} import {name}" for module, name in imports]
    lines += ["", "", "def get_config():", f"    return {config!r}", ""]
    source = "\n".join(lines)
    ast.parse(source)  # a repr that is not valid Python fails here, not when the file is read
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    if load_config(path) != config:
        raise ValueError(f"{path} does not read back equal to the config it was written from")
    return path


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """`['train.epochs=3', 'dataset=digits']` applied to a (nested, frozen) dataclass config."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: an override must look like key=value")
        key, raw = item.split("=", 1)
        try:
            config = _replace_path(config, key.strip().split("."), _parse_value(raw), key.strip())
        except ConfigError:
            raise
        except (ValueError, TypeError) as error:  # the dataclass's own check of the new value
            raise ConfigError(f"--set {item}: {error}") from error
    return config


def validate_config(config: Any) -> None:
    """Everything about a config that can be checked without loading data or writing a file:
    field types (`check_types`), data set names (every field named `dataset` or ending in
    `_dataset`, nested configs too), classifier model names, and the form of a user's
    `model="package.module:function"` (importing and calling it is
    `jfail.models.user.user_model_for_data`'s part).

    Raises:
      ConfigError: naming the field and what it accepts.
    """
    from jfail.data import check_dataset_name
    from jfail.models.registry import MODEL_NAMES

    check_types(config)
    for config_part, prefix in _config_parts(config, ""):
        for name, _, value in _fields_with_hints(config_part):
            if (name == "dataset" or name.endswith("_dataset")) and isinstance(value, str):
                try:
                    check_dataset_name(value)
                except ValueError as error:
                    raise ConfigError(f"{prefix}{name}: {error}") from error
        if isinstance(config_part, BarlowConfig):
            _check_barlow_splits(config_part, prefix)
            _check_evidence_options(config_part, prefix)
        if isinstance(config_part, PrimeConfig):
            _check_prime_splits(config_part, prefix)
            _check_evidence_options(config_part, prefix)
        if isinstance(config_part, DebugTestsConfig):
            _check_debug_tests_choices(config_part, prefix)
        if isinstance(config_part, DefuseConfig):
            from jfail.defuse.identify import NOISE_MODES

            if config_part.noise not in NOISE_MODES:
                raise ConfigError(f"{prefix}noise must be one of {NOISE_MODES}, got "
                                  f"{config_part.noise!r}")
        if isinstance(config_part, (BarlowConfig, DefuseConfig, PrimeConfig)) \
                and config_part.model is not None:
            _check_user_model_spec(config_part.model, prefix)
        if isinstance(config_part, ClassifierRunConfig) and config_part.model not in MODEL_NAMES:
            raise ConfigError(
                f"{prefix}model must be one of {', '.join(MODEL_NAMES)}, got {config_part.model!r}"
            )


def _check_debug_tests_choices(config: DebugTestsConfig, prefix: str) -> None:
    """The parts and attribution methods a debugging-tests config names exist."""
    from jfail.attribution import METHODS
    from jfail.pipelines.debug_tests import PARTS

    unknown = sorted(set(config.parts) - set(PARTS))
    if unknown or not config.parts:
        raise ConfigError(f"{prefix}parts: " + (f"unknown parts {unknown}; " if unknown else
                                                "no part to run; ")
                          + f"choose one or more of {', '.join(PARTS)}")
    unknown = sorted(set(config.methods or ()) - set(METHODS))
    if unknown:
        raise ConfigError(f"{prefix}methods: unknown methods {unknown}; known: {sorted(METHODS)}")


def _check_user_model_spec(spec: str, prefix: str) -> None:
    from jfail.models.user import is_model_spec

    if not is_model_spec(spec):
        raise ConfigError(f"{prefix}model must look like package.module:function (a function of "
                          f"no arguments that returns the model), e.g. my_models:classifier; got "
                          f"{spec!r}")


BARLOW_SPLITS = ("train", "val", "test")


def _check_barlow_splits(config: BarlowConfig, prefix: str) -> None:
    for name in ("split", "evidence_split"):
        value = getattr(config, name)
        if value not in BARLOW_SPLITS:
            raise ConfigError(f"{prefix}{name} must be one of {BARLOW_SPLITS}, got {value!r}")
    pair = {config.split, config.evidence_split}
    if len(pair) == 1 or pair == {"train", "val"}:
        raise ConfigError(
            f"{prefix}evidence_split {config.evidence_split!r} shares images with split "
            f"{config.split!r}: leaves must be measured on images they were not fitted to "
            "(e.g. split='val', evidence_split='test')"
        )
    if config.screen is not None and config.screen < 1:
        raise ConfigError(f"{prefix}screen must be None or >= 1, got {config.screen}")


PRIME_SPLITS = ("train", "val", "test")


def _check_prime_splits(config: PrimeConfig, prefix: str) -> None:
    for name in ("search_split", "heldout_split"):
        value = getattr(config, name)
        if value not in PRIME_SPLITS:
            raise ConfigError(f"{prefix}{name} must be one of {PRIME_SPLITS}, got {value!r}")
    if config.search_split == config.heldout_split:
        raise ConfigError(f"{prefix}search_split and heldout_split must differ, both are "
                          f"{config.search_split!r}")


def _check_evidence_options(config, prefix: str) -> None:
    """The held-out evidence options of a Barlow or PRIME config (`jfail.stats`)."""
    from jfail.stats import FDR_METHODS

    if config.fdr_method not in FDR_METHODS:
        raise ConfigError(f"{prefix}fdr_method must be one of {FDR_METHODS}, got "
                          f"{config.fdr_method!r}")
    if not 0 < config.alpha < 1:
        raise ConfigError(f"{prefix}alpha must lie in (0, 1), got {config.alpha}")


def _config_parts(config, prefix):
    yield config, prefix
    for name, _, value in _fields_with_hints(config):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _config_parts(value, f"{prefix}{name}.")


def check_types(config: Any, *, where: str = "") -> None:
    """Check every field of a (nested) dataclass config against its type annotation.

    Accepted: `int` (not bool), `float` (an int too), `str`, `bool`, `tuple` (a tuple), `dict`,
    nested config dataclasses, `X | None`; other annotations are not checked.

    Raises:
      ConfigError: naming the first field whose value does not fit, e.g.
        "train.epochs must be an integer, got 'abc' (str)".
    """
    for name, hint, value in _fields_with_hints(config):
        _check_value(value, hint, f"{where}{name}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_types(value, where=f"{where}{name}.")


def config_to_dict(config: Any) -> dict:
    """A JSON-ready dict of a dataclass config."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, values: dict) -> Any:
    """Rebuild a (nested) dataclass config from `config_to_dict`'s output; unknown keys fail."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise KeyError(f"unknown config keys {unknown} for {cls.__name__}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        target = _dataclass_in(hints[name])
        kwargs[name] = (config_from_dict(target, value) if target and isinstance(value, dict)
                        else value)
    return cls(**kwargs)


def _nested_dataclasses(value: Any):
    """`value` and every dataclass instance inside it (fields, tuples, lists, dict values)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield value
        for field in dataclasses.fields(value):
            yield from _nested_dataclasses(getattr(value, field.name))
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _nested_dataclasses(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _nested_dataclasses(item)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass named by a type hint (`X`, `X | None`, `Optional[X]`), else None."""
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False",
               tuple: "a tuple, e.g. (1, 2)", dict: "a dict"}


def _fields_with_hints(config):
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        yield field.name, hints.get(field.name, Any), getattr(config, field.name)


def _check_value(value: Any, hint: Any, key: str) -> None:
    if _fits(value, hint):
        return
    options = [h for h in (typing.get_args(hint) if _is_union(hint) else (hint,))]
    words = " or ".join(
        _TYPE_WORDS.get(h, "None" if h is type(None) else getattr(h, "__name__", str(h)))
        for h in options)
    raise ConfigError(f"{key} must be {words}, got {value!r} ({type(value).__name__})")


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    if _is_union(hint):
        return any(_fits(value, option) for option in typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if hint is type(None):
        return value is None
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return True


def _replace_path(config: Any, path: list[str], value: Any, full_key: str, *,
                  source: str = "--set ") -> Any:
    """`config` with the field at `path` set to `value`; `source` prefixes a bad value's key."""
    names = [f.name for f in dataclasses.fields(config)]
    head = path[0]
    if head not in names:
        raise UnknownConfigKeyError(
            f"unknown config key {full_key!r}: {type(config).__name__} has no field {head!r}; "
            f"valid keys: {', '.join(names)}"
        )
    if len(path) > 1:
        child = getattr(config, head)
        if isinstance(child, dict):
            value = {**child, path[1]: value} if len(path) == 2 else None
            if value is None:
                raise ConfigError(f"config key {full_key!r} nests too deep inside dict {head!r}")
        elif dataclasses.is_dataclass(child):
            value = _replace_path(child, path[1:], value, full_key, source=source)
        else:
            raise ConfigError(f"config key {full_key!r}: {head!r} is a value, not a section")
    else:
        hint = dict(_hint_pairs(config))[head]
        if isinstance(value, list):
            value = tuple(value)
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        _check_value(value, hint, f"{source}{full_key}")
    return dataclasses.replace(config, **{head: value})


def _hint_pairs(config):
    return ((name, hint) for name, hint, _ in _fields_with_hints(config))


def _parse_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
