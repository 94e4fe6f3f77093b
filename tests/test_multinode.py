"""A real multi-node Ray cluster on this machine: a head node with no CPUs (as in production: nothing
runs on the head) and worker nodes started with `ray start --address ...`, each its own raylet with
its own resources. The demo search runs against it through `pctune search --address`, a worker node
is killed in the middle of a search, the driver is killed and the search resumed, and the promotion
shards run on the worker nodes. No mocks: real Ray processes, a real `mlflow server`.

Every port is picked free here (other Ray clusters may run on this machine at the same time), every
node lives in this module's own temp dir (so /tmp/ray/ray_current_cluster is never written), and
teardown kills exactly this cluster's processes, never `ray stop`.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pctune.search.rundir import load_trials
from tests.mlflow_server import mlflow_server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# Node death is noticed in seconds, not Ray's default half minute of missed health checks.
RAY_ENV = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
           "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "4",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
IMAGES = "data.num_images=300"  # a trial takes about a second or two: long enough to be caught running


# -- the cluster --------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all bound at once, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class Node:
    """One `ray start --block` process: the node's raylet and workers are its descendants, in its
    process group, so SIGKILL to that group (and to any descendant that left it) kills exactly this
    node, as a lost machine would."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.name, self.proc, self.log, self.node_id = name, proc, log, None
        self.killed = False

    def processes(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)]

    def running(self, needle: str) -> list[str]:
        """Command lines (Ray sets them to ``ray::Class.method`` while a worker runs a task) of this
        node's processes that contain ``needle``."""
        return [c for c in map(cmdline, descendants(self.proc.pid)) if c.startswith("ray::") and needle in c]

    def kill(self) -> None:
        self.killed = True
        pids = self.processes()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


class Cluster:
    def __init__(self, temp: Path, env: dict) -> None:
        self.temp, self.env, self.nodes = temp, env, {}
        # Ray resolves a loopback address to this machine's own IP, so every node uses that one
        from ray.util import get_node_ip_address

        self.ip = get_node_ip_address()
        self.address = None

    def _start(self, name: str, args: list[str]) -> Node:
        node_manager, object_manager, metrics, agent, agent_grpc, runtime_env, *workers = free_ports(6 + 24)
        log = self.temp / f"{name}.log"
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
               f"--node-ip-address={self.ip}", f"--temp-dir={self.temp}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
               f"--worker-port-list={','.join(map(str, workers))}", "--object-store-memory=200000000", *args]
        with log.open("w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.temp,
                                    start_new_session=True)
        node = Node(name, proc, log)
        self.nodes[name] = node
        return node

    def start_head(self) -> None:
        def head() -> Node:
            gcs, dashboard = free_ports(2)
            self.address = f"{self.ip}:{gcs}"
            # even without the dashboard, a minimal dashboard process binds --dashboard-port (default 8265)
            return self._start("head", ["--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=false",
                                        f"--dashboard-port={dashboard}"])

        self._started(head)

    def add_worker(self, name: str) -> Node:
        return self._started(lambda: self._start(name, [f"--address={self.address}", "--num-cpus=1",
                                                        f"--resources={json.dumps({name: 1})}"]))

    def _started(self, start, attempts: int = 3) -> Node:
        """Start a node and wait for `ray start` to report it up. On two busy cores a raylet can miss
        Ray's fixed 30 s registration deadline: such a node is started again (fresh ports)."""
        logs = []
        for _ in range(attempts):
            node = start()
            while "Ray runtime started" not in node.log.read_text() and node.proc.poll() is None:
                time.sleep(0.5)
            if node.proc.poll() is None:
                return node
            logs.append(node.log.read_text()[-1500:])
            node.kill()
            node.log.rename(node.log.with_suffix(f".failed{len(logs)}.log"))
        raise AssertionError(f"node did not start {attempts} times:\n" + "\n".join(logs))

    def query(self, code: str, timeout: float = 120) -> str:
        """Run ``code`` in a short-lived driver connected to the cluster; its stdout."""
        script = f"import json, ray\nray.init(address={self.address!r}, log_to_driver=False)\n{code}\n"
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                             env=self.env, cwd=self.temp)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    def alive_nodes(self) -> list[dict]:
        out = self.query("print(json.dumps([n for n in ray.nodes() if n['Alive']]))")
        return json.loads(out.strip().splitlines()[-1])

    def wait_for(self, names: list[str], timeout: float = 180) -> None:
        """Until every named worker node is up; records each one's node id."""
        deadline = time.time() + timeout
        while True:
            for node in self.nodes.values():
                assert node.killed or node.proc.poll() is None, f"{node.name} exited:\n{node.log.read_text()[-3000:]}"
            found = {name: n["NodeID"] for n in self.alive_nodes() for name in names if name in n["Resources"]}
            if len(found) == len(names):
                for name, node_id in found.items():
                    self.nodes[name].node_id = node_id
                return
            assert time.time() < deadline, f"worker nodes not up: {sorted(found)} of {names}"
            time.sleep(1)

    def worker_ids(self) -> dict[str, str]:
        """node id -> worker node name, for every worker node started (alive or killed)."""
        return {n.node_id: name for name, n in self.nodes.items() if name != "head" and n.node_id}

    def shutdown(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            node = self.nodes[name]
            if node.proc.poll() is None or descendants(node.proc.pid):
                node.kill()


@pytest.fixture(scope="module")
def env():
    env = {**os.environ, **RAY_ENV}  # PCTUNE_CACHE: the session's demo model cache (conftest)
    env.pop("RAY_ADDRESS", None)
    # the demo model is trained (about 10 s) and cached before the cluster exists, unless it already is
    out = subprocess.run([sys.executable, "-c", "from pctune.data.demo import ensure_demo_model; "
                          "ensure_demo_model(log=print)"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return env


@pytest.fixture(scope="module")
def cluster(env, tmp_path_factory):
    # a short path of our own: Ray's socket paths must stay under 108 characters
    temp = Path(tempfile.mkdtemp(prefix="pcmn", dir="/tmp"))
    # Token authentication with this cluster's own token: never ~/.ray/auth_token, which another Ray
    # on this machine may have created (a head started with RAY_AUTH_MODE unset would adopt it).
    (temp / "auth_token").write_text(secrets.token_hex(32))
    c = Cluster(temp, {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp / "auth_token")})
    try:
        c.start_head()
        c.add_worker("worker_a")
        c.add_worker("worker_b")
        c.wait_for(["worker_a", "worker_b"])
        yield c
    finally:
        c.shutdown()
        keep = tmp_path_factory.mktemp("cluster_logs")  # the nodes' logs outlive the cluster, for diagnosis
        for log in temp.glob("*.log"):
            shutil.copy(log, keep)
        for log in temp.glob("session_*/logs/*"):
            if log.is_file() and log.suffix in (".out", ".err", ".log"):
                shutil.copy(log, keep)
        shutil.rmtree(temp, ignore_errors=True)
    assert not Path("/tmp/ray/ray_current_cluster").is_file() or \
        c.address not in Path("/tmp/ray/ray_current_cluster").read_text()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as (uri, _proc):
        yield uri


def search_cmd(cluster, uri: str, storage: Path, num_samples: int, experiment: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pctune.cli", "search", "demo", "--address", cluster.address,
            "--num-samples", str(num_samples), "--max-concurrent", "2", "--tracking-uri", uri,
            "--experiment", experiment, "--storage-path", str(storage), "--set", IMAGES, *extra]


def watch(proc: subprocess.Popen, log: Path, what: str, condition, timeout: float = 300):
    """Poll ``condition`` while ``proc`` runs; return its first truthy value (fail on timeout or exit)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if value := condition():
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} within {timeout:g}s:\n" + log.read_text()[-3000:])


def finished(exp: Path) -> dict[str, dict]:
    """trial folder -> its last reported result, for every trial with a result on disk, read as pctune
    reads them: its ``result.json``, or pctune's own record of results where Tune's background copy
    lags behind (a driver killed between the two holds a result that ``result.json`` lacks yet; the
    resume replays it, so the test must count it as recorded before the kill)."""
    return {t.folder: t.metrics for t in load_trials(exp) if t.metrics}


def child_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`pctune.job` = 'demo'")
    assert len(parents) == 1
    return client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
                              max_results=1000)


def assert_complete(exp: Path, uri: str, experiment: str, n: int, workers: dict[str, str]) -> list[dict]:
    """Exactly ``n`` trials, each once, all finished with a score, all on worker nodes; exactly one MLflow
    child run per trial."""
    trials = load_trials(exp)
    assert len(trials) == n, [t.folder for t in trials]
    ids = [t.trial_id for t in trials]
    assert len(set(ids)) == n
    assert all(t.status == "TERMINATED" and t.metrics["mean_ce"] > 0 for t in trials)
    for t in trials:
        assert t.metrics.get("node_id") in workers or t.metrics.get("replayed"), t.metrics
    children = child_runs(uri, experiment)
    tags = [c.data.tags["pctune.trial_id"] for c in children]
    assert sorted(tags) == sorted(ids)
    assert all(c.data.tags.get("pctune.complete") == "true" for c in children)
    return trials


# -- the tests ----------------------------------------------------------------------------------
def test_cluster_has_two_worker_nodes_and_a_head_without_cpus(cluster):
    nodes = cluster.alive_nodes()
    head = [n for n in nodes if "worker_a" not in n["Resources"] and "worker_b" not in n["Resources"]]
    assert len(nodes) == 3 and len(head) == 1
    assert head[0]["Resources"].get("CPU", 0) == 0
    assert {n["NodeID"] for n in nodes} - {head[0]["NodeID"]} == set(cluster.worker_ids())


def test_a_worker_node_killed_mid_search_loses_no_trial(cluster, tracking, tmp_path):
    n = 8
    storage, experiment = tmp_path / "runs", "mn-node-loss"
    exp = storage / "demo" / "joint"
    node_a = cluster.nodes["worker_a"]
    start = time.time()
    log = (tmp_path / "search.log").open("w")
    search = subprocess.Popen(search_cmd(cluster, tracking, storage, n, experiment), stdout=log,
                              stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True)
    try:
        # Kill worker_a while it is running a trial (its trial actor's title is ray::<class>.train), once
        # it has finished one already (so that both nodes have results).
        def running_after_a_result():
            busy = node_a.running(".train")
            return busy if busy and any(r.get("node_id") == node_a.node_id for r in finished(exp).values()) else None

        busy = watch(search, tmp_path / "search.log", "no trial ran on worker_a", running_after_a_result)
        node_a.kill()
        killed_at = time.time()
        print(f"killed worker_a while it ran {busy}")
        rc = search.wait(timeout=420)
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
        log.close()
    out = (tmp_path / "search.log").read_text()
    print(f"search with a node killed: {time.time() - start:.1f}s")
    print("\n".join(line for line in out.splitlines() if line.startswith("[joint]")))
    assert rc == 0, out[-4000:]
    workers = cluster.worker_ids()
    trials = assert_complete(exp, tracking, experiment, n, workers)
    on = {name: [t for t in trials if workers[t.metrics["node_id"]] == name] for name in workers.values()}
    assert on["worker_a"] and on["worker_b"], "trials ran on both worker nodes"
    # no result from worker_a after its death: the trial it was running was lost with it, and Tune reran
    # that trial (same trial id) on worker_b
    assert all(t.metrics["timestamp"] <= killed_at for t in on["worker_a"])
    retried = [line for line in out.splitlines() if "retrying" in line]
    assert retried, out[-4000:]
    recovered = [t for t in trials if t.trial_id in " ".join(retried)]
    assert recovered and all(workers[t.metrics["node_id"]] == "worker_b" for t in recovered)
    assert all(t.metrics["timestamp"] >= int(killed_at) - 1 for t in recovered)
    assert "@champion" in out


def test_killed_driver_then_resume_on_the_cluster_runs_only_the_missing_trials(cluster, tracking, tmp_path):
    if cluster.nodes["worker_a"].killed:  # a replacement for the node killed above
        cluster.add_worker("worker_c")
        cluster.wait_for(["worker_c"])
    m = 8
    storage, experiment = tmp_path / "runs", "mn-resume"
    exp = storage / "demo" / "joint"
    start = time.time()
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(search_cmd(cluster, tracking, storage, m, experiment), stdout=log,
                              stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True)
    try:
        watch(driver, tmp_path / "first.log", "fewer than 3 trials finished", lambda: len(finished(exp)) >= 3)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    before = finished(exp)
    assert 3 <= len(before) < m
    time.sleep(2)  # let Ray notice the dead driver and release its trial actors
    resumed_at = time.time()
    out = subprocess.run(search_cmd(cluster, tracking, storage, m, experiment, "--resume"), capture_output=True,
                         text=True, env=cluster.env, timeout=420)
    print(f"search killed after {len(before)} trials, then resumed: {time.time() - start:.1f}s")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "resuming the search" in out.stdout
    trials = assert_complete(exp, tracking, experiment, m, cluster.worker_ids())
    after = finished(exp)
    for folder, result in before.items():  # kept (or replayed from its result), never evaluated again
        assert after[folder]["mean_ce"] == result["mean_ce"]
        assert after[folder]["trial_id"] == result["trial_id"]
        assert after[folder]["timestamp"] == result["timestamp"] or after[folder].get("replayed") == 1
    new = [t for t in trials if t.folder not in before]
    assert len(new) == m - len(before)
    assert all(t.metrics["timestamp"] >= int(resumed_at) - 1 and not t.metrics.get("replayed") for t in new)


def test_promotion_shards_run_on_worker_nodes_and_reach_the_driver(cluster, tracking, tmp_path):
    storage = tmp_path / "runs"
    job = tmp_path / "mnpromo.toml"
    demo = (ROOT / "jobs" / "demo.toml").read_text().split("[promotion]")[0]
    job.write_text(demo.replace('space = "demo"', f'space = "{ROOT / "search_spaces" / "demo.toml"}"')
                   .replace('experiment = "pctune-demo"', 'experiment = "mn-promo"') + """
[promotion]
top_k = 1
auto = false
stages = ["imagenet-c"]
[promotion.imagenet-c]
source = "generated"
timesteps = 2
num_images = 20
corruptions = ["gaussian_noise", "fog", "contrast"]
severities = [1, 3]
resamples = 50
""")
    args = ["--storage-path", str(storage), "--tracking-uri", tracking]
    search = subprocess.run([sys.executable, "-m", "pctune.cli", "search", str(job), "--address", cluster.address,
                             "--num-samples", "2", "--set", IMAGES, *args],
                            capture_output=True, text=True, env=cluster.env, timeout=420)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    start = time.time()
    promote = subprocess.run([sys.executable, "-m", "pctune.cli", "promote", str(job), *args], capture_output=True,
                             text=True, env={**cluster.env, "RAY_ADDRESS": cluster.address}, timeout=420)
    print(f"promotion (imagenet-c, 7 shards) on the cluster: {time.time() - start:.1f}s")
    assert promote.returncode == 0, promote.stdout[-3000:] + promote.stderr[-3000:]
    out = storage / "mnpromo" / "promotion" / "rank1" / "imagenet-c"
    shards = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.json"))]
    assert len(shards) == 3 * 2 + 1  # every corruption x severity, and the clean images
    workers = cluster.worker_ids()
    alive = {n.node_id for name, n in cluster.nodes.items() if name != "head" and not n.killed}
    assert all(s["node_id"] in alive for s in shards), [s["node_id"] for s in shards]
    print("shards per worker node:", {name: sum(workers[s["node_id"]] == name for s in shards)
                                      for name in sorted(set(workers.values()))})
    import pandas as pd

    mce = pd.read_csv(out / "mce.csv")
    assert list(mce.timestep) == [0, 1, 2]
    assert (out / "ce.csv").is_file() and (out / "source.json").is_file()
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("mn-promo")
    runs = client.search_runs([exp.experiment_id], "tags.`pctune.promotion` = 'rank1'")
    assert len(runs) == 1
    # (no mCE metric from 3 of the 15 corruptions; the per-corruption tables are the run's artifacts)
    assert {"ce.csv", "mce.csv", "source.json"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}
