"""The Ray cluster a sweep runs on: checks before anything is written (this machine's capacity, an --address
that answers), and starting a local cluster (loopback only, quiet, reaped if the driver dies) or joining one.
Used by emm_search.py and explore.py."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from diffmem.config import ConfigError

# The cluster launcher's config on the head of a cluster it started (what Ray Tune reads to tell an autoscaling
# cluster, ray.tune.execution.cluster_info), and the resource Ray gives the head node alone
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
HEAD = "node:__internal_head__"


def check_local_capacity(gpus_per_trial: int, workers_per_trial: int) -> None:
    """This machine holds one training of the requested size, or the sweep could never place a trial."""
    if gpus_per_trial:
        import torch
        have = torch.cuda.device_count()
        if have < gpus_per_trial:
            raise ConfigError(f"--gpus-per-trial {gpus_per_trial} but this machine has {have} GPU"
                              f"{'s' * (have != 1)}; leave --gpus-per-trial out to train on CPU, or pass --address "
                              f"of a cluster with GPUs")
    elif workers_per_trial > (os.cpu_count() or 1):
        raise ConfigError(f"--workers-per-trial {workers_per_trial} needs {workers_per_trial} CPUs per training but "
                          f"this machine has {os.cpu_count()}; use --workers-per-trial <= {os.cpu_count()}, or "
                          f"pass --address of a larger cluster")


def check_address(address: str | None) -> None:
    """--address names a cluster that answers, before anything is written: 'auto' is resolved as ray.init resolves
    it (RAY_ADDRESS, then the cluster `ray start` recorded on this machine; Ray 2.60's own function), and the
    host:port must accept a connection (a closed port otherwise makes ray.init retry for minutes). What only
    ray.init can tell (a wrong Ray version, ...) start_ray turns into one line."""
    if not address or "://" in address:
        return
    given = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die
        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as e:
            raise ConfigError(f"--address auto found no Ray cluster on this machine ({str(e).split('.')[0]}); start "
                              f"one with `ray start --head`, or leave --address out for a local one") from None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address} is not host:port (e.g. 10.0.0.1:6379) or 'auto'")
    import socket
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        where = given if given == address else f"{given} = {address}"
        raise ConfigError(f"no Ray cluster answers at --address {where} ({why}); start one there with "
                          f"`ray start --head --port={port}`, or leave --address out for a local one") from None


def local_slots(workers: int, gpus_per_worker: int) -> int:
    """How many trainings of `workers` workers this machine holds at once (its GPUs or its cores)."""
    if gpus_per_worker:
        import torch
        return max(1, torch.cuda.device_count() // workers)
    return max(1, (os.cpu_count() or 1) // workers)


def trials_at_once(max_concurrent: int | None, capacity: int) -> int:
    """--max-concurrent, at most what the cluster holds (slots x pack size), at least one."""
    return max(1, min(max_concurrent or capacity, capacity))


def loopback_only() -> None:
    """Have the local cluster about to start listen on 127.0.0.1 only, as Ray 2.60 does on macOS and Windows.

    On Linux Ray takes the machine's address as the node's (ray.init turns _node_ip_address="127.0.0.1" into it,
    services.resolve_ip_for_localhost) and its servers listen there or on all interfaces: GCS, raylet, object
    manager, every worker's gRPC server, the dashboard agent and the runtime-env agent. With
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (ray/_private/ray_constants.py ENABLE_RAY_CLUSTER) the node's address
    is 127.0.0.1 (services.get_node_ip_address) and every one of them binds there
    (tests/test_bad_input.py::test_a_local_sweeps_ray_listens_on_loopback_only). The constant is read when
    ray_constants is imported, so it is set both in the environment (the processes Ray starts) and in the
    imported module. A cluster (--address) is left as its `ray start` made it."""
    from ray._private import ray_constants
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


class _Drop(logging.Filter):
    def __init__(self, starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_ray_start() -> None:
    """A local Ray's start says two things the sweep says once itself, in its own line (start_ray): the dashboard
    address and that token authentication is on (Ray logs that warning on every start, then the address)."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _Drop("Token authentication is enabled"))
    logging.getLogger("ray._private.worker").addFilter(_Drop("Started a local Ray instance"))


def token_auth_hint() -> str:
    """Why a cluster that answers may still refuse the driver, where that is likely: Ray 2.60's `ray start --head`
    turns token authentication on when ~/.ray/auth_token exists (and RAY_AUTH_MODE is unset), while ray.init
    with an explicit address sends the token only with RAY_AUTH_MODE=token. Setting it here for every cluster is
    no fix: a driver in token mode also refuses the calls of a cluster without authentication."""
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR, _get_default_token_path
    token = _get_default_token_path()
    if AUTH_MODE_ENV_VAR in os.environ or not token.is_file():
        return ""
    return f" (a head started by `ray start --head` where {token} exists expects that token: set RAY_AUTH_MODE=token)"


def start_ray(address: str | None, dashboard: bool, workers: int = 1, gpus_per_worker: int = 0, ddp: bool = False,
              max_concurrent: int | None = None, pack_size: int = 1) -> int:
    """Connect to the cluster at `address` or start a local one; returns how many trainings of `workers` workers
    (each with `gpus_per_worker` GPUs, as DDP through Ray Train if `ddp`) run at once: at most max_concurrent,
    `pack_size` to a slot."""
    # Tune's new console output prints its banner whatever the verbosity: "Number of trials 9223372036854775807"
    # (our searcher's unbounded num_samples) and a TensorBoard command into /tmp/ray. Its legacy reporter prints
    # nothing at verbose=0; the sweep's own lines (ProgressPrinter) say what happens.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # the dashboard's Train tab answers 500 without it (Ray 2.60): DDP trainings' runs and workers listed there
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")   # Ray's messages on the console (a lost node) without colour codes
    # Tune's last word, where it wrote its state (OUTPUT/tune, or the --storage URI): the sweep says where its
    # results are in its own closing line
    logging.getLogger("ray.tune.tune").addFilter(_Drop("Wrote the latest version of all result files"))
    import ray
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:   # no cluster, a wrong version, a bad address
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"cannot connect to the Ray cluster at --address {address}: {reason}"
                              f"{token_auth_hint()}; start one with `ray start --head`, or leave --address out "
                              f"for a local one") from None
    else:
        loopback_only()
        quiet_ray_start()
        from sweeps.reaper import start_reaper
        start_reaper()   # first: a driver killed while Ray starts must not leave Ray's agents running
        slots = local_slots(workers, gpus_per_worker)
        # "local": a new cluster even where `ray start` (or a test's cluster) recorded one in /tmp/ray, which a
        # plain ray.init() would join, and refuse for its num_cpus
        context = ray.init(address="local", num_cpus=os.cpu_count() or 1,
                           resources={"trial_slot": slots, "pack_member": slots * pack_size},
                           include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=False)
        if dashboard:
            url = context.dashboard_url or "127.0.0.1:8265"
            print(f"Ray dashboard: http://{url}  (token auth: header 'Authorization: Bearer' + "
                  f"~/.ray/auth_token, or start with RAY_AUTH_MODE=disabled)")
    return trials_at_once(max_concurrent, cluster_capacity(ray.nodes(), workers, gpus_per_worker,
                                                            launcher_nodes() if address else []) * pack_size)


def cluster_capacity(nodes: list[dict], workers: int, gpus_per_worker: int, launcher: list[dict] = ()) -> int:
    """How many trainings of `workers` workers the cluster holds at once: a training takes a node's `trial_slot`
    (trial_resources) and runs on that node, so each node holds as many as its slots and its own GPUs (or CPUs)
    allow. `nodes` are ray.nodes(); `launcher`, the worker nodes an autoscaling cluster may start (launcher_nodes),
    counted beside the head instead of the workers up now. None: one line naming the fix, before anything waits
    on a placement that can never happen."""
    live = [n["Resources"] for n in nodes if n.get("Alive", True)]
    kind, need = ("GPU", workers * gpus_per_worker) if gpus_per_worker else ("CPU", workers)

    def held(resources: list[dict]) -> int:
        return sum(min(int(r.get("trial_slot", 0)), int(r.get(kind, 0)) // need) for r in resources)

    capacity = max(held(live), held([r for r in live if HEAD in r] + list(launcher)) if launcher else 0)
    if capacity >= 1:
        return capacity
    slotted = [r for r in live + list(launcher) if r.get("trial_slot", 0) >= 1]
    if not slotted:
        raise ConfigError("no node of the cluster offers a trial_slot, which every training takes; start its worker "
                          "nodes with --resources='{\"trial_slot\": 1}' (experiments/cluster/)")
    largest = max(int(r.get(kind, 0)) for r in slotted)
    flag = "--gpus-per-trial" if gpus_per_worker else "--workers-per-trial"
    fix = f"use {flag} <= {largest}, or add" if largest else "add"
    raise ConfigError(f"{flag} {need} but the largest node with a trial_slot has {largest} {kind}"
                      f"{'s' * (largest != 1)} and a training runs on one node; {fix} nodes with {need} {kind}"
                      f"{'s' * (need != 1)} and a trial_slot")


def launcher_nodes(path: str = LAUNCHER_CONFIG) -> list[dict]:
    """The worker nodes the cluster launcher's autoscaler may start (each type max_workers times, with the
    resources its config gives), read from the config it leaves on the head; [] elsewhere. An autoscaling
    cluster may have no worker up when the sweep starts (aws-a100.yaml: min_workers 0): its trainings wait,
    and the autoscaler starts nodes for them."""
    import yaml
    file = Path(path).expanduser()
    if not file.is_file():
        return []
    config = yaml.safe_load(file.read_text()) or {}
    head = config.get("head_node_type")
    return [dict(t.get("resources") or {}) for name, t in (config.get("available_node_types") or {}).items()
            if name != head for _ in range(int(t.get("max_workers", config.get("max_workers", 0))))]


def metrics_url() -> str | None:
    """Where the driver's node serves its metrics (ray.util.metrics, sweeps.progress.SweepMetrics) for Prometheus;
    None where Ray does not say."""
    import ray
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == here), {})
    if not node.get("MetricsExportPort"):
        return None
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def trial_resources(ddp: bool, pack_size: int = 1) -> dict:
    """What one Tune trial reserves. Every training takes one `trial_slot`, the custom resource a node offers once
    per training it can hold (a local cluster: one per core or GPU group; a cluster: one per node, and a node
    started without one, such as the AWS and KubeRay heads, gets no training). A DDP trial is a light driver
    whose Ray Train workers hold the CPUs/GPUs (sweeps/trainable.py); a packed trial is a light client of a pack
    server, which holds the CPU (sweeps/packing.py, local sweeps only); a one-worker trial trains in its own
    process on one CPU."""
    if ddp:
        return {"cpu": 0, "trial_slot": 1}
    if pack_size > 1:
        return {"cpu": 0, "pack_member": 1}
    return {"cpu": 1, "trial_slot": 1}
