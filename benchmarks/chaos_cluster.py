"""What ``chaos_mix.py`` breaks: a local multi-node Ray cluster and an S3 endpoint it can take away.

``ChaosCluster``: a ``ray.cluster_utils.Cluster`` whose head node has no CPUs (it hosts only the
drivers, so no rank ever lives on a node that cannot be removed) plus worker nodes of
``cpus_per_node`` CPUs. ``remove(node_id)`` kills a node's raylet and its workers, as when a
spot VM vanishes; ``add()`` brings a replacement.

``S3Endpoint``: a moto S3 server on 127.0.0.1 behind the TCP proxy of
``tests/ray/s3_fault_proxy.py``. ``down()`` SIGKILLs the proxy (connections refused, uploads cut
mid-body), ``up()`` starts it again on the same port with the data intact. The AWS variables it
sets in ``os.environ`` reach the drivers and, through the raylets started afterwards, the ranks.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ray"))
from s3_fault_proxy import start_proxy, stop_proxy  # noqa: E402

OBJECT_STORE_BYTES = 150 * 1024 * 1024  # small: every node's store is mapped on one machine


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ChaosCluster:
    """A head node without CPUs and ``nodes`` worker nodes; nodes are removed and added by id."""

    def __init__(self, nodes: int, cpus_per_node: int) -> None:
        from ray.cluster_utils import Cluster

        self.cpus_per_node = cpus_per_node
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES})
        for _ in range(nodes):
            self.add()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self) -> None:
        """Start one more worker node and wait until it is registered."""
        self.cluster.add_node(num_cpus=self.cpus_per_node, object_store_memory=OBJECT_STORE_BYTES,
                              wait=True)

    def remove(self, node_id: str) -> bool:
        """Remove the worker node ``node_id`` without grace; False when it is not (any more) one
        of this cluster's worker nodes."""
        for node in list(self.cluster.worker_nodes):
            if node.node_id == node_id:
                self.cluster.remove_node(node, allow_graceful=False)
                return True
        return False

    @property
    def worker_count(self) -> int:
        return len(self.cluster.worker_nodes)

    def shutdown(self) -> None:
        self.cluster.shutdown()


class S3Endpoint:
    """A moto S3 server with one bucket, reached through a proxy process that can be killed."""

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.moto_port, self.port = free_port(), free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port)
        self.server.start()
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true",
                           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"})
        self.bucket = f"ray-lit-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}",
                     region_name="us-east-1").create_bucket(Bucket=self.bucket)
        self.proxy: Any = start_proxy(self.port, self.moto_port)

    @property
    def is_up(self) -> bool:
        return self.proxy is not None

    def down(self) -> None:
        """The endpoint goes away (SIGKILL of the proxy pid this object started)."""
        if self.proxy is not None:
            stop_proxy(self.proxy)
            self.proxy = None

    def up(self) -> None:
        """The endpoint comes back on the same port, its data intact."""
        if self.proxy is None:
            self.proxy = start_proxy(self.port, self.moto_port)

    def shutdown(self) -> None:
        self.down()
        self.server.stop()
