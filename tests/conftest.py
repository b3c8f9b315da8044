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
