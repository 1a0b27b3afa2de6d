"""Test configuration: float64 for exactness, and JAX's strict modes so that silent
broadcasting or dtype promotion inside funcnet fails loudly."""

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile(
    "funcnet",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    print_blob=True,
)
settings.load_profile("funcnet")


@pytest.fixture
def key():
    return jax.random.key(0)
