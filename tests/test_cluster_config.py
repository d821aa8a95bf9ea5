"""experiments/cluster/: the on-premise (a100.yaml) and AWS (aws-a100.yaml) cluster-launcher configs pass Ray's own
config preparation and ray-schema.json (no SSH, no cloud), the KubeRay RayCluster (kuberay.yaml) Ray's own
translation of it, and each offers the trial_slot every training takes on its GPU nodes; slurm.sh starts a Ray
cluster in an allocation and runs a sweep on it."""
import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "experiments" / "cluster" / "a100.yaml"
SLOT = """--resources='{"trial_slot": 1}'"""


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def test_ray_accepts_the_cluster_config(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config
    prepared = prepare_config(copy.deepcopy(cluster))   # what `ray up` does before it connects anywhere
    validate_config(prepared)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(cluster["provider"]["worker_ips"])


def test_a_misspelt_key_would_be_caught(cluster):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config
    with pytest.raises(jsonschema.ValidationError, match="worker_start_commands"):
        validate_config(prepare_config({**copy.deepcopy(cluster), "worker_start_commands": []}))


def test_every_node_offers_one_trial_slot_from_the_shared_environment(cluster):
    for key, role in [("head_start_ray_commands", "--head"), ("worker_start_ray_commands", "--address=$RAY_HEAD_IP")]:
        start = [c for c in cluster[key] if " start " in c]
        assert len(start) == 1 and SLOT in start[0] and role in start[0]
        assert all(c.split("; ")[-1].startswith("/mnt/shared/diffmem/.venv/bin/ray ") for c in cluster[key])
    assert any("pip install" in c and "/mnt/shared/diffmem" in c for c in cluster["head_setup_commands"])


def test_the_aws_config_passes_rays_checks_and_only_its_gpu_workers_offer_a_trial_slot():
    from ray.autoscaler._private.util import prepare_config, validate_config
    prepared = prepare_config(yaml.safe_load((CLUSTER.parent / "aws-a100.yaml").read_text()))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert "trial_slot" not in types[prepared["head_node_type"]]["resources"]   # the driver's node trains nothing
    assert types["a100"]["resources"] == {"CPU": 96, "GPU": 8, "trial_slot": 1}
    assert types["a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"      # 8x A100
    assert all("/mnt/shared/diffmem/.venv/bin/ray " in c for c in prepared["worker_start_ray_commands"])


def test_the_kuberay_cluster_reads_as_rays_autoscaler_reads_it():
    """Ray's own translation of a RayCluster (what its autoscaler does with the CR, ray-schema.json included)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    cr = yaml.safe_load((CLUSTER.parent / "kuberay.yaml").read_text())
    types = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(cr))["available_node_types"]
    head, workers = types.pop("headgroup"), types.pop("a100")
    assert not types and head["resources"]["CPU"] == 0 and "trial_slot" not in head["resources"]
    assert workers["resources"]["GPU"] == 8 and workers["resources"]["trial_slot"] == 1
    broken = copy.deepcopy(cr)   # a slot written as plain JSON is not what KubeRay's rayStartParams take
    broken["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '{"trial_slot": 1}'
    with pytest.raises(ValueError):   # json.JSONDecodeError
        _derive_autoscaling_config_from_ray_cr(broken)


def test_a_refused_driver_is_told_of_token_authentication_where_it_is_likely(tmp_path, monkeypatch):
    """`ray start --head` turns token authentication on where ~/.ray/auth_token exists; ray.init with an address
    sends the token only with RAY_AUTH_MODE=token (Ray 2.60): the one-line error says so where it applies."""
    from sweeps.ray_cluster import token_auth_hint
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert token_auth_hint() == ""   # no token here: the head has none either
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 64)
    assert "set RAY_AUTH_MODE=token" in token_auth_hint() and str(tmp_path / ".ray" / "auth_token") in token_auth_hint()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")   # the user chose
    assert token_auth_hint() == ""


SLURM = ROOT / "experiments" / "cluster" / "slurm.sh"
FAKE_SRUN = """#!/bin/bash
# srun on one host: srun's options dropped, the command run here
while [[ $# -gt 0 && $1 == -* ]]; do
  if [[ $1 == -w ]]; then shift; fi
  shift
done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && printf 'node1\\nnode2\\nnode3\\n'
"""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_slurm_script_starts_one_ray_node_per_allocated_node_and_runs_the_sweep(tmp_path):
    """experiments/cluster/slurm.sh as sbatch would run it on a 3-node allocation: SLURM's environment set here,
    srun and scontrol standing in for SLURM's on this one host (the three nodes' Ray start here); the Ray
    start-up, the sweep and the stop are the script's own."""
    import os
    import subprocess
    import sys
    import tempfile

    import pandas as pd
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")   # this cluster's sessions and address file (short: sockets)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-3]",
           "SLURM_GPUS_ON_NODE": "0", "SLURM_CPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(ROOT),
           "DIFFMEM_PYTHON": sys.executable, "DIFFMEM_RAY_PORT": str(port), "RAY_TMPDIR": ray_tmp}
    out = tmp_path / "out"
    try:
        run = subprocess.run(["bash", str(SLURM), "--preset", "smoke", "--values", "none", "--size-range", "10", "20",
                              "--output", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
        assert re.search(r"Ray cluster of 3 nodes at [\d.]+:\d+ \(node1 node2 node3\), 0 GPUs and 1 CPUs each",
                         run.stdout), run.stdout
        trials = pd.read_csv(out / "trials.csv")
        assert len(trials) == 2 and trials.train_node_id.nunique() == 2   # two trainings at once, a node each
        assert (out / "emm.csv").is_file()
        left = [pid for pid in os.listdir("/proc") if pid.isdigit() and f":{port}" in _cmdline(pid)]
        assert not left, f"Ray processes of the allocation left after the script: {left}"
    finally:
        import shutil
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cmdline(pid: str) -> str:
    try:
        return (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
