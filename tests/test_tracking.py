"""Issue 15.5: --wandb and --mlflow, offline: one run per training with TensorBoard's hyperparameters and the
training's reported metrics, and one run with the EMM table. W&B's offline runs are read with a reader written
here from the format's definition (LevelDB's log format of W&B's protobuf records), not with wandb's own."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from diffmem.config import ConfigError

SEARCH = str(Path(__file__).resolve().parent.parent / "sweeps" / "emm_search.py")


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte file header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, parts = path.read_bytes(), 32768, 7, []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):   # the rest of a block is padding
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_run(folder: Path) -> dict:
    """name, group, config and the history of each metric of one offline run."""
    run = {"config": {}, "history": {}}
    for record in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["group"] = record.run.display_name, record.run.run_group
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            for item in record.history.item:
                run["history"].setdefault(item.key or "/".join(item.nested_key), []).append(
                    json.loads(item.value_json))
    return run


@pytest.mark.slow
def test_a_grid_point_that_always_fails_is_unresolved_the_other_finishes_and_both_are_tracked_offline(tmp_path):
    """learning_rate 2e-3 (the digits' own) and 1e30 (NaN loss at once) at |D| in [10, 20]: the failing grid point
    is retried, then unresolved with its error, the other finds its EMM; W&B and MLflow hold one run per training
    (the failed ones FAILED, without metrics) and one with the EMM table."""
    from mlflow.tracking import MlflowClient
    out, database = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = subprocess.run([sys.executable, SEARCH, "--preset", "smoke", "--factor", "learning_rate",
                          "--values", "2e-3", "1e30", "--max-failures", "1", "--size-range", "10", "20",
                          "--no-dashboard", "--output", str(out), "--wandb", "diffmem-test", "--mlflow", database],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900,
                         env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    frames = [line for line in (run.stdout + run.stderr).splitlines() if line.strip().startswith('File "')]
    assert "could not log" not in run.stderr and not [f for f in frames if "wandb" in f or "mlflow" in f
                                                        or "sweeps/tracking" in f], run.stderr[-3000:]
    emm = pd.read_csv(out / "emm.csv", dtype={"value": str})
    failing, working = (emm.set_index("value").loc[v] for v in ("1e+30", "0.002"))
    assert failing.censored == "unresolved" and "loss became nan" in failing.error
    assert working.censored != "unresolved" and working.emm > 0
    assert "unresolved: " in (out / "emm.md").read_text()
    trials = pd.read_csv(out / "trials.csv")
    assert set(trials.status) == {"done", "error"}
    best = {(r.grid_label, int(r.size)): r.best_mem_ratio for r in trials.itertuples() if r.status == "done"}

    # MLflow: the sweep's experiment, one run per training with its hyperparameters and metrics, one EMM run
    client = MlflowClient(tracking_uri=database)
    experiment = client.get_experiment_by_name(out.name)
    runs = client.search_runs([experiment.experiment_id])
    trainings = [r for r in runs if r.data.tags.get("diffmem") == "training"]
    assert len(trainings) == len(trials) and len(runs) == len(trials) + 1
    for r in trainings:
        params = r.data.params
        assert set(params) == {"grid point", "train.lr", "D"}, params
        key = (params["grid point"], int(float(params["D"])))
        if key not in best:   # a failed training: its run failed, with nothing measured
            assert r.info.status == "FAILED" and "best_mem_ratio" not in r.data.metrics
            continue
        assert r.info.status == "FINISHED"
        history = client.get_metric_history(r.info.run_id, "best_mem_ratio")
        assert history[-1].value == pytest.approx(best[key]) and history[-1].step == r.data.metrics["images_seen"]
    table_run = next(r for r in runs if r.data.tags.get("diffmem") == "emm")
    assert table_run.info.run_name == "learning_rate EMM"
    for row in emm.itertuples():
        if row.censored != "unresolved":
            assert table_run.data.metrics[f"emm/{row.value}"] == row.emm
    artifacts = {a.path for a in client.list_artifacts(table_run.info.run_id)}
    assert {"emm.csv", "emm.md", "emm.png", "curves.png", "emm_table.json"} <= artifacts

    # W&B: the same, offline, under OUTPUT/wandb
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == len(trials) + 1
    runs = [wandb_run(f) for f in folders]
    assert {r["group"] for r in runs} == {out.name}
    for r in runs:
        if r["name"] == "learning_rate EMM":
            assert r["config"]["factor"] == "learning_rate"
            assert f"emm/{working.name}" in r["history"]
            continue
        key = (r["config"]["grid point"], int(r["config"]["|D|"]))
        assert r["config"]["train.lr"] == float(key[0].split("=")[1]) and "grid_index" not in r["config"]
        if key in best:
            assert r["history"]["best_mem_ratio"][-1] == pytest.approx(best[key])
        else:
            assert "best_mem_ratio" not in r["history"]


def test_a_tracker_that_cannot_run_is_one_line_before_ray_starts(tmp_path, monkeypatch):
    import importlib.util

    from sweeps import tracking
    run = subprocess.run([sys.executable, SEARCH, "--preset", "smoke", "--output", str(tmp_path / "out"),
                          "--mlflow", f"file://{tmp_path}/mlruns"], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: --mlflow file://{tmp_path}/mlruns: ") and "sqlite:///" in run.stderr
    assert not (tmp_path / "out").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^--wandb needs the wandb package; pip install 'diffmem\[tracking\]'"):
        tracking.check({"wandb": "project", "mlflow": None})
