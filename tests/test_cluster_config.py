"""experiments/cluster/a100.yaml: Ray's cluster launcher accepts it (its own config preparation and
ray-schema.json, no SSH), and every node offers the trial_slot a DDP trial takes from the shared environment."""
import copy
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
