"""pytest setup: hypothesis profiles sized for CI (2 cores), and the `large`
tests (32-bit overflow at scale, minutes each), which run only with
--run-large (`make test-large`). HYPOTHESIS_PROFILE=dev runs many more
examples."""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(  # `make sanitize`: everything runs several times slower
    "sanitize", max_examples=8, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--run-large", action="store_true",
                     help="also run the tests marked `large` (make test-large)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-large"):
        return
    skip = pytest.mark.skip(reason="large: run with --run-large (make test-large)")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)
