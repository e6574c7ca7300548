"""Testing with Concept Activation Vectors (TCAV, Kim et al. 2018), as assessed in seed 002, §G.

The model is split at a layer into `features(x) -> activations [B, ...]` and
`head(activations) -> logits [B, K]`, both JAX callables (plain functions, or
`jax.tree_util.Partial` to carry parameters through `jax.jit` without recompiling).

- `concept_activation_vector`: a linear classifier (scikit-learn, as in TCAV) separates the
  flattened activations of concept examples from those of random examples; the CAV is the unit
  normal of its decision boundary, pointing toward the concept.
- `directional_derivatives`: gradient of the target logit with respect to the activations,
  dotted with the CAV, one value per input.
- `tcav_score`: the fraction of inputs whose directional derivative is positive.
- `tcav`: CAVs of the concept against several random sets, and random-vs-random CAVs as the
  null; a two-sided t-test says whether the concept's scores differ from the null's.
- `background_tcav`: the paper's check on a spurious model (§G): TCAV of each background as a
  concept, for each class, at layers of a model split by `jfail.models.split_at`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfail.debugtests.bugs import (
    BACKGROUNDS,
    SpuriousData,
    background_only,
    load_backgrounds,
    spurious_backgrounds,
)
from jfail.keys import as_key, host_seed
from jfail.models.adapter import in_trace, traced_model
from jfail.models.callables import logits_fn
from jfail.models.layers import is_layered, layer_names, split_at
from jfail.models.registry import init_classifier
from jfail.xla import jit

__all__ = [
    "TCAVResult",
    "concept_activation_vector",
    "directional_derivatives",
    "tcav_score",
    "tcav",
    "background_tcav",
]

Features = Callable[[jax.Array], jax.Array]
Head = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TCAVResult:
    """Outcome of `tcav` for one (concept, target, layer).

    scores `[R]`: TCAV score of each concept-vs-random CAV; null_scores `[R]`: TCAV scores of
    random-vs-random CAVs; accuracies `[R]`: held-out accuracy of each concept CAV's classifier;
    cavs `[R, D]`: the concept CAVs; mean, std: of `scores` (population std, ddof=0); p_value:
    two-sided t-test of `scores` against `null_scores` (NaN if both are constant);
    significant: `p_value < alpha`.
    """

    scores: np.ndarray
    null_scores: np.ndarray
    accuracies: np.ndarray
    cavs: np.ndarray
    mean: float
    std: float
    p_value: float
    significant: bool


def concept_activation_vector(
    concept_acts, random_acts, *, key=0, classifier: str = "sgd",
    test_fraction: float = 1 / 3,
) -> tuple[jax.Array, float]:
    """CAV of a concept at one layer.

    A linear classifier (`classifier="sgd"`: `SGDClassifier(alpha=0.01, max_iter=1000,
    tol=1e-3)`, TCAV's default; `"logistic"`: `LogisticRegression`) is fit on a stratified
    split, seeded by `key`.

    Args:
        concept_acts: `[Nc, ...]` activations of concept examples (flattened to `[Nc, D]`).
        random_acts: `[Nr, ...]` activations of random examples (flattened to `[Nr, D]`).
        key: an int seed or a PRNG key for the split and the classifier.
        classifier: `"sgd"` or `"logistic"`.
        test_fraction: the held-out share used to measure the accuracy, in (0, 1).

    Returns:
        `(cav [D], accuracy)`: the unit normal of the classifier's boundary, pointing toward the
        concept, and its accuracy on the held-out `test_fraction`.

    Raises:
        ValueError: activations that are not `[N, ...]`, hold non-finite values or differ in
            size, fewer than 3 examples of either kind, a `test_fraction` outside (0, 1), an
            unknown `classifier`, or a classifier that learned a zero weight vector.
    """
    from sklearn.model_selection import train_test_split

    concept_acts = _flat(concept_acts, "concept_acts")
    random_acts = _flat(random_acts, "random_acts")
    if concept_acts.shape[1] != random_acts.shape[1]:
        raise ValueError(
            f"concept and random activations differ in size: {concept_acts.shape[1]} vs "
            f"{random_acts.shape[1]}."
        )
    if min(len(concept_acts), len(random_acts)) < 3:
        raise ValueError("a CAV needs at least 3 concept and 3 random examples.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    seed = host_seed(key)
    inputs = np.concatenate([concept_acts, random_acts]).astype(np.float64)
    labels = np.concatenate([np.ones(len(concept_acts), int), np.zeros(len(random_acts), int)])
    x_train, x_test, y_train, y_test = train_test_split(
        inputs, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    model = _linear_classifier(classifier, seed)
    model.fit(x_train, y_train)
    accuracy = float(np.mean(model.predict(x_test) == y_test))
    # scikit-learn's binary coefficient points toward class 1, the concept.
    normal = jnp.asarray(model.coef_[0], jnp.float32)
    norm = jnp.linalg.norm(normal)
    if not bool(norm > 0):
        raise ValueError("the linear classifier learned a zero weight vector: no CAV.")
    return normal / norm, accuracy


def directional_derivatives(
    features: Features, head: Head, x, target: int, cav, *, batch_size: int | None = None
) -> jax.Array:
    """`[N]`: d logit_target / d activations at `features(x)`, dotted with `cav [D]`.

    The gradient is taken per example (vmap), so the head may mix nothing across the batch.

    Args:
        features: `features(x) -> activations [B, ...]`, the model up to the layer.
        head: `head(activations) -> logits [B, K]`, the rest of the model.
        x: `[N, ...]` inputs.
        target: the class whose logit is differentiated, in [0, K).
        cav: `[D]`, a concept activation vector of the layer (D activations per example).
        batch_size: bounds how many inputs go through the model at once (None: all).

    Returns:
        `[N]` float array of directional derivatives.

    Raises:
        TypeError: `features` or `head` is not callable.
        ValueError: `cav` is not a vector or does not match the layer's size, `x` is an empty
            batch, the head does not return `[B, K]` logits, `target` is out of range, or
            `batch_size` is not positive.
    """
    cav = jnp.asarray(cav)
    if cav.ndim != 1:
        raise ValueError(f"cav must be a vector [D], got shape {cav.shape}.")
    grads = _target_gradients(features, head, x, target, cav.shape[0], batch_size)
    return grads @ cav.astype(grads.dtype)


def tcav_score(
    features: Features, head: Head, x, target: int, cav, *, batch_size: int | None = None
) -> float:
    """Fraction of inputs `x [N, ...]` whose target logit increases along `cav [D]`.

    Args:
        features: `features(x) -> activations [B, ...]`, the model up to the layer.
        head: `head(activations) -> logits [B, K]`, the rest of the model.
        x: `[N, ...]` inputs.
        target: the class whose logit is differentiated, in [0, K).
        cav: `[D]`, a concept activation vector of the layer.
        batch_size: bounds how many inputs go through the model at once (None: all).

    Returns:
        The TCAV score, a float in [0, 1].

    Raises:
        TypeError, ValueError: as for `directional_derivatives`.
    """
    derivatives = directional_derivatives(features, head, x, target, cav, batch_size=batch_size)
    return float(_positive_fraction(derivatives))


def tcav(
    features: Features, head: Head, x, target: int, concept_images,
    random_image_sets: Sequence, *, key, num_runs: int | None = None,
    alpha: float = 0.05, classifier: str = "sgd", batch_size: int | None = None,
) -> TCAVResult:
    """TCAV of one concept for class `target`, with a random-vs-random null.

    Run r trains the concept against one random set (`num_runs` distinct sets, chosen with
    `key`; default all of them) and, for the null, one random set against another. A two-sided
    t-test of the concept's scores against the null's gives the p-value; the result is
    significant when `p < alpha`.

    Args:
        features: `features(x) -> activations [B, ...]`, the model up to the layer.
        head: `head(activations) -> logits [B, K]`, the rest of the model.
        x: `[N, ...]` inputs of the target class.
        target: the class tested, in [0, K).
        concept_images: `[Nc, ...]` examples of the concept.
        random_image_sets: a list of `[Nr_i, ...]` arrays (at least 2).
        key: PRNG key (or int seed) choosing the random sets and seeding the classifiers.
        num_runs: how many concept CAVs, in [2, len(random_image_sets)]; None for all sets.
        alpha: the significance level, in (0, 1).
        classifier: `"sgd"` or `"logistic"` (see `concept_activation_vector`).
        batch_size: bounds how many inputs go through the model at once (None: all).

    Returns:
        `TCAVResult` with `[R]` scores, null scores and accuracies, `[R, D]` CAVs, their mean and
        std, the p-value and whether it is significant (R = `num_runs`).

    Raises:
        TypeError: `features` or `head` is not callable.
        ValueError: fewer than 2 random sets, `num_runs` or `alpha` out of range, or inputs,
            activations, target or classifier that `concept_activation_vector` or
            `directional_derivatives` refuse.
    """
    from scipy.stats import ttest_ind

    if len(random_image_sets) < 2:
        raise ValueError("tcav needs at least 2 random image sets (for the null).")
    num_runs = len(random_image_sets) if num_runs is None else int(num_runs)
    if not 2 <= num_runs <= len(random_image_sets):
        raise ValueError(
            f"num_runs must lie in [2, {len(random_image_sets)}] (one random set per run, "
            f"at least 2 runs for the t-test), got {num_runs}."
        )
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")
    key_sets, key_bits = jax.random.split(as_key(key))
    count = len(random_image_sets)
    chosen = np.asarray(jax.random.permutation(key_sets, count))[:num_runs]
    bits = np.asarray(jax.random.bits(key_bits, (3, num_runs), jnp.uint32)).astype(np.int64)
    seeds = bits[:2] % 2**31  # scikit-learn seeds of the concept and null classifiers
    # A null pair (a, b), a != b: random set a plays the concept, b the random counterpart.
    shift = 1 + bits[2] % (count - 1)

    def acts(images):
        images = jnp.asarray(images)
        return _map_batches(lambda chunk: _flat_jax(features(chunk)), images, batch_size)

    concept_acts = acts(concept_images)
    random_acts = [acts(images) for images in random_image_sets]
    # The gradient does not depend on the CAV: one pass over x serves every run.
    grads = _target_gradients(features, head, x, target, concept_acts.shape[1], batch_size)
    scores, null_scores, accuracies, cavs = [], [], [], []
    for run, index in enumerate(chosen):
        cav, accuracy = concept_activation_vector(
            concept_acts, random_acts[index], key=int(seeds[0, run]), classifier=classifier
        )
        null_cav, _ = concept_activation_vector(
            random_acts[index], random_acts[(index + shift[run]) % count],
            key=int(seeds[1, run]), classifier=classifier,
        )
        scores.append(float(_positive_fraction(grads @ cav)))
        null_scores.append(float(_positive_fraction(grads @ null_cav)))
        accuracies.append(accuracy)
        cavs.append(np.asarray(cav))
    scores, null_scores = np.asarray(scores), np.asarray(null_scores)
    with warnings.catch_warnings():  # constant scores (e.g. all 1) trip a precision warning
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(ttest_ind(scores, null_scores).pvalue)
    return TCAVResult(
        scores=scores, null_scores=null_scores, accuracies=np.asarray(accuracies),
        cavs=np.stack(cavs), mean=float(scores.mean()), std=float(scores.std()),
        p_value=p_value, significant=bool(p_value < alpha),
    )


def background_tcav(
    module, variables, data: SpuriousData, backgrounds: Sequence[np.ndarray],
    background_names: Sequence[str], class_names: Sequence[str], random_images, *,
    layers: Sequence[str], concept_images: int = 100, random_sets: int = 10,
    inputs_per_class: int = 100, alpha: float = 0.05, control: bool = True, key,
) -> dict:
    """TCAV of each spurious background (crops of it alone) for each class of a spurious model.

    Args:
        module, variables: the model trained on `data`'s kind of images, a layered linen module
            (`jfail.models.layers`) and its variables.
        data: spurious test data (class `c` mostly on background `c`).
        backgrounds: the textures `data` was composited on, `[Hb, Wb]` each, named
            `background_names`; class_names: the classes' names, in label order.
        random_images: `[N, H, W, 1]` data-set images (any class): random concepts are
            `random_sets` sets of `concept_images` of them composited onto crops of the textures of
            `jfail.debugtests.BACKGROUNDS` that `data` does not use.
        layers: where to split the model, among its layers but the last.
        concept_images: crops per background concept (at least 10); inputs_per_class: `data`'s
            inputs of each class scored; alpha: the t-test's level (random-vs-random CAVs are the
            null); control: also on the architecture re-initialized (model contamination).
        key: PRNG key.

    Returns:
        A dict of plain values: `concept_images`, `random_sets`, `random_textures`, `alpha`, and
        `rows`, one per (model, layer, concept, class) with the TCAV score (mean and std over the
        concept-vs-random CAVs), the null's mean, the p-value, significance, the CAVs' accuracy
        and every run's scores; or `{"skipped": why}` when the model cannot be split at `layers`.

    Raises:
        RuntimeError: a split does not reproduce the model's logits.
    """
    if not is_layered(module):
        return {"skipped": f"TCAV splits a model by layer, and a {type(module).__name__} is not "
                           "laid out as layers"}
    layers = tuple(layers)
    known = layer_names(module)[:-1]
    if not layers or set(layers) - set(known):
        return {"skipped": f"tcav_layers {list(layers)} must be among {list(known)}"}
    names = list(background_names)
    size = data.images.shape[1:3]
    count = max(10, int(concept_images))
    concepts = {name: background_only([backgrounds[i]], count, size,
                                      key=jax.random.fold_in(key, i))[0]
                for i, name in enumerate(names)}
    others = tuple(b for b in BACKGROUNDS if b not in names)
    other_images = load_backgrounds(others)
    random_concepts = []
    for r in range(max(2, int(random_sets))):
        k_pick, k_id, k_crop = jax.random.split(jax.random.fold_in(key, 100 + r), 3)
        rows = np.asarray(jax.random.choice(k_pick, len(random_images), (count,),
                                            replace=len(random_images) < count))
        ids = np.asarray(jax.random.randint(k_id, (count,), 0, len(others)))
        random_concepts.append(spurious_backgrounds(random_images[rows], ids, other_images,
                                                    key=k_crop).images)
    models = {"spurious": variables}
    if control:
        fresh, _ = init_classifier(module, data.images.shape[1:], jax.random.fold_in(key, 999))
        models["re-initialized"] = {"params": fresh}
    inputs = {c: data.images[data.labels == c][: max(1, int(inputs_per_class))]
              for c in range(len(class_names))}
    rows = []
    for model_name, model_variables in models.items():
        logits = np.asarray(logits_fn(module, model_variables)(data.images[:4]))
        for layer in layers:
            features, head = split_at(module, model_variables, layer)
            if not np.allclose(np.asarray(head(features(data.images[:4]))), logits,
                               rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"the split at {layer} does not reproduce the model's logits")
            for concept in names:
                for c, class_name in enumerate(class_names):
                    if not len(inputs[c]):
                        continue
                    result = tcav(features, head, inputs[c], c, concepts[concept],
                                  random_concepts, key=jax.random.fold_in(key, 1000),
                                  alpha=alpha, batch_size=256)
                    rows.append({
                        "model": model_name, "layer": layer, "concept": concept,
                        "target": class_name, "own_background": concept == names[c],
                        "inputs": int(len(inputs[c])), "score": float(result.mean),
                        "score_std": float(result.std),
                        "null_score": float(np.mean(result.null_scores)),
                        "p_value": result.p_value, "significant": result.significant,
                        "cav_accuracy": float(np.mean(result.accuracies)),
                        "scores": result.scores.tolist(),
                        "null_scores": result.null_scores.tolist()})
    return {"concept_images": count, "random_sets": len(random_concepts),
            "random_textures": list(others), "alpha": alpha, "rows": rows}


def _target_gradients(features, head, x, target, dim, batch_size):
    """`[N, D]` gradients of the target logit with respect to the flattened activations."""
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [N, ...], got shape {x.shape}.")
    target = _checked_target(head, features, x, target, dim)
    features = _traced(features, x[:1])
    acts = jax.eval_shape(features, x[:1])
    head = _traced(head, jax.ShapeDtypeStruct(acts.shape, acts.dtype))
    return _map_batches(
        lambda chunk: _batch_gradients(features, head, chunk, target), x, batch_size
    )


@jit(static_argnames="target")
def _batch_gradients(features, head, x, target):
    """`[B, D]` per-example gradients of one batch; features and head are `Partial`s."""

    def target_logit(one):
        return head(one[None])[0, target]

    return _flat_jax(jax.vmap(jax.grad(target_logit))(features(x)))


@jit
def _positive_fraction(derivatives):
    return jnp.mean(derivatives > 0)


def _checked_target(head, features, x, target, dim):
    """Check the activation size and the target index against shapes (no computation)."""
    acts = jax.eval_shape(features, jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype))
    size = int(np.prod(acts.shape[1:]))
    if size != dim:
        raise ValueError(f"cav has {dim} entries but the layer has {size} activations.")
    logits = jax.eval_shape(head, jax.ShapeDtypeStruct(acts.shape, acts.dtype))
    if len(logits.shape) != 2:
        raise ValueError(f"head must return logits [B, K], got shape {logits.shape}.")
    if not isinstance(target, (int, np.integer)) or not 0 <= target < logits.shape[1]:
        raise ValueError(f"target must be a class index in [0, {logits.shape[1]}), got {target!r}.")
    return int(target)


def _linear_classifier(name, seed):
    """TCAV's linear models: SGD on the hinge loss (its default settings) or logistic regression."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    if name == "sgd":
        return SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=seed)
    if name == "logistic":
        return LogisticRegression(max_iter=1000, random_state=seed)
    raise ValueError(f"classifier must be 'sgd' or 'logistic', got {name!r}.")


def _traced(fn, example):
    """`fn` as a `jax.jit` argument whose weights (every array it reads now) are traced, not
    baked in as constants (`jfail.models.adapter.traced_model`)."""
    if not callable(fn):
        raise TypeError(f"expected a callable model, got {type(fn).__name__}.")
    if in_trace(fn, example):
        return fn
    return traced_model(fn, example)


def _map_batches(fn, x, batch_size):
    """`fn` over `x` in chunks of `batch_size` along axis 0 (all at once if None)."""
    if batch_size is None or batch_size >= x.shape[0]:
        return fn(x)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return jnp.concatenate([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _flat(acts, name):
    acts = np.asarray(acts)
    if acts.ndim < 2:
        raise ValueError(f"{name} must be activations [N, ...], got shape {acts.shape}.")
    if not np.all(np.isfinite(acts)):
        raise ValueError(f"{name} contains non-finite values.")
    return acts.reshape(acts.shape[0], -1)


def _flat_jax(acts):
    return acts.reshape(acts.shape[0], -1)
