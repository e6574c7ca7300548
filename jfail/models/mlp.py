"""A fully connected classifier: flatten, Dense + ReLU per hidden width, a linear classifier."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn

from jfail.models.cnn import select_output

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, `Dense(width) + ReLU` for each of `hidden`, then `Dense(num_classes)`.

    `__call__(x: [B, H, W, C], train=False, output='logits')`: `output` is `logits` `[B, K]`,
    `features` (the last hidden layer, `[B, hidden[-1]]`) or `taps` (a dict of both). There is
    no convolution, hence no `feature_map` tap.
    """

    num_classes: int = 10
    hidden: Sequence[int] = (512, 256)

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        del train  # no dropout or normalization
        h = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, name=f"dense{i}")(h))
        logits = nn.Dense(self.num_classes, name="classifier")(h)
        return select_output(output, logits=logits, features=h)
