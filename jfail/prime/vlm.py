"""Image-text embedders and a zero-shot vision-language tagger.

The paper tags images with the Recognize Anything Model and measures description quality with
CLIP similarities (section 4.3). Neither can be downloaded here, so both sit behind a small
interface, :class:`ImageTextEmbedder`:

- :class:`TransformersClipEmbedder` wraps a Hugging Face `transformers` CLIP model (optional
  dependency: `pip install transformers torch`); load pretrained weights with
  :meth:`TransformersClipEmbedder.from_pretrained` from a local directory or the hub.
- :class:`CallableEmbedder` wraps any pair of functions, e.g. an open_clip model's
  `encode_image` / `encode_text` behind its own preprocessing, or a JAX CLIP.
- :class:`TagSpaceEmbedder` embeds images by ground-truth attributes and texts by the
  attribute names they mention: where no real vision-language model exists, it scores
  descriptions against planted ground truth with the same metrics.

:class:`ZeroShotTagger` turns any embedder into a :class:`~jfail.prime.tags.Tagger`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jfail.prime.tags import TagMatrix

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CallableEmbedder",
    "ImageTextEmbedder",
    "TagSpaceEmbedder",
    "TransformersClipEmbedder",
    "ZeroShotTagger",
    "normalize_rows",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class ImageTextEmbedder(Protocol):
    """A shared image-text space: both methods return unit-norm rows.

    embed_images(images [N, H, W, C] in [0, 1]) -> [N, D]; embed_texts(texts) -> [M, D].
    """

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Embed images.

        Args:
          images: `[N, H, W, C]` in [0, 1].

        Returns:
          `[N, D]` float, unit-norm rows.
        """
        ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Args:
          texts: M strings.

        Returns:
          `[M, D]` float, unit-norm rows.
        """
        ...


def normalize_rows(vectors) -> np.ndarray:
    """[N, D] -> rows scaled to unit norm (zero rows stay zero).

    Args:
      vectors: `[N, D]` numbers (any leading shape; the last axis is normalized).

    Returns:
      float32 array shaped like `vectors`.
    """
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclasses.dataclass(frozen=True)
class CallableEmbedder:
    """An embedder from two functions: image_fn([N, H, W, C]) -> [N, D], text_fn(list) -> [M, D]."""

    image_fn: Callable[[np.ndarray], Any]
    text_fn: Callable[[list[str]], Any]

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """`image_fn(images)`, rows normalized.

        Args:
          images: `[N, H, W, C]`, passed to `image_fn` as they are.

        Returns:
          `[N, D]` float32, unit-norm rows.
        """
        return normalize_rows(np.asarray(self.image_fn(images)))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """`text_fn(list(texts))`, rows normalized.

        Args:
          texts: M strings.

        Returns:
          `[M, D]` float32, unit-norm rows.
        """
        return normalize_rows(np.asarray(self.text_fn(list(texts))))


class TransformersClipEmbedder:
    """A `transformers` CLIPModel as an image-text embedder (PyTorch, eval mode, no gradients).

    model: a `transformers.CLIPModel`; tokenizer: a callable like the Hugging Face tokenizers
    (`tokenizer(texts, padding=True, return_tensors="pt")`). Images are made RGB (grey is
    repeated), resized bilinearly to the model's image size and normalized with `mean`/`std`.
    """

    def __init__(self, model, tokenizer, *, mean=CLIP_MEAN, std=CLIP_STD, batch_size: int = 64,
                 device: str = "cpu"):
        import torch  # the optional dependency, imported only when used

        self._torch = torch
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.batch_size = batch_size
        self.device = device

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> TransformersClipEmbedder:
        """Load a CLIP checkpoint (a local directory, or a hub name where there is a network).

        Args:
          name_or_path: a local checkpoint directory or a Hugging Face hub name.
          **kwargs: `mean`, `std`, `batch_size` and `device`, as for the constructor.

        Returns:
          A `TransformersClipEmbedder` over the loaded model and tokenizer.

        Raises:
          ImportError: `transformers` or `torch` is not installed.
          OSError: the checkpoint cannot be found or loaded (from `transformers`).
        """
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as error:
            raise ImportError("the CLIP embedder needs `pip install transformers torch`") from error
        return cls(CLIPModel.from_pretrained(name_or_path),
                   AutoTokenizer.from_pretrained(name_or_path), **kwargs)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """The model's image features, `batch_size` images per forward pass.

        Args:
          images: `[N, H, W, C]` in [0, 1], C 1 (grey) or 3 (RGB).

        Returns:
          `[N, D]` float32, unit-norm rows (`[0, 0]` when N is 0).

        Raises:
          ValueError: `images` is not `[N, H, W, 1 or 3]`.
        """
        torch = self._torch
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
        outputs = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = torch.from_numpy(images[start : start + self.batch_size]).to(self.device)
                batch = batch.permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
                batch = torch.nn.functional.interpolate(
                    batch, size=(self.image_size, self.image_size), mode="bilinear",
                    align_corners=False,
                )
                features = self.model.get_image_features(
                    pixel_values=(batch - self.mean) / self.std
                )
                outputs.append(_features(features).cpu().numpy())
        return normalize_rows(np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The model's text features, `batch_size` texts per forward pass.

        Args:
          texts: M strings, tokenized with padding.

        Returns:
          `[M, D]` float32, unit-norm rows (`[0, 0]` when M is 0).
        """
        torch = self._torch
        outputs = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                encoded = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True,
                                         return_tensors="pt")
                encoded = {k: v.to(self.device) for k, v in encoded.items()
                           if k in ("input_ids", "attention_mask")}
                outputs.append(_features(self.model.get_text_features(**encoded)).cpu().numpy())
        return normalize_rows(np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32))


@dataclasses.dataclass(frozen=True)
class TagSpaceEmbedder:
    """Ground truth as an image-text space: an image is its normalized attribute vector, a text is
    the normalized indicator of the attribute names it mentions (whole words, case-insensitive).

    attributes: TagMatrix of the true attributes of every image; `embed_images` takes row indices
    into it (an [N] int array), since the attributes, not the pixels, are what is known.
    """

    attributes: TagMatrix

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """The attribute vectors of the images, normalized.

        Args:
          images: `[N]` int row indices into `attributes` (not pixels).

        Returns:
          `[N, T]` float32, unit-norm rows (zero for an image with no attribute).

        Raises:
          ValueError: `images` is not a 1-D integer array.
          IndexError: an index is out of range of `attributes`.
        """
        rows = np.asarray(images)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(
                "TagSpaceEmbedder.embed_images takes [N] row indices of the attributes"
            )
        return normalize_rows(self.attributes.tags[rows].astype(np.float32))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Which attribute names each text mentions, as whole words, ignoring case.

        Args:
          texts: M strings.

        Returns:
          `[M, T]` float32, unit-norm rows (zero for a text that names no attribute).
        """
        patterns = [re.compile(r"(?<![\w-])" + re.escape(name.lower()) + r"(?![\w-])")
                    for name in self.attributes.names]
        vectors = np.array([[bool(p.search(text.lower())) for p in patterns] for text in texts],
                           np.float32).reshape(len(texts), len(patterns))
        return normalize_rows(vectors)


@dataclasses.dataclass(frozen=True)
class ZeroShotTagger:
    """Tags from image-text similarity: tag t is on when sim(x, template(t)) exceeds
    sim(x, neutral) by more than `margin`.

    embedder: any ImageTextEmbedder; vocabulary: the tag names; template: how a tag is phrased.
    """

    embedder: ImageTextEmbedder
    vocabulary: tuple[str, ...]
    template: str = "a photo of something {}."
    neutral: str = "a photo of something."
    margin: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        """The T tag names: the vocabulary, in order."""
        return tuple(self.vocabulary)

    def scores(self, images: np.ndarray) -> np.ndarray:
        """[N, T] similarity of each image to each tag's prompt minus its similarity to neutral.

        Args:
          images: what the embedder's `embed_images` takes, N of them.

        Returns:
          `[N, T]` float, columns in the vocabulary's order.

        Raises:
          ValueError: the vocabulary is empty.
        """
        if not self.vocabulary:
            raise ValueError("the vocabulary is empty")
        prompts = [self.template.format(tag) for tag in self.vocabulary] + [self.neutral]
        texts = self.embedder.embed_texts(prompts)
        similarity = self.embedder.embed_images(images) @ texts.T
        return similarity[:, :-1] - similarity[:, -1:]

    def tag(self, images: np.ndarray, labels: np.ndarray | None = None) -> TagMatrix:
        """Tags on where `scores` exceeds `margin`.

        Args:
          images: what the embedder's `embed_images` takes, N of them.
          labels: ignored; zero-shot tags do not depend on the class.

        Returns:
          A `TagMatrix` with `[N, T]` tags named by the vocabulary.

        Raises:
          ValueError: the vocabulary is empty.
        """
        del labels  # zero-shot tags do not depend on the class
        return TagMatrix(self.scores(images) > self.margin, self.names)


def _features(output):
    """`get_*_features` returns a tensor (transformers 4) or an output with `pooler_output` (5)."""
    if hasattr(output, "cpu") and not hasattr(output, "pooler_output"):
        return output
    return output.pooler_output
