"""The cluster configurations under cluster/ parse and fit what ray_lit and the examples ask for.

No cluster is started: the YAMLs are read, validated against Ray's own cluster-launcher schema
(when ``jsonschema`` is installed) and every node type's declared resources are checked against
the per-worker bundle ``resolve_worker_resources`` computes for that kind of node, with the same
feasibility check ``ray_lit.fit`` runs before it starts workers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_lit.driver.placement import check_feasible, resolve_worker_resources
from ray_lit.errors import MisconfigurationException

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = {"aws-cpu.yaml": "cpu", "aws-gpu.yaml": "gpu", "gcp-tpu.yaml": "tpu"}
KUBERAY = ("raycluster.yaml", "rayjob.yaml")

CPU_WORKER = resolve_worker_resources(use_gpu=False, accelerator="cpu")
GPU_WORKER = resolve_worker_resources(use_gpu=True, accelerator="gpu")
TPU_WORKER = resolve_worker_resources(use_gpu=False, accelerator="tpu")
REQUEST = {"cpu": CPU_WORKER, "gpu": GPU_WORKER, "tpu": TPU_WORKER}
ACCELERATOR = {"cpu": None, "gpu": "GPU", "tpu": "TPU"}


def load_docs(name: str) -> list[dict]:
    with open(CLUSTER / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load(name: str) -> dict:
    (doc,) = load_docs(name)
    return doc


def worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {name: spec for name, spec in config["available_node_types"].items() if name != head}


def example_default_workers(script: Path) -> int:
    """``--num-workers`` default of an example script (ray_lit.fit's own default otherwise)."""
    match = re.search(r'"--num-workers",\s*type=int,\s*default=(\d+)', script.read_text())
    return int(match.group(1)) if match else 8


# --- every file --------------------------------------------------------------------------------
def test_cluster_folder_has_the_documented_files():
    for name in [*LAUNCHER, *KUBERAY, "local_cluster.sh", "README.md"]:
        assert (CLUSTER / name).is_file(), name
    readme = (CLUSTER / "README.md").read_text()
    for name in [*LAUNCHER, *KUBERAY, "local_cluster.sh"]:
        assert name in readme, f"cluster/README.md does not mention {name}"


@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTER.glob("*.yaml")))
def test_every_yaml_parses(name):
    docs = load_docs(name)
    assert docs and all(isinstance(doc, dict) for doc in docs)


# --- Ray cluster launcher ----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_matches_rays_schema(name):
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip("this Ray has no autoscaler/ray-schema.json")
    jsonschema.validate(load(name), json.loads(schema_path.read_text()))


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_node_types_are_consistent(name):
    config = load(name)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = worker_types(config)
    assert workers, "no worker node type"
    for spec in workers.values():
        assert spec.get("min_workers", 0) <= spec.get("max_workers", config["max_workers"])
        assert spec.get("max_workers", 0) <= config["max_workers"]
    # the head runs the control plane and drivers only: no ray_lit worker is placed there
    head = types[config["head_node_type"]]["resources"]
    assert head.get("CPU", 1) == 0, "declare CPU: 0 on the head so workers use worker nodes"
    with pytest.raises(MisconfigurationException):
        check_feasible(1, CPU_WORKER, nodes=[head])
    # the repository reaches the nodes and is installed there
    commands = " ".join(config.get("setup_commands", []))
    assert "ray_lit" in " ".join(config.get("file_mounts", {})) and "pip install" in commands


@pytest.mark.parametrize("name,kind", sorted(LAUNCHER.items()))
def test_every_worker_node_type_fits_the_workers_ray_lit_asks_for(name, kind):
    request = REQUEST[kind]
    accelerator = ACCELERATOR[kind]
    for node_type, spec in worker_types(load(name)).items():
        resources = {k: float(v) for k, v in spec["resources"].items()}
        if accelerator is not None:
            chips = resources.get(accelerator, 0)
            assert chips >= 1, f"{node_type} declares no {accelerator}"
            # one worker per chip, each also needs its CPU: the whole node fills up
            check_feasible(int(chips), request, "STRICT_PACK", nodes=[resources])
        else:
            check_feasible(int(resources["CPU"]), request, "STRICT_PACK", nodes=[resources])


def test_cpu_cluster_runs_every_example_at_its_default_size():
    config = load("aws-cpu.yaml")
    nodes = [{k: float(v) for k, v in spec["resources"].items()}
             for spec in worker_types(config).values()
             for _ in range(max(1, spec.get("min_workers", 0)))]
    for script in sorted((ROOT / "examples").glob("*/train.py")):
        check_feasible(max(1, example_default_workers(script)), CPU_WORKER, nodes=nodes)


def test_gpu_cluster_uses_g5_instances_and_tpu_cluster_tpu_vms():
    for spec in worker_types(load("aws-gpu.yaml")).values():
        assert spec["node_config"]["InstanceType"].startswith("g5.")
    for spec in worker_types(load("gcp-tpu.yaml")).values():
        assert spec["node_config"]["acceleratorType"].startswith("v")
        assert "runtimeVersion" in spec["node_config"]


# --- KubeRay -----------------------------------------------------------------------------------
def cluster_spec(name: str) -> dict:
    for doc in load_docs(name):
        if doc["kind"] == "RayCluster":
            return doc["spec"]
        if doc["kind"] == "RayJob":
            return doc["spec"]["rayClusterSpec"]
    raise AssertionError(f"{name}: no RayCluster / RayJob")


def group_resources(group: dict) -> dict[str, float]:
    """What one pod of ``group`` offers to Ray: rayStartParams, checked against its limits."""
    params = group.get("rayStartParams", {})
    (container,) = group["template"]["spec"]["containers"]
    limits = container.get("resources", {}).get("limits", {})
    cpus = float(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    assert cpus <= float(limits.get("cpu", cpus)), "num-cpus above the container's cpu limit"
    assert gpus == float(limits.get("nvidia.com/gpu", 0)), "num-gpus != nvidia.com/gpu limit"
    return {"CPU": cpus, "GPU": gpus}


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_groups_fit_ray_lit_workers(name):
    spec = cluster_spec(name)
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    for group in spec["workerGroupSpecs"]:
        offered = group_resources(group)
        request = GPU_WORKER if offered["GPU"] else CPU_WORKER
        check_feasible(1, request, nodes=[offered])
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", 1e9)
    # every pod mounts the same shared volume: checkpoints are written and read across pods
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    claims = {v["persistentVolumeClaim"]["claimName"] for p in pods
              for v in p["template"]["spec"].get("volumes", [])}
    declared = {d["metadata"]["name"] for d in load_docs(name)
                if d["kind"] == "PersistentVolumeClaim"}
    assert len(claims) == 1 and claims <= declared
    pvc = next(d for d in load_docs(name) if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_raycluster_has_a_gpu_group():
    groups = cluster_spec("raycluster.yaml")["workerGroupSpecs"]
    assert any(group_resources(g)["GPU"] >= 1 for g in groups)


def test_rayjob_entrypoint_runs_an_existing_example_that_fits():
    (job,) = [d for d in load_docs("rayjob.yaml") if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python"
    script = ROOT / argv[1]
    assert script.is_file() and script.parent.parent == ROOT / "examples", argv[1]
    workers = int(argv[argv.index("--num-workers") + 1]) if "--num-workers" in argv \
        else example_default_workers(script)
    spec = job["spec"]["rayClusterSpec"]
    pods = [group_resources(g) for g in spec["workerGroupSpecs"]
            for _ in range(g.get("minReplicas", g["replicas"]))]
    check_feasible(workers, CPU_WORKER, nodes=pods)
    # the image puts the repository in the working directory the entrypoint is relative to
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert f"WORKDIR {container['workingDir']}" in dockerfile


# --- local multi-node script -------------------------------------------------------------------
def test_local_cluster_script_is_loopback_only_and_stops_only_its_own_processes():
    script = CLUSTER / "local_cluster.sh"
    assert script.stat().st_mode & stat.S_IXUSR, "local_cluster.sh is not executable"
    subprocess.run(["bash", "-n", os.fspath(script)], check=True)
    text = script.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "ADDRESS_IP=127.0.0.1" in code
    addresses = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", code))
    assert addresses == {"127.0.0.1"}, addresses
    assert "0.0.0.0" not in code
    assert not re.search(r"\bray stop\b", code), "ray stop would stop every Ray on the machine"
    assert "pkill" not in code and "killall" not in code
    for command in ("start", "stop", "status"):
        assert f"{command})" in code
