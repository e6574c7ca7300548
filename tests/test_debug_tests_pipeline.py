"""The debugging-tests pipeline hands attribution methods models that share compiled programs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jfail import attribution
from jfail.models import DefuseCNN, init_classifier
from jfail.pipelines.debug_tests import _attributable

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def test_models_compile_once_whatever_the_placement_of_their_weights():
    """Freshly initialised weights are not committed to a device, trained ones are, and a
    cascading randomization mixes the two; jit compiles once per placement pattern unless the
    pipeline places every model the same way."""
    module = DefuseCNN(num_classes=3, conv_features=(4, 4), hidden=(8,))
    params, state = init_classifier(module, (12, 12, 1), jax.random.key(0))
    fresh = {"params": params, **state}
    trained = jax.device_put(fresh, jax.devices()[0])
    first = next(iter(params))
    mixed = {**trained, "params": {**trained["params"], first: fresh["params"][first]}}
    assert not jax.tree_util.tree_leaves(fresh)[0].committed
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 12, 12, 1)), jnp.float32)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            compiles.append(duration)

    expected = np.asarray(attribution.gradient(_attributable(module, fresh), x, 0))  # compiles
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        maps = [np.asarray(attribution.gradient(_attributable(module, variables), x, 0))
                for variables in (trained, mixed)]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    for got in maps:
        np.testing.assert_array_equal(got, expected)
