"""Which Ray ``fit`` connects to: ``RAY_ADDRESS``, a running cluster, or a local one it starts
on loopback (the only case in which ray_lit sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``)."""

from __future__ import annotations

from typing import Any

import pytest
import ray

from ray_lit.driver.launch import ensure_ray


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    made: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> None:
        made.append(kwargs)
        if kwargs.get("address") == "auto":
            raise ConnectionError("no running cluster")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    return made


def test_ray_address_local_starts_a_loopback_cluster_without_a_dashboard(
        calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("RAY_ADDRESS", "local")
    ensure_ray()
    assert calls == [{"address": "local", "include_dashboard": False}]
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_no_address_and_no_cluster_starts_a_loopback_cluster(
        calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ensure_ray()
    assert calls == [{"address": "auto"}, {"address": "local", "include_dashboard": False}]
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_a_cluster_address_is_joined_as_it_is(calls: list[dict[str, Any]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    ensure_ray()
    assert calls == [{"address": "ray://head:10001"}]
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # multi-node stays possible
