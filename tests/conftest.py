"""Shared fixtures: one real local Ray instance for the whole session."""
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance (no dashboard, to keep start-up short)."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO_ROOT}})
    yield ray
    ray.shutdown()
