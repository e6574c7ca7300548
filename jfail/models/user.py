"""A model of one's own, named on the command line as `package.module:function`.

    jfail barlow --config configs/barlow_fmnist.py --set model=my_models:classifier \\
        --set dataset=imagefolder:my_images

`function` takes no arguments and returns the model: a `UserModel`, a dict with the same keys, or
the classifier callable alone. The module is imported from the current directory or
`PYTHONPATH`. Every callable is any JAX callable (`jfail.models.adapter`: closures, `Partial`,
Flax NNX and Equinox modules); its weights are read when jfail calls it.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["USER_VAL_FRACTION", "UserModel", "UserModelError", "check_user_model",
           "is_model_spec", "load_user_model", "user_dataset_name", "user_model_for_data"]

USER_VAL_FRACTION = 0.1
"""With a user's model, the "val" split is this stratified share of the data set's training split
(drawn with the config's seed): jfail does not know which images the model was fitted on."""

_SPEC = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
                   r":(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")


class UserModelError(ValueError):
    """A `model=package.module:function` that cannot be used: the message says what and how to
    fix it."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class UserModel:
    """What a `package.module:function` named by `model=` returns.

    Attributes:
      classifier: `classifier(x: [B, H, W, C] in [0, 1]) -> logits [B, K]`, in inference mode.
      features: `features(x) -> [B, D]`, e.g. the penultimate layer: the features Barlow explains
        errors with (robust features, as the paper, when the model is robust). Barlow needs it.
      encoder, decoder: `encoder(x) -> (mu [B, Z], logvar [B, Z])` and `decoder(z: [B, Z]) ->
        images [B, H, W, C]` in [0, 1], a generative model of the data: Defuse searches its
        latent space for failures. Without both, Defuse trains a β-VAE on the data into its run
        directory. Defuse also fine-tunes the classifier, so there it must hold its weights as a
        pytree (`jax.tree_util.Partial(apply, params)`, a Flax NNX or Equinox module).
      image_size: the side S the model takes (S x S images): an image folder is resized to it
        unless its name says `@S` itself. None: the data's own size.
      num_classes: K; checked against the classifier's output and the data's classes.

    Example, in `my_models.py` in the current directory:

        import jax, jax.numpy as jnp
        from jfail.models.user import UserModel

        def classifier():
            weights = jnp.load("weights.npy")              # [28 * 28, 10]
            def model(x):                                   # [B, 28, 28, 1] -> [B, 10]
                return x.reshape(len(x), -1) @ weights
            return UserModel(classifier=model, features=lambda x: x.reshape(len(x), -1),
                             image_size=28, num_classes=10)

    then `--set model=my_models:classifier`.
    """

    classifier: Callable
    features: Callable | None = None
    encoder: Callable | None = None
    decoder: Callable | None = None
    image_size: int | None = None
    num_classes: int | None = None


def is_model_spec(spec: str) -> bool:
    """Whether `spec` has the form `package.module:function` (nothing is imported)."""
    return isinstance(spec, str) and _SPEC.match(spec.strip()) is not None


def load_user_model(spec: str) -> UserModel:
    """Import `package.module:function`, call `function()`, check what it returned.

    The current directory is searched first, as `python -m` does, then `sys.path`.

    Returns:
      A `UserModel` (a dict or a bare classifier callable is wrapped into one).

    Raises:
      UserModelError: a malformed spec, a module that cannot be found or fails on import, a
        missing attribute, one that is not callable, a call that fails, or a return value that is
        not a model.
    """
    where = f"model={spec}"
    match = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise UserModelError(f"{where}: must look like package.module:function (a function of no "
                             "arguments that returns the model), e.g. my_models:classifier")
    module_name, attr = match["module"], match["attr"]
    module = _import(module_name, where)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            names = sorted(n for n in dir(module) if not n.startswith("_")
                           and callable(getattr(module, n)))
            raise UserModelError(
                f"{where}: module {module_name} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {attr!r}; its callables: {', '.join(names) or 'none'}")
        target = getattr(target, part)
    if not callable(target):
        raise UserModelError(f"{where}: {attr} is of type {type(target).__name__}, not a "
                             "function; name a function of no arguments that returns the model")
    try:
        returned = target()
    except TypeError as error:
        if "argument" in str(error):
            raise UserModelError(
                f"{where}: calling {attr}() failed ({error}); name a function of no arguments "
                "that returns the model (model(x) -> logits), not the model itself") from error
        raise UserModelError(f"{where}: {attr}() failed with TypeError: {error}") from error
    except Exception as error:  # noqa: BLE001 - the user's code: any failure is one line
        raise UserModelError(f"{where}: {attr}() failed with {type(error).__name__}: "
                             f"{_first_line(error)}") from error
    return _as_user_model(returned, where)


def check_user_model(user: UserModel, image_shape: tuple[int, ...] | None, *,
                     num_classes: int | None = None, needs: tuple[str, ...] = (),
                     where: str = "model") -> None:
    """Check `user` on images of `image_shape` (`jax.eval_shape`: nothing is computed).

    Args:
      user: the model.
      image_shape: `(H, W, C)` of the data, or None when unknown until the data is read (then
        only `needs` is checked).
      num_classes: the data's number of classes, if known.
      needs: the fields the method needs besides the classifier, e.g. `("features",)`.
      where: how the error names the model.

    Raises:
      UserModelError: a needed field is missing, a callable cannot be called on `[2, *shape]`
        images, the classifier's output is not `[2, K]` with K the data's (and the model's stated)
        number of classes, or the features are not `[2, D]`.
    """
    import jax
    import numpy as np

    from jfail.models.adapter import ModelCallError, call_shape

    if "trainable" in needs:
        from jfail.train.trainable import trainable

        try:
            trainable(user.classifier)
        except TypeError as error:
            raise UserModelError(
                f"{where}: this method fine-tunes the classifier, whose weights jfail cannot find "
                f"({error}); return it as a pytree that holds them: "
                "jax.tree_util.Partial(apply, params), a Flax NNX or an Equinox module") from error
    if (user.encoder is None) != (user.decoder is None):
        raise UserModelError(f"{where}: give both encoder and decoder, or neither")
    for name in needs:
        if name == "trainable":
            continue
        if getattr(user, name) is None:
            raise UserModelError(f"{where}: this method needs the model's {name}; return "
                                 f"UserModel(classifier=..., {name}=...) "
                                 f"(jfail.models.user.UserModel)")
    if image_shape is None:
        return
    example = jax.ShapeDtypeStruct((2, *image_shape), np.float32)
    outputs = {}
    for name in ("classifier", "features"):
        if getattr(user, name) is None:
            continue
        try:
            outputs[name] = call_shape(getattr(user, name), example)
        except ModelCallError as error:
            raise UserModelError(f"{where}: its {name} cannot be called on the data's images "
                                 f"[B, {', '.join(map(str, image_shape))}]: {error}") from error
        shape = getattr(outputs[name], "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != 2:
            what = "logits [B, K]" if name == "classifier" else "features [B, D]"
            raise UserModelError(f"{where}: its {name} must return {what}; on [2, "
                                 f"{', '.join(map(str, image_shape))}] images it returned "
                                 f"{_describe(outputs[name])}")
    if user.encoder is not None:
        _check_autoencoder(user, example, image_shape, where)
    classes = outputs["classifier"].shape[1]
    if user.num_classes is not None and classes != user.num_classes:
        raise UserModelError(f"{where}: num_classes is {user.num_classes} but the classifier "
                             f"returns {classes} logits")
    if num_classes is not None and classes != num_classes:
        raise UserModelError(f"{where}: the classifier returns {classes} logits but the data has "
                             f"{num_classes} classes")


def user_dataset_name(dataset: str, user: UserModel) -> str:
    """`dataset` as the model reads it: an image folder whose name gives no `@S` is resized to
    the model's `image_size` (when it states one); other names are returned as they are."""
    from jfail.data import image_folder_name_parts, is_image_folder_name

    if user.image_size is None or not is_image_folder_name(dataset):
        return dataset
    path, size, percent = image_folder_name_parts(dataset)
    if size is not None:
        return dataset
    return f"imagefolder:{path}@{user.image_size}" + (f"[:{percent:g}%]" if percent else "")


def user_model_for_data(spec: str, dataset: str, *, needs: tuple[str, ...] = ()
                        ) -> tuple[UserModel, str]:
    """`load_user_model(spec)` checked on the images of `dataset` (read from file headers, not
    loaded); returns the model and the data set name to load (`user_dataset_name`).

    Raises:
      UserModelError: see `load_user_model` and `check_user_model`.
      ValueError: a data set name `jfail.data.check_dataset_name` refuses.
    """
    from jfail.data import dataset_image_shape

    user = load_user_model(spec)
    name = user_dataset_name(dataset, user)
    check_user_model(user, dataset_image_shape(name), num_classes=_num_classes(name),
                     needs=needs, where=f"model={spec}")
    return user, name


# --------------------------------------------------------------------------------------------
# Private helpers.


def _import(module_name: str, where: str):
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    importlib.invalidate_caches()  # a module written since the interpreter started
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise UserModelError(
                f"{where}: no module named {error.name!r} in the current directory ({here}) or on "
                "PYTHONPATH; run jfail from the folder that holds it, or add that folder to "
                "PYTHONPATH") from error
        raise UserModelError(f"{where}: importing {module_name} failed: {error}") from error
    except Exception as error:  # noqa: BLE001 - the user's code: any failure is one line
        raise UserModelError(f"{where}: importing {module_name} failed with "
                             f"{type(error).__name__}: {_first_line(error)}") from error


def _as_user_model(returned: Any, where: str) -> UserModel:
    if isinstance(returned, dict):
        fields = {f.name for f in dataclasses.fields(UserModel)}
        unknown = sorted(set(map(str, returned)) - fields)
        if unknown or "classifier" not in returned:
            raise UserModelError(
                f"{where}: the returned dict needs the key 'classifier' and may have "
                f"{', '.join(sorted(fields - {'classifier'}))}; "
                + (f"unknown: {', '.join(unknown)}" if unknown else "'classifier' is missing"))
        returned = UserModel(**returned)
    elif not isinstance(returned, UserModel):
        if not callable(returned):
            raise UserModelError(
                f"{where}: returned an object of type {type(returned).__name__}; return the model "
                "callable model(x) -> logits, or UserModel(classifier=..., features=..., ...) "
                "(jfail.models.user.UserModel), or a dict with those keys")
        returned = UserModel(classifier=returned)
    for name in ("classifier", "features", "encoder", "decoder"):
        value = getattr(returned, name)
        if (value is not None or name == "classifier") and not callable(value):
            raise UserModelError(f"{where}: its {name} is of type {type(value).__name__}, not a "
                                 "callable")
    for name, least in (("image_size", 1), ("num_classes", 2)):
        value = getattr(returned, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < least):
            raise UserModelError(f"{where}: its {name} must be None or an integer >= {least}, "
                                 f"got {value!r}")
    return returned


def _check_autoencoder(user: UserModel, example, image_shape, where: str) -> None:
    import jax
    import numpy as np

    from jfail.models.adapter import ModelCallError, call_shape

    try:
        codes = call_shape(user.encoder, example)
    except ModelCallError as error:
        raise UserModelError(f"{where}: its encoder cannot be called on the data's images: "
                             f"{error}") from error
    shapes = [getattr(c, "shape", None) for c in codes] if isinstance(codes, (tuple, list)) else []
    if len(shapes) != 2 or any(s is None or len(s) != 2 or s[0] != 2 for s in shapes) \
            or shapes[0] != shapes[1]:
        raise UserModelError(f"{where}: its encoder must return (mu [B, Z], logvar [B, Z]); it "
                             f"returned {_describe(codes)}")
    try:
        images = call_shape(user.decoder, jax.ShapeDtypeStruct(tuple(shapes[0]), np.float32))
    except ModelCallError as error:
        raise UserModelError(f"{where}: its decoder cannot be called on its encoder's codes "
                             f"{tuple(shapes[0])}: {error}") from error
    if tuple(getattr(images, "shape", ())) != (2, *image_shape):
        raise UserModelError(f"{where}: its decoder must return images [B, "
                             f"{', '.join(map(str, image_shape))}]; it returned "
                             f"{_describe(images)}")


def _num_classes(dataset: str) -> int | None:
    from jfail.data import DATASET_NAMES, image_folder_name_parts, is_image_folder_name
    from jfail.data.sources import image_folder_classes

    if is_image_folder_name(dataset):
        return len(image_folder_classes(image_folder_name_parts(dataset)[0]))
    base = re.split(r"[@\[]", dataset, maxsplit=1)[0]
    return 10 if base in DATASET_NAMES else None


def _describe(output) -> str:
    shape = getattr(output, "shape", None)
    if shape is not None:
        return f"shape {tuple(shape)}"
    return f"a {type(output).__name__}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]
