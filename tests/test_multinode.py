"""A sweep on a real multi-node Ray cluster (issue 13): a head without `trial_slot` and two worker nodes of one
`trial_slot` and one CPU each, every node its own raylet on this machine (ray.cluster_utils.Cluster, Ray's
means of testing multi-node code on one host), the sweep run through the CLI with --address. The same
scheduling, placement and failure paths as separate machines; the file system is shared by construction."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import SEARCH, assert_smoke_table, resumed_trainings

# The head notices a lost node after health_check_period_ms x failure_threshold (Ray's defaults: 3 s x 5 after
# a first delay): shorter here so the test waits seconds, not half a minute, for what a real cluster also does.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                      "health_check_failure_threshold": 3}
SWEEP = ["--preset", "smoke", "--values", "none"]   # one grid point: a handful of trainings, two at once


@pytest.fixture(scope="module")
def cluster():
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "_system_config": FAST_HEALTH_CHECKS})
    reset_ray_address()   # the sweeps are given --address; nothing else on this machine must join this cluster
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"trial_slot": 1})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _sweep(cluster, out: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SEARCH, *SWEEP, "--address", cluster.address, "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out.parent, **popen)


def _results(trial_dir: Path) -> list[dict]:
    """Every result Tune recorded for one trial, in order."""
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _running_with_checkpoint(out: Path, nodes: dict, proc: subprocess.Popen, timeout: float = 300):
    """(trial folder, node) of a training of the sweep in `out` that saved a checkpoint on one of `nodes` and will
    train on: its last result is not memorized before its planned images (a finished training's checkpoints are
    emptied, sweeps/disk.py). None if there was none before the sweep ended or the timeout."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for trial in sorted(out.glob("tune/*/checkpoint_*")):
            results = _results(trial.parent)
            last = results[-1] if results else {}
            if last.get("train_node_id") in nodes and last["images_seen"] < last["planned_images"] \
                    and last["best_mem_ratio"] < 0.9:
                return trial.parent, nodes[last["train_node_id"]]
        time.sleep(0.2)
    return None


@pytest.mark.slow
def test_trainings_run_on_worker_nodes_at_once_and_a_lost_node_costs_one_a_retry_from_its_checkpoint(
        cluster, smoke_sweep, tmp_path):
    """Every training runs on a worker node (the head offers no trial_slot), both workers train and at once; one
    worker's raylet killed under a training with a checkpoint: it continues on the other node from there, and
    the sweep ends with the EMM of the smoke sweep's grid point on one machine."""
    import time

    from ray._private import ray_constants

    from sweeps.ledger import Ledger
    from sweeps.status import sweep_status
    out = tmp_path / "node-lost"
    proc = _sweep(cluster, out)
    nodes = {node.node_id: node for node in cluster.worker_nodes}

    found = _running_with_checkpoint(out, nodes, proc)
    assert found, "no running training with a checkpoint to take its node away from"
    trial, lost = found
    lost.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.kill()   # the machine is gone
    try:
        deadline = time.time() + 120   # the head notices, Tune retries: the console says so
        while time.time() < deadline and "retry 1 of" not in (out / "sweep.log").read_text():
            time.sleep(0.5)
        status = sweep_status(out)   # what --status says meanwhile
        console, _ = proc.communicate(timeout=600)
    finally:
        cluster.remove_node(lost, allow_graceful=False)   # the rest of its processes
        cluster.add_node(num_cpus=1, resources={"trial_slot": 1})   # a cluster of two workers again for what follows
    assert proc.returncode == 0, console[-3000:]

    # placement: on worker nodes only, both of them, two trainings on different nodes whose spans (first result's
    # start .. last result) overlap
    trials = pd.read_csv(out / "trials.csv")
    trained = trials[trials.status == "done"]
    workers = set(nodes) | {node.node_id for node in cluster.worker_nodes}   # the node added after the loss too
    assert len(trained) >= 2 and trained.train_node_id.notna().all()
    assert set(trained.train_node_id) <= workers, "a training ran on the head, which offers no trial_slot"
    spans = []
    for trial_dir in (out / "tune").iterdir():
        for first, last in [(r[0], r[-1]) for r in [_results(trial_dir)] if r]:
            spans.append((first["train_node_id"], first["timestamp"] - first["time_this_iter_s"], last["timestamp"]))
    assert {node for node, _, _ in spans} >= set(nodes)   # both first workers trained
    assert any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in spans for b in spans), spans
    # the training resumed on the other node from its checkpoint: its images seen never went back
    results = _results(trial)
    assert results[-1]["train_node_id"] != lost.node_id and results[-1]["train_node_id"] in nodes
    seen = [r["images_seen"] for r in results]
    assert seen == sorted(set(seen)), seen
    assert resumed_trainings(out) >= 1
    # the sweep's answer is the undisturbed one
    assert_smoke_table(out, smoke_sweep)
    # nothing lost or trained twice: one Tune trial per training, and the ledger holds each training that ran
    configs = [json.dumps(_results(t)[-1]["config"], sort_keys=True) for t in (out / "tune").iterdir() if _results(t)]
    assert len(configs) == len(set(configs))
    assert len(Ledger(out / "ledger.sqlite")) == (trials.status == "done").sum() == len(configs)
    # the console: one line of ours on the retry, Ray's own two lines on the node, no state dump, no colour codes
    retry = re.search(r"random_labels=none\|D\|=(\d+) failed on node [\d.]+ \((\w{8})\) \(the actor's node was "
                      r"terminated unexpectedly: .*\); retry 1 of 2, from its checkpoint at ([\d,]+) images", console)
    assert retry and lost.node_id.startswith(retry[2]), console[-3000:]
    assert "[state-dump]" not in console and "\x1b[" not in console
    assert "running (" in status   # the retried training is listed as running, at its checkpoint's images


def _node(alive=True, **resources) -> dict:
    return {"Alive": alive, "Resources": resources}


def test_a_training_is_placed_on_one_node_and_a_cluster_that_holds_none_says_what_to_start():
    """What start_ray reads of ray.nodes(): per node, as many trainings as its trial slots and its own GPUs (CPUs)
    allow; a lost node counts nothing."""
    from diffmem.config import ConfigError
    from sweeps.ray_cluster import cluster_capacity
    head, a100 = _node(CPU=8), _node(CPU=96, GPU=8, trial_slot=1)
    assert cluster_capacity([head, a100, a100, _node(False, CPU=96, GPU=8, trial_slot=1)], 8, 1) == 2
    assert cluster_capacity([head, a100], 4, 1) == 1                  # one slot: one training, whatever its GPUs
    assert cluster_capacity([_node(CPU=2, trial_slot=2)], 1, 0) == 2  # a local cluster: one slot per core
    assert cluster_capacity([_node(CPU=2, trial_slot=1)], 2, 0) == 1
    # 16 GPUs in all, but no node holds a training of 16
    with pytest.raises(ConfigError, match=r"^--gpus-per-trial 16 but the largest node with a trial_slot has 8 GPUs "
                                          r"and a training runs on one node; use --gpus-per-trial <= 8, or add"):
        cluster_capacity([head, a100, a100], 16, 1)
    with pytest.raises(ConfigError, match=r"^--workers-per-trial 2 but the largest node with a trial_slot has 1 "
                                          r"CPU .*; use --workers-per-trial <= 1"):
        cluster_capacity([_node(CPU=1, trial_slot=1), _node(CPU=1, trial_slot=1)], 2, 0)
    with pytest.raises(ConfigError, match=r"has 0 GPUs and a training runs on one node; add nodes with 1 GPU and a "):
        cluster_capacity([_node(CPU=4, trial_slot=1)], 1, 1)
    with pytest.raises(ConfigError, match=r"^no node of the cluster offers a trial_slot.*--resources='"):
        cluster_capacity([head, _node(False, CPU=96, GPU=8, trial_slot=1)], 8, 1)


def test_an_autoscaling_cluster_holds_the_trainings_its_launcher_may_start():
    """aws-a100.yaml starts no worker until trainings wait (min_workers 0): as the config the launcher leaves on the
    head says, the head alone holds 8 trainings of 8 GPUs, the workers up now counted once among them."""
    from diffmem.config import ConfigError
    from sweeps.ray_cluster import HEAD, cluster_capacity, launcher_nodes
    aws = Path(__file__).resolve().parent.parent / "experiments" / "cluster" / "aws-a100.yaml"
    may_start = launcher_nodes(str(aws))
    assert may_start == [{"CPU": 96, "GPU": 8, "trial_slot": 1}] * 8 and launcher_nodes("/nonexistent.yaml") == []
    head, a100 = _node(CPU=8, **{HEAD: 1}), _node(CPU=96, GPU=8, trial_slot=1)
    with pytest.raises(ConfigError, match="no node of the cluster offers a trial_slot"):
        cluster_capacity([head], 8, 1)                                   # without the launcher's word
    assert cluster_capacity([head], 8, 1, may_start) == 8
    assert cluster_capacity([head, a100, a100], 8, 1, may_start) == 8
    assert cluster_capacity([head], 4, 1, may_start) == 8            # one slot a node
    with pytest.raises(ConfigError, match="--gpus-per-trial 16 but the largest node with a trial_slot has 8 GPUs"):
        cluster_capacity([head], 16, 1, may_start)


@pytest.mark.slow
def test_a_lost_head_ends_the_driver_and_resume_continues_on_another_cluster(cluster, smoke_sweep, tmp_path):
    """The head holds the cluster's state (GCS): without it the driver cannot go on. It exits once it has failed to
    reach the head for gcs_rpc_server_reconnect_timeout_s (Ray's default 60 s; 5 s here), and --resume with the
    --address of a new cluster continues the sweep from its folder: the training in flight from its checkpoint.
    Before its worker node joins, the same cluster shows how a sweep meets a cluster that can never place one of
    its trainings: one line naming the fix, exit 2, within a minute, nothing trained."""
    import time

    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster
    doomed = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {**FAST_HEALTH_CHECKS, "gcs_rpc_server_reconnect_timeout_s": 5}})
    reset_ray_address()
    gpu_node = None
    for extra, words in [([], "no node of the cluster offers a trial_slot"),
                         (["--gpus-per-trial", "2"], "--gpus-per-trial 2 but the largest node with a trial_slot has "
                                                     "1 GPU and a training runs on one node")]:
        if extra:   # a worker node with a slot and (as Ray is told) one GPU
            gpu_node = doomed.add_node(num_cpus=1, num_gpus=1, resources={"trial_slot": 1})
            doomed.wait_for_nodes()
        began = time.time()
        refused = subprocess.run([sys.executable, SEARCH, *SWEEP, "--address", doomed.address, *extra, "--output",
                                  str(tmp_path / "refused")], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and time.time() - began < 60, refused.stderr[-2000:]
        *joining, last = refused.stderr.splitlines()   # before it, only Ray's own lines of joining the cluster
        assert last.startswith(f"error: {words}") and all("\tINFO " in line for line in joining), refused.stderr
        assert not (tmp_path / "refused").exists()   # nothing written: the same command runs once the cluster is fixed
    doomed.remove_node(gpu_node)
    worker = doomed.add_node(num_cpus=1, resources={"trial_slot": 1})
    doomed.wait_for_nodes()
    out = tmp_path / "head-lost"
    proc = _sweep(doomed, out)
    try:
        assert _running_with_checkpoint(out, {worker.node_id: worker}, proc), "no training in flight with a checkpoint"
        doomed.remove_node(doomed.head_node, allow_graceful=False)   # GCS, the head's raylet and agents
        lost_at = time.time()
        console, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and time.time() - lost_at < 60, console[-3000:]
    finally:
        doomed.remove_node(worker, allow_graceful=False)
    resumed = subprocess.run([sys.executable, SEARCH, "--resume", str(out), "--address", cluster.address],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert_smoke_table(out, smoke_sweep)
    assert resumed_trainings(out) >= 1   # the training in flight went on from its checkpoint, not from step 0
