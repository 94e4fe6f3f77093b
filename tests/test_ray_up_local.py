"""`ray up` of ray_cluster.yaml for real, with a local-provider copy of it: the head is an sshd on 127.0.0.1
(in its own PID namespace, see scripts/ray_up_local.py), a 4-trial demo search runs on it, then `ray down`.

Needs root, openssh-server, rsync and netcat-openbsd (`make test-deps` installs them on Debian) and
unshare; otherwise the test is skipped with the reason. PCTUNE_SKIP_RAY_UP=1 skips it deliberately.
"""

import importlib.util
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("ray_up_local", REPO / "scripts" / "ray_up_local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rul = _load_script()
needs_cloud_config = pytest.mark.skipif(not rul.CLOUD_CONFIG.exists(), reason=f"{rul.CLOUD_CONFIG} not found")


def _skip_reason() -> str | None:
    if os.environ.get("PCTUNE_SKIP_RAY_UP") == "1":
        return "PCTUNE_SKIP_RAY_UP=1"
    reason = rul.unavailable()
    return f"ray up on a loopback head: {reason}" if reason else None


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@needs_cloud_config
def test_local_copy_of_the_cluster_config(tmp_path):
    """The derived config passes the launcher's own local-provider preparation and schema validation, and
    keeps the head start commands' intent with local values."""
    from ray.autoscaler._private.local.config import prepare_local
    from ray.autoscaler._private.util import prepare_config, validate_config

    cloud = yaml.safe_load(rul.CLOUD_CONFIG.read_text())
    ports = rul.Ports.free()
    cfg = rul.derive_local_config(cloud, workdir=tmp_path, ports=ports, ssh_key=tmp_path / "key",
                                  auth_token=tmp_path / "token", cluster_name="pctune-local-test")
    assert cfg["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert cfg["auth"]["ssh_proxy_command"] == f"nc 127.0.0.1 {ports.ssh}"
    assert not {"docker", "available_node_types", "head_node_type"} & cfg.keys()
    assert cfg["idle_timeout_minutes"] == cloud["idle_timeout_minutes"]
    validate_config(prepare_config(cfg))  # prepare_config runs prepare_local for the local provider
    assert prepare_local(cfg)[0]["available_node_types"]["local.cluster.node"]["max_workers"] == 0

    head = cfg["head_start_ray_commands"]
    assert len(head) == len(cloud["head_start_ray_commands"])
    ray_start = next(c for c in head if " start --head" in c)
    for flag in ("--num-cpus=2", f"--port={ports.gcs}", f"--dashboard-port={ports.dashboard}",
                 "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                 "--autoscaling-config=~/ray_bootstrap_config.yaml", "--disable-usage-stats"):
        assert flag in ray_start.split(), (flag, ray_start)
    assert "--num-cpus=0" not in ray_start
    mlflow = next(c for c in head if "mlflow server" in c)
    assert f"--host 127.0.0.1 --port {ports.mlflow}" in mlflow and str(tmp_path / "mlflow") in mlflow
    text = yaml.safe_dump(cfg)
    assert "s3://" not in text and "0.0.0.0" not in text and "/mnt/efs" not in text and ":5000" not in text


@pytest.mark.slow
@needs_cloud_config
def test_ray_up_demo_search_ray_down(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from mlflow import MlflowClient
    from ray.tune import ExperimentAnalysis

    with rul.LocalCluster(tmp_path) as cluster:
        t = time.time()
        cluster.up()
        print(f"ray up: {time.time() - t:.1f}s")
        names = {name for _, name in cluster.head.processes()}
        assert {"raylet", "gcs_server"} <= names, names
        assert _listening(cluster.ports.gcs)

        t = time.time()
        out = cluster.search_demo(num_samples=4).output
        print(f"search on the cluster: {time.time() - t:.1f}s")
        assert f"connecting to the Ray cluster at {cluster.address}" in out
        assert "Ray: 2 CPUs, 0 GPUs" in out
        assert "[joint] 4 trials in" in out
        assert "best configuration:" in out and "pcoder3: beta=" in out

        analysis = ExperimentAnalysis(str(tmp_path / "runs" / "demo" / "joint"))
        assert [t.status for t in analysis.trials] == ["TERMINATED"] * 4

        client = MlflowClient(cluster.mlflow_uri)
        experiment = client.get_experiment_by_name("pctune-demo")
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if r.data.tags.get("pctune.job") == "demo"]
        trials = [r for r in runs if "pctune.trial_id" in r.data.tags]
        assert len(parents) == 1 and len(trials) == 4
        assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in trials)
        assert client.get_model_version_by_alias("demo", "champion").version == "1"

        t = time.time()
        down = cluster.down().output
        print(f"ray down: {time.time() - t:.1f}s")
        assert "No nodes remaining." in down
        assert not {"raylet", "gcs_server"} & {name for _, name in cluster.head.processes()}
        assert not _listening(cluster.ports.gcs)
    # the head's sshd, and with it the MLflow server and anything else on the head, is gone
    assert not cluster.head.processes()
    assert not _listening(cluster.ports.mlflow) and not _listening(cluster.ports.ssh)
    assert not (rul.RAY_TMP / f"cluster-{cluster.name}.state").exists()
