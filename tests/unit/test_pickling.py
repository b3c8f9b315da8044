"""find_unpicklable / ensure_picklable name the attribute that cannot travel to the workers."""

from __future__ import annotations

import socket
import threading

import cloudpickle
import pytest
import torch
from torch.utils.data import DataLoader

from ray_lit.driver.pickling import ensure_picklable, find_unpicklable
from ray_lit.errors import MisconfigurationException


class Helper:
    def __init__(self):
        self.lock = threading.Lock()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(2, 2))
        self.helper = Helper()


def test_lock_inside_a_helper_is_named():
    assert find_unpicklable(Net()) == "module.helper.lock (a _thread.lock)"


def test_lock_inside_a_submodule_and_containers():
    net = Net()
    net.helper = None
    net.encoder.cache = {"items": [1, threading.Lock()]}
    assert find_unpicklable(net, "model") == "model.encoder.cache['items'][1] (a _thread.lock)"


def test_picklable_returns_none_and_lambda_collate_is_fine():
    loader = DataLoader(list(range(4)), batch_size=2, collate_fn=lambda b: b)
    assert find_unpicklable(loader, "train_dataloader") is None
    assert cloudpickle.loads(ensure_picklable(loader, "train_dataloader")).batch_size == 2


def test_socket_in_a_closure_of_a_collate_fn():
    sock = socket.socket()
    try:
        loader = DataLoader(list(range(4)), collate_fn=lambda b: (sock, b))
        found = find_unpicklable(loader, "train_dataloader")
        assert found.startswith("train_dataloader.collate_fn.<closure sock>")
        assert "socket" in found
    finally:
        sock.close()


def test_generator_attribute_is_named():
    net = Net()
    net.helper = None
    net.stream = (i for i in range(3))
    assert find_unpicklable(net) == "module.stream (a generator)"


def test_max_depth_stops_the_walk():
    found = find_unpicklable(Net(), max_depth=1)
    assert found.startswith("module.helper (a ") and found.endswith("Helper)")


def test_ensure_picklable_message_names_the_path_and_the_fix():
    with pytest.raises(MisconfigurationException) as info:
        ensure_picklable(Net(), "module")
    text = str(info.value)
    assert "Cannot ship module to the Ray workers: module.helper.lock (a _thread.lock)" in text
    assert "setup()" in text
