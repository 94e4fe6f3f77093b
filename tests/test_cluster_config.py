"""The cluster configurations, checked offline.

``ray_cluster.yaml`` goes through what ``ray up`` does before it touches a cloud: Ray's own
``prepare_config`` (merge with the provider's defaults), ``validate_config`` (the JSON schema shipped
in the installed Ray, ``ray/autoscaler/ray-schema.json``, plus its cross-field checks) and
``validate_docker_config``. Deliberately broken copies must fail that check. Then pctune's own
invariants, read from the file: no trials on the head, GPU workers that scale from zero, Ray pinned to
the installed version, MLflow started on the head, token authentication on. ``kuberay/raycluster.yaml``
is held to the same invariants.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.docker import validate_docker_config
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "ray_cluster.yaml"
KUBERAY = ROOT / "kuberay" / "raycluster.yaml"
RAY_VERSION = ray.__version__


def load_cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def ray_check(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's offline checks of a cluster-launcher config, as `ray up` runs them; the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    validate_docker_config(prepared)
    return prepared


def _ray_start_args(commands: list[str]) -> list[list[str]]:
    """The arguments of every `ray start` in a list of shell commands."""
    found = []
    for command in commands:
        for part in re.split(r"[;&|]+", command):
            if "ray start" not in part:
                continue
            words = shlex.split(part)
            words = [w for w in words if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w)]  # VAR=value prefixes
            if words[:2] == ["ray", "start"]:
                found.append(words[2:])
    return found


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def image_problems(image: str, where: str) -> list[str]:
    problems = []
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    if not tag or any(word in tag for word in ("nightly", "latest")):
        problems.append(f"{where}: image {image!r} is not pinned")
    elif not tag.startswith(f"{RAY_VERSION}-"):
        problems.append(f"{where}: image {image!r} is not Ray {RAY_VERSION} (the installed Ray)")
    if not re.search(r"-(gpu|cu\d+)\b", tag):
        problems.append(f"{where}: image {image!r} is not a GPU image")
    return problems


def cluster_problems(config: dict[str, Any]) -> list[str]:
    """What breaks pctune's invariants in a cluster-launcher config (an empty list: none)."""
    problems = []
    types = config.get("available_node_types", {})
    head_name = config.get("head_node_type")
    head = types.get(head_name, {})
    if head.get("resources", {}).get("CPU") != 0:
        problems.append(f"head node type {head_name!r}: resources must give CPU 0 (no trials on the head)")
    if head.get("resources", {}).get("GPU", 0) != 0:
        problems.append(f"head node type {head_name!r}: no GPU on the head")
    workers = {name: t for name, t in types.items() if name != head_name}
    if not workers:
        problems.append("no worker node type")
    for name, node_type in workers.items():
        if node_type.get("min_workers", 0) != 0:
            problems.append(f"worker type {name!r}: min_workers must be 0 (scale from zero)")
        if not node_type.get("resources", {}).get("GPU", 0) > 0:
            problems.append(f"worker type {name!r}: resources give no GPU")
        if node_type.get("max_workers", 0) < 1:
            problems.append(f"worker type {name!r}: max_workers < 1")

    docker = config.get("docker", {})
    images = [(k, docker[k]) for k in ("image", "head_image", "worker_image") if docker.get(k)]
    images += [(f"{name}.docker.worker_image", t["docker"]["worker_image"]) for name, t in types.items()
               if t.get("docker", {}).get("worker_image")]
    if not images:
        problems.append("docker: no image")
    for where, image in images:
        problems += image_problems(image, f"docker.{where}" if "." not in where else where)
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in config.get(key, [])]
    for pin in re.findall(r"\bray(?:\[[^\]]*\])?==([\w.]+)", " ".join(commands)):
        if pin != RAY_VERSION:
            problems.append(f"setup commands pin ray=={pin}, not the installed {RAY_VERSION}")
    if re.search(r"ray-wheels|nightly|\bray\b[^=\n]*@ *https?://", " ".join(commands)):
        problems.append("setup commands install an unpinned (nightly) Ray")

    head_start = config.get("head_start_ray_commands", [])
    mlflow = [c for c in head_start if "mlflow server" in c]
    if not mlflow:
        problems.append("head_start_ray_commands do not start `mlflow server`")
    for command in mlflow:
        for flag in ("--backend-store-uri", "--artifacts-destination", "--serve-artifacts", "--port"):
            if flag not in command:
                problems.append(f"mlflow server is started without {flag}")
        if "nohup" not in command or not command.rstrip().rstrip(")").rstrip().endswith("&"):
            problems.append("mlflow server is not started in the background with nohup")
    head_starts = _ray_start_args(head_start)
    if not head_starts:
        problems.append("head_start_ray_commands do not run `ray start --head`")
    for args in head_starts:
        if "--head" not in args:
            problems.append("the head's `ray start` lacks --head")
        if _flag(args, "--num-cpus") != "0":
            problems.append("the head's `ray start` must pass --num-cpus=0 (no trials on the head)")
        if _flag(args, "--dashboard-host") not in ("127.0.0.1", "localhost"):
            problems.append("the dashboard must be bound to 127.0.0.1 (reach it by port-forward)")
    worker_starts = _ray_start_args(config.get("worker_start_ray_commands", []))
    if not worker_starts or any(_flag(args, "--address") != "$RAY_HEAD_IP:6379" for args in worker_starts):
        problems.append("worker_start_ray_commands must join the head at $RAY_HEAD_IP:6379")

    everywhere = " ".join(docker.get("run_options", []) + config.get("head_start_ray_commands", [])
                          + config.get("worker_start_ray_commands", []))
    if not re.search(r"\bRAY_AUTH_MODE=token\b", everywhere):
        problems.append("token authentication is off (RAY_AUTH_MODE=token on every node)")
    if not any("auth_token" in remote for remote in config.get("file_mounts", {})):
        problems.append("file_mounts do not ship the Ray auth token to the nodes")
    if re.search(r"RAY_AUTH_MODE=disabled", yaml.safe_dump(config)):
        problems.append("RAY_AUTH_MODE=disabled")
    return problems


# -- Ray's own checks ---------------------------------------------------------------------------
def test_schema_is_the_installed_rays():
    schema = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert schema.is_file()


def test_cluster_config_passes_rays_checks():
    prepared = ray_check(load_cluster())
    assert prepared["cluster_name"] == "pctune"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # our commands replace the provider defaults (which would pip-install a nightly Ray)
    assert not any("ray-wheels" in c for c in prepared["setup_commands"])


def _misspelled_key(c):
    c["max_worker"] = c.pop("max_workers")


def _min_workers_string(c):
    c["available_node_types"]["gpu_spot"]["min_workers"] = "0"


def _no_head_node_type(c):
    del c["head_node_type"]


def _head_type_unknown(c):
    c["head_node_type"] = "head_typo"


def _fractional_gpu_resource(c):
    c["available_node_types"]["gpu_ondemand"]["resources"]["GPU"] = 0.5


def _docker_key_typo(c):
    c["docker"]["imag"] = c["docker"].pop("image")


def _node_type_without_node_config(c):
    del c["available_node_types"]["gpu_spot"]["node_config"]


def _min_workers_over_max(c):
    c["available_node_types"]["gpu_spot"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("breakage", [_misspelled_key, _min_workers_string, _no_head_node_type, _head_type_unknown,
                                      _fractional_gpu_resource, _docker_key_typo, _node_type_without_node_config,
                                      _min_workers_over_max])
def test_rays_checks_reject_a_broken_copy(breakage):
    config = load_cluster()
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, AssertionError)):  # what `ray up` raises
        ray_check(config)


# -- pctune's invariants ------------------------------------------------------------------------
def test_cluster_config_keeps_pctunes_invariants():
    assert cluster_problems(load_cluster()) == []


def test_cluster_config_node_types():
    config = load_cluster()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in workers)
    assert any("InstanceMarketOptions" not in t["node_config"] for t in workers)
    assert config["idle_timeout_minutes"] > 0
    assert config["max_workers"] >= max(t["max_workers"] for t in workers)


def test_cluster_config_shares_the_run_directory():
    config = load_cluster()
    assert any("mount -t nfs4" in c and "/mnt/efs" in c for c in config["initialization_commands"])
    assert "--volume /mnt/efs:/mnt/efs" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/pctune"] == "."
    assert any("pip install" in c and "~/pctune" in c for c in config["setup_commands"])


def _set(path: list, value):
    def breakage(c):
        target = c
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    breakage.__name__ = ".".join(map(str, path))
    return breakage


def _edit_commands(key, old, new):
    def breakage(c):
        c[key] = [command.replace(old, new) for command in c[key]]
    breakage.__name__ = f"{key}:{old}->{new}"
    return breakage


@pytest.mark.parametrize("breakage, message", [
    (_set(["available_node_types", "head", "resources"], {"CPU": 8}), "CPU 0"),
    (_set(["available_node_types", "head", "resources"], {}), "CPU 0"),
    (_set(["available_node_types", "gpu_spot", "min_workers"], 1), "min_workers must be 0"),
    (_set(["available_node_types", "gpu_ondemand", "resources"], {"CPU": 8}), "no GPU"),
    (_set(["docker", "image"], "rayproject/ray:nightly-py311-gpu"), "not pinned"),
    (_set(["docker", "image"], "rayproject/ray:latest-gpu"), "not pinned"),
    (_set(["docker", "image"], "rayproject/ray"), "not pinned"),
    (_set(["docker", "image"], "rayproject/ray:2.9.3-py311-gpu"), "not Ray"),
    (_set(["docker", "image"], f"rayproject/ray:{RAY_VERSION}-py311"), "not a GPU image"),
    (_set(["setup_commands"], ["pip install -e ~/pctune ray==2.9.3"]), "pin ray==2.9.3"),
    (_edit_commands("head_start_ray_commands", "mlflow server", "mlflow ui"), "do not start `mlflow server`"),
    (_edit_commands("head_start_ray_commands", "--serve-artifacts", ""), "without --serve-artifacts"),
    (_edit_commands("head_start_ray_commands", "nohup ", ""), "background"),
    (_edit_commands("head_start_ray_commands", "--num-cpus=0", "--num-cpus=8"), "--num-cpus=0"),
    (_edit_commands("head_start_ray_commands", "--num-cpus=0", ""), "--num-cpus=0"),
    (_edit_commands("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
     "127.0.0.1"),
    (_edit_commands("worker_start_ray_commands", "$RAY_HEAD_IP:6379", "10.0.0.1:6379"), "$RAY_HEAD_IP"),
    (_set(["docker", "run_options"], ["--ulimit nofile=65536:65536"]), "token authentication is off"),
    (_set(["file_mounts"], {"~/pctune": "."}), "auth token"),
])
def test_invariant_check_catches_a_broken_copy(breakage, message):
    config = load_cluster()
    breakage(config)
    problems = cluster_problems(config)
    assert problems, "the broken copy passed"
    assert any(message in p for p in problems), problems


def test_auth_mode_disabled_is_caught():
    config = load_cluster()
    config["docker"]["run_options"].append("--env RAY_AUTH_MODE=disabled")
    assert any("disabled" in p for p in cluster_problems(config))


def test_token_mode_reaches_every_process():
    # set for the whole container (drivers, `ray exec` commands), not only for `ray start`
    config = load_cluster()
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]


# -- KubeRay ------------------------------------------------------------------------------------
def load_kuberay() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBERAY.read_text()) if doc]


def _raycluster(docs):
    (cluster,) = [d for d in docs if d.get("kind") == "RayCluster"]
    return cluster


def _limit(value) -> float:
    return float(str(value))


def kuberay_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    if len(clusters) != 1:
        return [f"{len(clusters)} RayCluster documents, expected 1"]
    cluster = clusters[0]
    if cluster.get("apiVersion") != "ray.io/v1":
        problems.append("apiVersion must be ray.io/v1")
    spec = cluster.get("spec", {})
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} is not {RAY_VERSION}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("token authentication is off (authOptions.mode: token)")
    head = spec.get("headGroupSpec", {})
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('head rayStartParams num-cpus must be "0" (a string; no trials on the head)')
    head_pod = head.get("template", {}).get("spec", {})
    if not any("mlflow server" in " ".join(c.get("command", []) + c.get("args", []))
               for c in head_pod.get("containers", [])):
        problems.append("no container of the head pod starts `mlflow server`")
    groups = spec.get("workerGroupSpecs", [])
    if not groups:
        problems.append("no worker group")
    pods = [("head", head_pod)]
    for group in groups:
        name = group.get("groupName")
        pods.append((name, group.get("template", {}).get("spec", {})))
        if group.get("minReplicas") != 0:
            problems.append(f"worker group {name!r}: minReplicas must be 0")
        if group.get("replicas", 0) != 0:
            problems.append(f"worker group {name!r}: replicas must start at 0")
        if group.get("maxReplicas", 0) < 1:
            problems.append(f"worker group {name!r}: maxReplicas < 1")
        containers = group.get("template", {}).get("spec", {}).get("containers", [])
        gpus = [_limit(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers]
        if not gpus or gpus[0] <= 0:
            problems.append(f"worker group {name!r}: the Ray container has no nvidia.com/gpu limit")
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"
              and "ReadWriteMany" in d.get("spec", {}).get("accessModes", [])}
    if not claims:
        problems.append("no ReadWriteMany PersistentVolumeClaim for the Tune runs")
    head_paths = None
    for name, pod in pods:
        for container in pod.get("containers", []):
            problems += image_problems(container.get("image", ""), f"{name}/{container.get('name')}")
        ray_container = (pod.get("containers") or [{}])[0]
        mounted = {v["name"] for v in pod.get("volumes", [])
                   if v.get("persistentVolumeClaim", {}).get("claimName") in claims}
        paths = {m["mountPath"] for m in ray_container.get("volumeMounts", []) if m["name"] in mounted}
        if not paths:
            problems.append(f"{name}: the shared volume is not mounted in the Ray container")
        if name == "head":
            head_paths = paths
        elif paths != head_paths:
            problems.append(f"{name}: the shared volume is mounted at {paths}, the head's at {head_paths}")
    return problems


def test_kuberay_manifest_keeps_pctunes_invariants():
    docs = load_kuberay()
    assert kuberay_problems(docs) == []
    head = _raycluster(docs)["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["name"] == "ray-head"


def _k(path: list, value=None, delete=False):
    def breakage(docs):
        target = _raycluster(docs)
        for key in path[:-1]:
            target = target[key]
        if delete:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return breakage


_HEAD = ["spec", "headGroupSpec"]
_GPU = ["spec", "workerGroupSpecs", 0]


@pytest.mark.parametrize("breakage, message", [
    (_k([*_HEAD, "rayStartParams", "num-cpus"], 0), 'num-cpus must be "0"'),
    (_k([*_HEAD, "rayStartParams", "num-cpus"], delete=True), 'num-cpus must be "0"'),
    (_k([*_GPU, "minReplicas"], 1), "minReplicas must be 0"),
    (_k([*_GPU, "template", "spec", "containers", 0, "resources", "limits", "nvidia.com/gpu"], delete=True),
     "nvidia.com/gpu"),
    (_k([*_GPU, "template", "spec", "containers", 0, "image"], "rayproject/ray:nightly-gpu"), "not pinned"),
    (_k([*_HEAD, "template", "spec", "containers", 0, "image"], "rayproject/ray:2.9.3-py311-gpu"), "not Ray"),
    (_k(["spec", "rayVersion"], "2.9.3"), "rayVersion"),
    (_k(["spec", "enableInTreeAutoscaling"], False), "enableInTreeAutoscaling"),
    (_k(["spec", "authOptions"], delete=True), "token"),
    (_k([*_HEAD, "template", "spec", "containers"],
        [{"name": "ray-head", "image": f"rayproject/ray:{RAY_VERSION}-py311-gpu"}]), "mlflow server"),
    (_k([*_GPU, "template", "spec", "volumes"], []), "not mounted"),
])
def test_kuberay_check_catches_a_broken_copy(breakage, message):
    docs = load_kuberay()
    breakage(docs)
    problems = kuberay_problems(docs)
    assert any(message in p for p in problems), problems


def test_kuberay_check_needs_a_shared_claim():
    docs = [d for d in load_kuberay() if d.get("kind") != "PersistentVolumeClaim"]
    assert "no ReadWriteMany PersistentVolumeClaim for the Tune runs" in kuberay_problems(docs)
