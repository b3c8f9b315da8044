"""Test-wide setup: let Ray start local clusters on every platform the suite runs on."""

import os
import signal

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test, as in an interactive process: a shell starts
    background jobs with SIGINT ignored, and an earlier Ray Tune run may leave its handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_SEED_KEYS = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _restore(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def no_seed_leaks_between_tests():
    """``seed_everything`` stores the seed in the process environment (it travels to Ray
    workers from there): a test that seeds must not change the sampler seed of the next."""
    saved = {k: os.environ.get(k) for k in _SEED_KEYS}
    yield
    _restore(saved)


@pytest.fixture(scope="module", autouse=True)
def no_seed_leaks_between_modules():
    """The same for a module-scoped fixture that seeds (it runs before the per-test guard
    saves the environment): the next module starts unseeded."""
    saved = {k: os.environ.get(k) for k in _SEED_KEYS}
    yield
    _restore(saved)
