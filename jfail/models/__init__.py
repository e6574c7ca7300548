"""Flax models with feature taps, and the callables jfail's algorithms take."""

from jfail.models.adapter import ModelCallError, as_model, in_trace, traced_model
from jfail.models.callables import (
    ModelFns,
    as_callable,
    decoder_fn,
    encoder_fn,
    linen_apply,
    linen_model,
    logits_fn,
    model_fns,
    stateless_apply,
)
from jfail.models.cnn import BetaVAE, DefuseCNN, VAEDecoder, VAEEncoder
from jfail.models.convert import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalizer,
    load_robustness_checkpoint,
    load_torchvision_resnet,
    normalized_model_fns,
    resnet_variables_from_torch,
)
from jfail.models.layers import is_layered, layer_names, layer_span, split_at
from jfail.models.mlp import MLP
from jfail.models.registry import MODEL_NAMES, build_classifier, init_classifier
from jfail.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from jfail.models.user import UserModel, UserModelError, load_user_model

__all__ = [
    "BasicBlock",
    "BetaVAE",
    "Bottleneck",
    "DefuseCNN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MLP",
    "MODEL_NAMES",
    "ModelCallError",
    "ModelFns",
    "Normalizer",
    "UserModel",
    "UserModelError",
    "ResNet",
    "VAEDecoder",
    "VAEEncoder",
    "as_callable",
    "as_model",
    "build_classifier",
    "decoder_fn",
    "encoder_fn",
    "in_trace",
    "init_classifier",
    "is_layered",
    "layer_names",
    "layer_span",
    "linen_apply",
    "linen_model",
    "load_robustness_checkpoint",
    "load_torchvision_resnet",
    "load_user_model",
    "logits_fn",
    "model_fns",
    "normalized_model_fns",
    "resnet18",
    "resnet50",
    "resnet_variables_from_torch",
    "split_at",
    "stateless_apply",
    "traced_model",
]
