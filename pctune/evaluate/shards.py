"""Sharded, resumable evaluation over a Ray cluster.

An evaluation is cut into named shards. Each shard runs as a Ray task (retried on another worker if
its worker dies) and its result is written atomically to ``<out>/shards/<name>.json`` as soon as it
arrives, so an interrupted run, or a lost worker, redoes only the shards that have no file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pctune import localray
from pctune.utils import Log, atomic_write_json, print_line

FAULT_ENV = "PCTUNE_FAULT_SHARD"  # testing hook: "<shard name>:<marker file>" kills the first worker on it


class Named(Protocol):
    @property
    def name(self) -> str: ...


Work = Callable[[Any, Any], dict]


def run_shards(work: Work, payload: Any, shards: Sequence[Named], out_dir: Path, *, use_ray: bool = True,
               num_gpus: float = 0.0, log: Log = print_line, what: str = "evaluation") -> list[dict]:
    """Run ``work(payload, shard)`` for every shard without a result file; return every shard's result
    (in ``shards`` order). ``payload`` is put in the Ray object store once."""
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in shards if not (shard_dir / f"{s.name}.json").is_file()]
    log(f"{what}: {len(shards)} shards, {len(shards) - len(todo)} already done, {len(todo)} to run")
    if todo and use_ray:
        _with_ray(work, payload, todo, shard_dir, num_gpus, log, what)
    else:
        from tqdm.auto import tqdm

        for shard in tqdm(todo, desc=f"{what} shards", disable=not todo):
            write_shard(shard_dir, shard.name, work(payload, shard))
    return [json.loads((shard_dir / f"{s.name}.json").read_text()) for s in shards]


def _with_ray(work: Work, payload: Any, todo: Sequence[Named], shard_dir: Path, num_gpus: float, log,
              what: str) -> None:
    import ray

    if not ray.is_initialized():
        localray.init(os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=3)(_remote)
    payload_ref = ray.put(payload)
    pending = {remote.remote(work, payload_ref, shard): shard for shard in todo}
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        shard = pending.pop(ready[0])
        write_shard(shard_dir, shard.name, ray.get(ready[0]))
        done += 1
        log(f"{what}: shard {done}/{len(todo)} {shard.name} done")


def _remote(work: Work, payload: Any, shard: Named) -> dict:
    import ray
    import torch

    maybe_fail(shard.name)
    torch.set_num_threads(1)
    net = getattr(payload, "net", None)
    if isinstance(net, torch.nn.Module) and torch.cuda.is_available():
        # the task's own copy of the payload (deserialized in this worker): the caller's is untouched
        net.to("cuda")
    return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), **work(payload, shard)}


def write_shard(shard_dir: Path, name: str, result: dict) -> None:
    # a worker's own pid (in ``result``) wins over the driver's
    atomic_write_json(shard_dir / f"{name}.json", {"shard": name, "pid": os.getpid(), **result}, indent=None)


def maybe_fail(name: str) -> None:
    """Testing hook: with ``PCTUNE_FAULT_SHARD=<name>:<marker file>`` the first worker to start that
    shard dies abruptly, as a lost node would."""
    spec = os.environ.get(FAULT_ENV, "")
    if ":" not in spec:
        return
    target, marker = spec.split(":", 1)
    if target == name and not Path(marker).exists():
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)
