"""A real ``mlflow server`` on a free loopback port with a SQLite backend, for the tests."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(directory, port=None):
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{port}"
    log = open(directory / "server.log", "a")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
         "--artifacts-destination", str(directory / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        # no background job runners (seven huey processes): the tests need only the tracking API and UI
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (directory / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
