"""The tiny model and source of tests/test_engine.py, and its subprocess entry points.

    python tests/engine_script.py run OUT BATCH_SIZE BLOCK_FROM
    python tests/engine_script.py distributed OUT PORT PROCESS_ID

`run` maps the model over the toy source into OUT in batches of BATCH_SIZE; the source stops
(sleeps) at examples BLOCK_FROM up to the last but one, so the run never ends and the test can
kill it mid-way. `distributed` is one
of two processes with two simulated CPU devices each, joined through a coordinator on
localhost:PORT, mapping the same model over the same source; it writes the indices it read to
OUT.reads-PROCESS_ID.json.
"""

import json
import os
import sys
import time

NUM_EXAMPLES = 27
BATCH_SIZE = 8


def toy_source(block_from=None, reads=None):
    """27 random 8x8x1 images; with `reads` (a list) every index read is appended to it."""
    import numpy as np

    from jfail.data import ArraySource

    rng = np.random.default_rng(11)
    images = rng.random((NUM_EXAMPLES, 8, 8, 1), dtype=np.float32)
    labels = np.arange(NUM_EXAMPLES) % 3
    if reads is not None:

        class Recorded(ArraySource):
            def __getitem__(self, index):
                reads.append(int(index))
                return super().__getitem__(index)

        return Recorded(images, labels, ("a", "b", "c"), "toy")
    if block_from is None:
        return ArraySource(images, labels, ("a", "b", "c"), "toy")

    class Blocking(ArraySource):
        def __getitem__(self, index):
            if block_from <= index < NUM_EXAMPLES - 1:  # the last one is read for a fingerprint
                time.sleep(600)
            return super().__getitem__(index)

    return Blocking(images, labels, ("a", "b", "c"), "toy")


def tiny_model(images):
    """A two-layer net with fixed weights: logits [B, 3], features [B, 4], pixel sums [B]."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(3)
    w1 = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    flat = images.reshape(images.shape[0], -1)
    features = jnp.tanh(flat @ w1)
    return {"logits": features @ w2, "features": features, "brightness": flat.sum(axis=1)}


def main():
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "distributed":
        port, process_id = sys.argv[3], int(sys.argv[4])
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from jfail.engine import initialize_distributed

        assert initialize_distributed(f"localhost:{port}", 2, process_id) == (process_id, 2)
        assert jax.device_count() == 4
        reads = []
        source, batch_size = toy_source(reads=reads), BATCH_SIZE
    else:
        process_id, reads = None, None
        source, batch_size = toy_source(block_from=int(sys.argv[4])), int(sys.argv[3])
    from jfail.engine import map_dataset

    map_dataset(tiny_model, source, out, batch_size=batch_size, prefetch=1, num_threads=2,
                progress=False)
    if reads is not None:
        with open(f"{out}.reads-{process_id}.json", "w") as handle:
            json.dump(sorted(set(reads)), handle)


if __name__ == "__main__":
    main()
