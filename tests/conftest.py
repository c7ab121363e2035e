"""Session-wide JAX settings for the test suite.

float64 is switched on for the whole session so that gradient checks can be tight (~1e-12);
tests of float32 behaviour pass explicit ``float32`` dtypes.

Equinox-style strictness is applied where it does not fight the code under test: JAX's
``jax_numpy_dtype_promotion="strict"`` breaks inside optax (``1 - decay**count`` mixes a Python
float with an int32 step count) and ``jax_numpy_rank_promotion="raise"`` forbids the
``(batch, out) + (out,)`` bias broadcast every dense layer relies on, so neither is set
globally; tests/test_layers.py and tests/test_losses.py run the pure layer and loss code under
strict dtype promotion locally instead.
"""

import jax

jax.config.update("jax_enable_x64", True)
