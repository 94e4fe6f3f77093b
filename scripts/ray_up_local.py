"""`ray up` the repository's ray_cluster.yaml on this machine: the Ray cluster launcher without a cloud.

Usage (as root on Debian/Ubuntu; `make test-deps` installs openssh-server, rsync and netcat-openbsd):

    python scripts/ray_up_local.py              # ray up, a 4-trial demo search on the cluster, ray down
    python scripts/ray_up_local.py --keep       # the same, but leave the cluster up (Ctrl-C tears it down)
    python scripts/ray_up_local.py --num-samples 8 --workdir /tmp/rayup

What it does:
  1. Derives a local-provider copy of ray_cluster.yaml (`derive_local_config`): provider `local` with
     head_ip 127.0.0.1 and no workers, ssh as root with a generated key, no Docker, nothing to install
     (the Python environment running this script is the "node image"), the same head start commands
     with local values (ports, paths) and `--num-cpus=2` instead of 0 (on a one-node cluster the trials
     must run on the head).
  2. Starts an sshd on a free loopback port (the launcher reaches it through `ProxyCommand nc`, since
     the cluster config has no ssh port field) inside its own PID and mount namespaces, with its own
     HOME and its own /tmp/ray: that sshd is the "head node". This keeps `ray down` safe on a shared
     machine: `ray down` runs a plain `ray stop` on the head, which stops every Ray process it can see
     and deletes /tmp/ray/ray_current_cluster; in the namespace it sees only this cluster.
  3. `ray up -y --no-config-cache`, then `ray exec` of `pctune search demo` on the head (driver on the
     head, trials on the head's 2 CPUs, results in MLflow on the head), then `ray down -y`.

Everything lives in --workdir (a new temporary folder by default); the sshd, and with it every process
the cluster started (Ray, MLflow), is killed at the end whatever happens.
tests/test_ray_up_local.py runs the same steps and checks the results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import getpass
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CLOUD_CONFIG = REPO / "ray_cluster.yaml"
BIN = Path(sys.executable).parent          # ray, mlflow and pctune of this environment
HEAD_CPUS = 2                              # see derive_local_config: trials run on the head here
RAY_TMP = Path("/tmp/ray")                 # Ray's default temp dir; the head gets a private one


@dataclass
class Ports:
    """Every port the head listens on, all free loopback ports: other Ray clusters, MLflow servers
    and sshds may run on this machine at the same time."""

    ssh: int
    gcs: int
    dashboard: int
    client_server: int
    object_manager: int
    node_manager: int
    metrics_export: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int
    mlflow: int

    @classmethod
    def free(cls) -> Ports:
        socks = []
        try:
            for _ in fields(cls):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            return cls(*(s.getsockname()[1] for s in socks))
        finally:
            for s in socks:
                s.close()


# -- the local-provider copy of the cluster config ---------------------------------------------------
def derive_local_config(cloud: dict, *, workdir: Path, ports: Ports, ssh_key: Path, auth_token: Path,
                        cluster_name: str) -> dict:
    """The cloud cluster config turned into a one-node `local` provider cluster on 127.0.0.1.

    Kept: the top-level structure, rsync filters, idle timeout, `ray stop` and the two head start
    commands (MLflow server, `ray start --head` with the cloud file's flags). Replaced:
      provider               local, head_ip 127.0.0.1, no worker_ips (max_workers 0)
      auth                   ssh_user = this user, a generated key, ProxyCommand nc to the sshd's port
      node types, docker     dropped: the local provider has one implicit node type; no container
                             (the docker --env settings go into the head's ~/.bashrc: head_environment)
      file_mounts            only the Ray auth token (a generated one); the checkout is not synced,
                             the head runs this checkout's pctune (already installed here)
      initialization/setup   nothing to mount or install; mkdir of the MLflow and runs folders
      ray start --head       --num-cpus=2 instead of 0: a local cluster has no workers, so the demo's
                             trials must run on the head; free ports, --node-ip-address=127.0.0.1
      mlflow server          on 127.0.0.1:<free port>, SQLite and artifacts in workdir (no S3)
    """
    cfg = copy.deepcopy(cloud)
    mlflow_dir = workdir / "mlflow"
    cfg["cluster_name"] = cluster_name
    cfg["max_workers"] = 0
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    cfg["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(ssh_key),
                   "ssh_proxy_command": f"nc 127.0.0.1 {ports.ssh}"}
    for key in ("available_node_types", "head_node_type", "docker", "min_workers"):
        cfg.pop(key, None)
    cfg["file_mounts"] = {"~/.ray/auth_token": str(auth_token)}
    cfg["initialization_commands"] = [f"mkdir -p {shlex.quote(str(workdir / 'runs'))}"]
    cfg["setup_commands"] = []
    cfg["head_setup_commands"] = [f"mkdir -p {shlex.quote(str(mlflow_dir))}"]
    cfg["worker_setup_commands"] = []
    cfg["worker_start_ray_commands"] = []

    head = []
    found = set()
    for cmd in cloud.get("head_start_ray_commands", []):
        if "mlflow server" in cmd:
            head.append(_local_mlflow_command(mlflow_dir, ports.mlflow))
            found.add("mlflow")
        elif re.search(r"\bray start\b", cmd) and "--head" in cmd:
            head.append(_local_ray_start_command(cmd, ports))
            found.add("ray start")
        else:
            head.append(cmd)  # `ray stop`: only this head's Ray (see LoopbackHead)
    missing = {"mlflow", "ray start"} - found
    if missing:
        raise ValueError(f"{CLOUD_CONFIG.name}: head_start_ray_commands has no {' / '.join(sorted(missing))} "
                         "command to derive the local one from")
    cfg["head_start_ray_commands"] = head
    return cfg


def _local_ray_start_command(cmd: str, ports: Ports) -> str:
    """`ray start --head` with the cloud command's flags, loopback ports and HEAD_CPUS CPUs."""
    m = re.search(r"\bray start\b", cmd)
    prefix = re.sub(r"MLFLOW_TRACKING_URI=\S+", f"MLFLOW_TRACKING_URI={mlflow_uri(ports)}", cmd[:m.start()])
    flags: dict[str, str | None] = {}
    tokens = shlex.split(cmd[m.end():])
    for i, tok in enumerate(tokens):
        if not tok.startswith("--"):
            continue
        name, eq, value = tok[2:].partition("=")
        if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
        flags[name] = value if (eq or value) else None
    flags.update({
        "num-cpus": str(HEAD_CPUS), "node-ip-address": "127.0.0.1", "port": str(ports.gcs),
        "dashboard-host": "127.0.0.1", "dashboard-port": str(ports.dashboard),
        "object-manager-port": str(ports.object_manager),
        "node-manager-port": str(ports.node_manager), "metrics-export-port": str(ports.metrics_export),
        "dashboard-agent-listen-port": str(ports.dashboard_agent_listen),
        "dashboard-agent-grpc-port": str(ports.dashboard_agent_grpc),
        "runtime-env-agent-port": str(ports.runtime_env_agent),
    })
    if _has_ray_client():  # ray start refuses the flag without ray[client] (and then starts no client server)
        flags["ray-client-server-port"] = str(ports.client_server)
    args = " ".join(f"--{k}" if v is None else f"--{k}={_shell_word(v)}" for k, v in flags.items())
    return f"{prefix}{BIN / 'ray'} start {args}"


def _shell_word(value: str) -> str:
    """Quoted for the shell where needed, but a leading ~ stays unquoted so the head's shell expands it."""
    return value if re.fullmatch(r"[\w~/.:@%+,=-]+", value) else shlex.quote(value)


def _has_ray_client() -> bool:
    from ray._private.utils import get_ray_client_dependency_error

    return get_ray_client_dependency_error() is None


def _local_mlflow_command(mlflow_dir: Path, port: int) -> str:
    """Like the cloud head's: start an MLflow server unless one answers; on loopback, store in a folder."""
    d = shlex.quote(str(mlflow_dir))
    uri = f"http://127.0.0.1:{port}"
    return (f"{BIN / 'python'} -c \"import urllib.request as u; u.urlopen('{uri}/health', timeout=3)\" 2>/dev/null || "
            f"(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup {BIN / 'mlflow'} server --host 127.0.0.1 --port {port} "
            f"--backend-store-uri sqlite:///{mlflow_dir}/mlflow.db --artifacts-destination {d}/artifacts "
            f"--serve-artifacts --workers 1 >> {d}/server.log 2>&1 &)")


def mlflow_uri(ports: Ports) -> str:
    return f"http://127.0.0.1:{ports.mlflow}"


def head_environment(cloud: dict, ports: Ports) -> dict[str, str]:
    """The environment the cloud config gives the head's container (docker run_options `--env`), with
    local values for the MLflow address and the model cache."""
    docker = cloud.get("docker") or {}
    env = {}
    for opt in [*docker.get("run_options", []), *docker.get("head_run_options", [])]:
        m = re.fullmatch(r"\s*(?:--env|-e)[ =](\w+)=(.*)", opt)
        if m:
            env[m.group(1)] = m.group(2).strip()
    env["MLFLOW_TRACKING_URI"] = mlflow_uri(ports)
    env["PCTUNE_CACHE"] = os.environ.get("PCTUNE_CACHE") or str(Path("~/.cache/pctune").expanduser())
    return env


# -- the head node: an sshd on loopback in its own namespaces ------------------------------------------
def unavailable() -> str | None:
    """Why a loopback head cannot run here, or None."""
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (the head is an sshd on 127.0.0.1 logging in as root, in its own PID namespace)"
    for tool, package in (("/usr/sbin/sshd", "openssh-server"), ("rsync", "rsync"), ("nc", "netcat-openbsd"),
                          ("ssh", "openssh-client"), ("ssh-keygen", "openssh-client"), ("unshare", "util-linux")):
        if not shutil.which(tool):
            return f"{tool} not found (apt-get install {package}; `make test-deps` does it)"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a PID namespace for the head (unshare: {probe.stderr.strip()})"
    if not CLOUD_CONFIG.exists():
        return f"{CLOUD_CONFIG} not found"
    return None


class LoopbackHead:
    """An sshd on 127.0.0.1:<port> in new PID and mount namespaces, with HOME and /tmp/ray of its own.

    It plays the cluster's head machine: whatever `ray up`/`ray exec` start over ssh lives in its PID
    namespace, so `ray stop` there sees only this cluster, and killing the sshd (PID 1 there) kills
    all of it."""

    def __init__(self, workdir: Path, port: int, environment: dict[str, str]):
        self.dir = workdir / "head"
        self.home = self.dir / "home"
        self.ray_tmp = self.dir / "ray_tmp"
        self.key = self.dir / "id_ed25519"
        self.port = port
        self.environment = environment
        self.proc: subprocess.Popen | None = None
        self.sshd_pid = 0
        self.pid_namespace: str | None = None

    def start(self) -> None:
        for d in (self.home, self.ray_tmp, RAY_TMP):
            d.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for key in (self.dir / "host_ed25519", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pctune-ray-up-local", "-f", str(key)],
                           check=True)
        (self.dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        # The "node image": Ray, MLflow and pctune on PATH, and the container environment of the cloud config.
        # Every command of the cluster launcher runs `source ~/.bashrc` first.
        exports = {"PATH": f"{BIN}:$PATH", **self.environment}
        (self.home / ".bashrc").write_text("".join(
            f"export {k}={v if k == 'PATH' else shlex.quote(v)}\n" for k, v in exports.items()))
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {self.dir / 'host_ed25519'}", "PidFile none",
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}", "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no",  # the key files live under /tmp (world-writable): StrictModes would refuse them
            f"SetEnv HOME={self.home}", "Subsystem sftp internal-sftp", "",
        ]))
        log = open(self.dir / "sshd.log", "ab")  # noqa: SIM115 (closed in stop)
        inner = f"mount --bind {shlex.quote(str(self.ray_tmp))} {RAY_TMP} && exec /usr/sbin/sshd -D -e -f {config}"
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "private", "--kill-child",
             "sh", "-c", inner], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._log = log
        deadline = time.time() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the head's sshd exited:\n" + (self.dir / "sshd.log").read_text()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError as e:
                if time.time() > deadline:
                    raise RuntimeError("the head's sshd did not listen:\n" + (self.dir / "sshd.log").read_text()) from e
                time.sleep(0.2)
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        self.sshd_pid = int(children[0])  # PID 1 of the namespace
        self.pid_namespace = os.readlink(f"/proc/{self.sshd_pid}/ns/pid")

    def processes(self) -> list[tuple[int, str]]:
        """(pid, name) of every process in the head's PID namespace, as seen from outside."""
        found = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if os.readlink(p / "ns/pid") == self.pid_namespace:
                        found.append((int(p.name), (p / "comm").read_text().strip()))
                except OSError:
                    pass
        return found

    def stop(self) -> None:
        """Kill the sshd and so every process of the head (the namespace's init dies, the kernel kills the rest)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.sshd_pid, signal.SIGKILL)
            self.proc.terminate()  # unshare (--kill-child would also SIGKILL the sshd)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None
        deadline = time.time() + 60  # the kernel kills the namespace's other processes asynchronously
        while self.processes() and time.time() < deadline:
            time.sleep(0.2)


# -- the cluster ---------------------------------------------------------------------------------------
class LocalCluster:
    """The derived config, its head, and the `ray` commands on it. `with LocalCluster(workdir) as c:`
    always ends with `ray down` (if `ray up` ran) and the head's sshd killed."""

    def __init__(self, workdir: Path, cloud_config: Path = CLOUD_CONFIG):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cloud = yaml.safe_load(cloud_config.read_text())
        self.ports = Ports.free()
        self.name = f"pctune-local-{os.getpid()}-{self.ports.gcs}"
        self.head = LoopbackHead(self.workdir, self.ports.ssh, head_environment(self.cloud, self.ports))
        self.config_path = self.workdir / "ray_cluster_local.yaml"
        self.is_up = False
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports.gcs}"

    @property
    def mlflow_uri(self) -> str:
        return mlflow_uri(self.ports)

    def __enter__(self) -> LocalCluster:
        try:
            self.head.start()
            token = self.workdir / "auth_token"
            token_home = self.workdir / "token_home"  # `ray get-auth-token --generate` writes $HOME/.ray/auth_token
            subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True,
                           env={**self.env, "HOME": str(token_home)})
            shutil.copy(token_home / ".ray" / "auth_token", token)
            local = derive_local_config(self.cloud, workdir=self.workdir, ports=self.ports, ssh_key=self.head.key,
                                        auth_token=token, cluster_name=self.name)
            header = (f"# Derived from {CLOUD_CONFIG} by scripts/ray_up_local.py: a one-node local-provider\n"
                      f"# cluster whose head is the sshd on 127.0.0.1:{self.ports.ssh}.\n")
            self.config_path.write_text(header + yaml.safe_dump(local, sort_keys=False, width=200))
        except BaseException:
            self.head.stop()
            raise
        return self

    def ray(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """`ray ARGS...` here (the cluster launcher CLI), output captured and echoed."""
        proc = subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        output = (proc.stdout + proc.stderr).replace("\r\n", "\n")
        with (self.workdir / "ray_commands.log").open("a") as log:
            log.write(f"$ ray {shlex.join(args)}\n{output}\n")
        if check and proc.returncode != 0:
            raise RuntimeError(f"ray {args[0]} failed ({proc.returncode}):\n{output[-4000:]}")
        proc.output = output
        return proc

    def up(self) -> subprocess.CompletedProcess:
        self.is_up = True  # from the first attempt on, teardown runs `ray down`
        result = self.ray("up", "-y", "--no-config-cache", "--disable-usage-stats", str(self.config_path))
        self.wait_for_mlflow()
        return result

    def wait_for_mlflow(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.mlflow_uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                log = self.workdir / "mlflow" / "server.log"
                raise RuntimeError("the head's MLflow server did not answer:\n"
                                   + (log.read_text()[-3000:] if log.exists() else "(no server.log)"))
            time.sleep(1)

    def exec(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.ray("exec", "--no-config-cache", str(self.config_path), command, timeout=timeout)

    def search_demo(self, num_samples: int = 4) -> subprocess.CompletedProcess:
        """`pctune search demo` on the head: the driver joins the cluster, results go to the head's MLflow
        (its resume-state signing key in the work folder, not the user's ~/.config)."""
        runs = self.workdir / "runs"
        config = shlex.quote(str(self.workdir / "config"))
        return self.exec(
            f"cd {shlex.quote(str(REPO))} && XDG_CONFIG_HOME={config} {BIN / 'pctune'} search demo "
            f"--address {self.address} --num-samples {num_samples} --storage-path {shlex.quote(str(runs))} "
            f"--tracking-uri {self.mlflow_uri}")

    def down(self) -> subprocess.CompletedProcess:
        result = self.ray("down", "-y", str(self.config_path))
        self.is_up = False
        return result

    def __exit__(self, *exc) -> None:
        try:
            if self.is_up:
                self.ray("down", "-y", str(self.config_path), check=False, timeout=300)
        finally:
            self.head.stop()
            self._remove_launcher_files()

    def _remove_launcher_files(self) -> None:
        """What the cluster launcher keeps here about this cluster, and only that: its state and lock
        files (named after the cluster), its config cache files (/tmp/ray-config-<hash>, holding this
        cluster's name) and its ssh control socket folder (named after a hash of the cluster's name)."""
        for suffix in ("state", "lock"):
            (RAY_TMP / f"cluster-{self.name}.{suffix}").unlink(missing_ok=True)
        for cache in Path(tempfile.gettempdir()).glob("ray-config-*"):
            with contextlib.suppress(OSError):
                if f'"cluster_name": "{self.name}"' in cache.read_text():
                    cache.unlink()
        control = hashlib.sha256(self.name.encode()).hexdigest()[:10]
        for d in Path("/tmp").glob(f"ray_ssh_*/{control}"):
            shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where everything goes (default: a new temporary folder)")
    parser.add_argument("--num-samples", type=int, default=4, help="trials of the demo search (default 4)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster up until Ctrl-C")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"ray_up_local: {reason}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pctune-ray-up-"))
    with LocalCluster(workdir) as cluster:
        print(f"config: {cluster.config_path} (derived from {CLOUD_CONFIG.name})")
        t = time.time()
        up = cluster.up()
        print(up.output.rstrip())
        print(f"ray up: {time.time() - t:.1f}s; MLflow on the head: {cluster.mlflow_uri}")
        t = time.time()
        print(cluster.search_demo(args.num_samples).output.rstrip())
        print(f"search on the cluster (ray exec): {time.time() - t:.1f}s")
        if args.keep:
            print(f"cluster up; try: {BIN / 'ray'} exec {cluster.config_path} '{BIN / 'ray'} status "
                  f"--address {cluster.address}'\nCtrl-C to tear it down")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        t = time.time()
        print(cluster.down().output.rstrip())
        print(f"ray down: {time.time() - t:.1f}s")
    print(f"everything is in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
