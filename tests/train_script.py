"""Run in a subprocess by tests/test_train.py: a small training run on scikit-learn's digits.

    python tests/train_script.py OUT.json [--checkpoint-dir D] [--kill-at-epoch K]

Writes the loss history and the final weights' checksums to OUT.json. With `--kill-at-epoch K`
the process SIGKILLs itself at the end of epoch K, before that epoch's checkpoint is written.
"""

import argparse
import json
import os
import signal

import jax
import numpy as np

from jfail.data import load, train_val_split
from jfail.models import DefuseCNN, init_classifier, linen_apply
from jfail.train import TrainConfig, fit

MODEL = DefuseCNN(num_classes=10, conv_features=(8, 8), hidden=(32,))
CONFIG = TrainConfig(optimizer="adam", learning_rate=3e-3, batch_size=20, epochs=4, seed=3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--kill-at-epoch", type=int)
    args = parser.parse_args()
    train, val = train_val_split(load("digits", "train"), 0.2, key=0)
    params, state = init_classifier(MODEL, train.images.shape[1:], jax.random.key(0))

    def on_epoch_end(epoch, record):
        if epoch == args.kill_at_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    result = fit(
        linen_apply(MODEL), params, state, train, val, CONFIG,
        checkpoint_dir=args.checkpoint_dir, progress=False, on_epoch_end=on_epoch_end,
    )
    leaves = jax.tree_util.tree_leaves(result.last.params)
    with open(args.out, "w") as f:
        json.dump(
            {
                "devices": jax.device_count(),
                "train_loss": [h["train_loss"] for h in result.history],
                "val_accuracy": [h["val_accuracy"] for h in result.history],
                "best_epoch": result.best_epoch,
                "weights": [np.asarray(x).astype(float).ravel().tolist() for x in leaves],
            },
            f,
        )


if __name__ == "__main__":
    main()
