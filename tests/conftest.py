"""Test-wide setup: let Ray start local clusters on every platform the suite runs on."""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
