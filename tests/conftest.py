"""Test configuration: float64 for exactness, and JAX's strict modes (rank promotion
raises; dtype promotion strict, per test) so that silent broadcasting or dtype promotion
inside funcnet fails loudly."""

import os
import sys
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings

# the shared helpers (exactness, strategies, scripts) import by name from every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scripts import FAST_COMPILE  # noqa: E402

# Cheaper XLA compiles for every test and every process a test starts (they inherit the
# environment): LLVM's cheap pipeline, about a quarter off the suite's time, most of which
# is compiling. Set before the first computation starts the backend. The tests assert
# values, shapes and the structure of compiled programs (FLOPs, memory), never timings.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "funcnet",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    print_blob=True,
)
settings.load_profile("funcnet")


@pytest.fixture(autouse=True)
def _strict_dtype_promotion(request):
    """Strict dtype promotion for funcnet's own code; tests that drive optax (which
    promotes Python floats against int32 step counts) opt out with
    ``@pytest.mark.standard_promotion``."""
    if request.node.get_closest_marker("standard_promotion"):
        yield
        return
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture
def key():
    return jax.random.key(0)
