"""bolts 0.2.2's models beyond regression, unchanged, on 2 Ray workers (issue 14).

The same cases and assertions as ``test_bolts_models_09.py``, with
``ray_lit.compat.install(num_workers=2)`` (what ``python -m ray_lit --workers 2`` does): bolts'
model is pickled by reference, so the workers import ``pl_bolts`` and torchvision from the
unpacked wheels (``PYTHONPATH``, set before Ray starts) after two setup hooks: ray_lit's Lightning
aliases and ``legacy_torch.install``. The large encoders are ``slow``.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
from bolts_harness import bolts_models_root, bolts_paths
from test_bolts_models_09 import EXPECTED, assert_like_real_09, model_params

import ray_lit.compat

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])

@pytest.fixture(scope="module")
def cases_on_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``bolts_cases`` with ``pytorch_lightning`` resolved to ray_lit, 2 workers per Trainer."""
    import ray

    root = bolts_models_root(tmp_path_factory.mktemp("bolts022_models_ray"))
    with bolts_paths(root):  # before ray.init: the workers inherit PYTHONPATH
        import legacy_torch

        legacy_torch.install()
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=4, include_dashboard=False)
        # find_unused_parameters: 0.9's DDP default, which bolts relies on (SSLFineTuner's
        # frozen backbone, ImageGPT's unused head); a long start-up wait: the workers import
        # torchvision and bolts on shared cores
        ray_lit.compat.install(num_workers=2, find_unused_parameters=True,
                               placement_timeout_s=600)
        hooks = os.environ[ray_lit.compat.WORKER_SETUP_ENV]
        os.environ[ray_lit.compat.WORKER_SETUP_ENV] = f"{hooks},{legacy_torch.WORKER_HOOK}"
        try:
            import bolts_cases

            yield bolts_cases
        finally:
            os.environ[ray_lit.compat.WORKER_SETUP_ENV] = hooks
            ray_lit.compat.uninstall()
            ray.shutdown()


@pytest.mark.parametrize("name", model_params(EXPECTED))
def test_bolts_model_trains_on_two_ray_workers_like_real_lightning_090(cases_on_ray, name,
                                                                       tmp_path: pathlib.Path):
    report = cases_on_ray.run_case(name, tmp_path / name)
    assert_like_real_09(report)
    assert report["workers"] == 2
