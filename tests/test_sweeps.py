"""The sweep layer: factor registry, --estimate, real Ray Tune / Ray Train runs (bad input: test_bad_input.py)."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from diffmem.config import ConfigError, load_config
from sweeps.factors import FACTORS, get_factor, grid_points, skip_mask
from conftest import assert_smoke_table

ROOT = Path(__file__).resolve().parent.parent
SEARCH = str(ROOT / "sweeps" / "emm_search.py")
DIGITS = str(ROOT / "experiments" / "digits.yaml")


def test_every_factor_of_the_paper_is_registered():
    assert {"data_size", "width", "depth", "time_embedding", "skip_connections", "class_labels", "random_labels",
            "num_classes", "resolution", "epochs", "batch_size", "weight_decay", "ema"} <= set(FACTORS)


def test_factor_values_become_config_overrides_that_load():
    base = load_config(DIGITS)
    points = grid_points(get_factor("random_labels"), ["none", 1, 10, "unique"], base)
    assert [p["label"] for p in points] == ["random_labels=none", "random_labels=1", "random_labels=10",
                                            "random_labels=unique"]
    assert points[2]["overrides"] == {"data.labels": "random", "data.label_classes": 10}
    batch = grid_points(get_factor("batch_size"), [128], base)[0]["overrides"]
    assert batch["train.lr"] == pytest.approx(base.train.lr * 128 / base.train.batch_size)   # paper Table 1 scaling
    import yaml
    digits_grid = yaml.safe_load(open(DIGITS))["sweep"]["factors"]
    # mix_rate mixes RGB images into one class: no digits grid; experiments/paper/intra_class_diversity.yaml
    assert set(FACTORS) - set(digits_grid) == {"mix_rate"}
    for name, values in digits_grid.items():   # every value of the digits grid yields a config that loads
        for point in grid_points(FACTORS[name], values, base):
            load_config(DIGITS, point["overrides"])


def test_skip_masks_follow_the_papers_numbering():
    paper = load_config(None, {"data.resolution": 32})   # 3 levels x 3 skips: 32, 16, 8
    assert skip_mask("single:1", paper) == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert skip_mask("level:16", paper) == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert skip_mask("101000000", paper) == [1, 0, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ConfigError, match="'single:1'..'single:9'"):
        skip_mask("single:10", paper)


def test_unknown_factor_and_value():
    with pytest.raises(ConfigError, match="unknown factor 'widht'; did you mean 'width'"):
        get_factor("widht")
    with pytest.raises(ConfigError, match="random_labels value 'ten' must be"):
        grid_points(get_factor("random_labels"), ["ten"], load_config(DIGITS))


def _search(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, SEARCH, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_list_factors():
    run = _search("--list-factors")
    assert run.returncode == 0
    assert "random_labels" in run.stdout and "this config: ['none', 1, 4, 16, 'unique']" in run.stdout


def _ray_sessions() -> set[Path]:
    import tempfile
    return set(Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray").glob("session_2*"))


def test_estimate_prints_the_cost_and_starts_nothing(tmp_path):
    """--estimate: the searcher simulated and training steps timed on this machine (~10 s on 2 cores), no Ray, no
    output folder (neither --output nor the default results/ under the working directory)."""
    sessions = _ray_sessions()
    run = _search("--estimate", "--preset", "smoke", "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    first = run.stdout.splitlines()[0]
    # the smoke preset: random_labels none and unique, |D| in [10, 80], 16 kimg per training
    assert re.fullmatch(r"estimate: random_labels, 2 grid points, \d+ trainings? at once: (\d+) trainings \(median\) "
                        r"/ (\d+) \(worst\), <= [\d.]+k training images, measured [\d.k-]+ images/s on cpu "
                        r"\(\+ evaluation [\d.-]+ s per snapshot\): ~\d+ (s|min) wall, [\d.]+ core-hours "
                        r"\(worst ~\d+ (s|min), [\d.]+\)", first), first
    median, worst = map(int, re.search(r"(\d+) trainings \(median\) / (\d+)", first).groups())
    assert 2 <= median <= worst <= 2 * 8    # at least one training per grid point, at most every allowed size
    assert "an upper bound: early stopping" in run.stdout and "1 thread per worker" in run.stdout
    assert "not counted: Ray's start and stop" in run.stdout and "bench/sweep.py measures them" in run.stdout
    assert _ray_sessions() == sessions          # no Ray started (each start makes a session folder)
    assert "estimate: timing random_labels=none's model" in run.stderr   # not silent while it measures (15.2)
    assert list(tmp_path.iterdir()) == []   # nothing written

    # a curve (sweeps/curve.py): every size once, to its end, one model timed
    run = _search("--estimate", "--preset", "smoke", "--factor", "data_size", "--values", "10", "20", "30",
                  "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.match(r"estimate: data_size, 3 sizes, \d+ trainings? at once: 3 trainings, ", run.stdout), run.stdout
    assert "(a curve trains every size to its end)" in run.stdout and "early stopping" not in run.stdout
    assert run.stderr.count("estimate: timing data_size's model") == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smoke_sweep_end_to_end_through_ray_tune(smoke_sweep):
    out, stdout, _ = smoke_sweep
    for name in ("emm.csv", "trials.csv", "emm.md", "emm.png", "curves.png", "sweep.json"):
        assert (out / name).stat().st_size > 0, name
    emm = pd.read_csv(out / "emm.csv")
    assert list(emm.value) == ["none", "unique"]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == emm.trainings.sum() and trials.best_mem_ratio.between(0, 1).all()
    # every best ratio with its 95 % interval, in trials.csv and on the console
    assert (trials.best_mem_ratio_low <= trials.best_mem_ratio).all()
    assert (trials.best_mem_ratio <= trials.best_mem_ratio_high).all()
    assert re.search(r"best ratio \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]: (not )?memorized", stdout), stdout[-2000:]
    # the bracket is consistent with what was measured
    for _, row in emm.iterrows():
        mine = trials[trials.grid_label == f"random_labels={row.value}"]
        if row.emm == row.emm:
            assert mine[mine["size"] == row.emm].memorized.all()
        if row.high == row.high:
            assert not mine[mine["size"] == row.high].memorized.any()
    # unique labels memorize at least as much as none (paper Fig. 5); on 16 kimg the gap is clear
    emm_of = dict(zip(emm.value, emm.emm.fillna(0)))
    assert emm_of["unique"] >= emm_of["none"]
    assert "| none |" in stdout and "| unique |" in stdout
    assert list((out / "tensorboard").iterdir())   # per-trial TensorBoard logs
    # every training finished: none keeps a checkpoint (issue 15.8), while Tune's record of each trial stays
    assert list(out.glob("tune/*/result.json")) and not list(out.glob("tune/*/checkpoint_*/*"))
    # the console says nothing false (issue 15.4): no trial count of 2**63 - 1, TensorBoard pointed at the sweep's own
    assert "Number of trials" not in stdout and "driver_artifacts" not in stdout, stdout[:3000]
    assert "Wrote the latest version" not in stdout, stdout[-3000:]   # Tune's INFO line at the end
    assert f"TensorBoard: tensorboard --logdir {out.resolve() / 'tensorboard'}" in stdout
    log = (out / "sweep.log").read_text()     # the console transcript, kept (issue 15.2)
    assert "sweep random_labels over" in log and "best ratio" in log and "| unique |" in log


@pytest.mark.slow
def test_a_repeated_sweep_reuses_the_ledger_and_trains_nothing(smoke_sweep, tmp_path):
    out = tmp_path / "again"
    run = _search("--preset", "smoke", "--no-dashboard", "--output", str(out),
                  "--ledger", str(smoke_sweep[0] / "ledger.sqlite"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    again, first = pd.read_csv(out / "emm.csv"), pd.read_csv(smoke_sweep[0] / "emm.csv")
    columns = ["value", "emm", "high", "censored"]
    pd.testing.assert_frame_equal(again[columns], first[columns])
    # the searcher replays its bisection on the ledger: every size it asks for was trained by the first
    # sweep (which may have trained more: parallel k-section probes), and nothing is trained again
    assert (again.trainings == 0).all() and (again.from_ledger >= 1).all()
    assert (again.from_ledger <= first.trainings).all()
    from_ledger = pd.read_csv(out / "trials.csv")
    assert set(from_ledger.status) == {"from_ledger"}
    trained = set(zip(*pd.read_csv(smoke_sweep[0] / "trials.csv")[["grid_label", "size"]].values.T))
    assert set(zip(from_ledger.grid_label, from_ledger["size"])) <= trained


@pytest.mark.slow
def test_killed_driver_leaves_no_ray_behind_and_its_moved_folder_resumes_without_retraining(smoke_sweep, tmp_path):
    """kill -9 of the driver (a crash, no clean-up): Ray's processes and the trainings' temporary folders go with
    it. The folder, moved elsewhere, resumes there to the uninterrupted sweep's table with no training run twice."""
    import os
    import shutil
    import signal

    from sweeps.ledger import Ledger
    from sweeps.reaper import _stat, descendants
    out = tmp_path / "killed"
    # one grid point of the smoke sweep: what a kill and a move do to a sweep does not depend on how many it has
    proc = subprocess.Popen([sys.executable, SEARCH, "--preset", "smoke", "--values", "none", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    for line in proc.stdout:
        if "best ratio" in line:
            break
    ray_processes = descendants(proc.pid)
    assert any(_stat(p) for p in ray_processes)
    os.kill(proc.pid, signal.SIGKILL)                       # no Ctrl-C, no cleanup: a crashed driver
    proc.wait()
    finished_before = len(Ledger(out / "ledger.sqlite"))
    deadline = time.time() + 60
    while time.time() < deadline and any((st := _stat(p)) and st[1] == s for p, s in ray_processes.items()):
        time.sleep(1)
    left = [p for p, s in ray_processes.items() if (st := _stat(p)) and st[1] == s]
    assert not left, f"Ray processes left after the driver was killed: {left}"
    # nor the temporary folders of the trainings it was running (the reaper removes them; issue 15.8)
    deadline = time.time() + 10
    while time.time() < deadline and (kept := [p for p in map(str, ray_processes) if _run_dirs_of(p)]):
        time.sleep(0.5)
    assert not kept, f"temporary folders of killed trainings left: {[_run_dirs_of(p) for p in kept]}"

    # The folder, then moved (as off a cluster's scratch disk), resumes where it now is to the uninterrupted
    # sweep's table, and nothing is written where it was.
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    run = _search("--resume", str(moved), "--no-dashboard", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"sweep folder moved from {out}" in run.stdout and not out.exists()
    assert (moved / "tensorboard" / "summary").is_dir()
    out = moved
    assert_smoke_table(out, smoke_sweep)
    resumed, whole = pd.read_csv(out / "emm.csv"), pd.read_csv(smoke_sweep[0] / "emm.csv").query("value == 'none'")
    # No training ran twice: every one finished before the kill still has a single TensorBoard run. The count
    # itself may differ from the uninterrupted sweep's by the extra k-section probes the searcher launches when
    # slots happen to be free: that depends on timing.
    trials = pd.read_csv(out / "trials.csv")
    assert not trials.duplicated(["grid_label", "size"]).any()
    assert len(trials) == resumed.trainings.sum() + resumed.from_ledger.sum()
    assert abs(resumed.trainings.sum() - whole.trainings.sum()) <= 2   # smoke: 2 concurrent trials
    assert finished_before >= 1 and len(Ledger(out / "ledger.sqlite")) == len(trials)
    for logdir in (out / "tensorboard").glob("*/D=*"):
        assert len(list(logdir.glob("events.*"))) <= 2      # a training in flight at the kill resumed once


def _run_dirs_of(pid: str) -> list[Path]:
    import tempfile
    return list(Path(tempfile.gettempdir()).glob(f"diffmem-*-{pid}-*"))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_a_driver_killed_while_ray_starts_leaves_no_ray_behind(tmp_path):
    """kill -9 of the driver as soon as Ray's first process exists: the reaper, started before Ray, ends them."""
    import os
    import signal

    from sweeps.reaper import _stat, descendants
    proc = subprocess.Popen([sys.executable, SEARCH, "--preset", "smoke", "--output", str(tmp_path / "s")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline, ray_processes = time.time() + 120, {}
    while time.time() < deadline and not ray_processes:
        ray_processes = {p: s for p, s in descendants(proc.pid).items()
                         if "ray" in _cmdline(p) and "sweeps.reaper" not in _cmdline(p)}
        time.sleep(0.05)
    assert ray_processes, "Ray never started"
    time.sleep(1.0)                                          # the reaper has seen them (it polls every 0.5 s)
    seen = {**ray_processes, **descendants(proc.pid)}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any((st := _stat(p)) and st[1] == s for p, s in seen.items()):
        time.sleep(1)
    left = [p for p, s in seen.items() if (st := _stat(p)) and st[1] == s]
    assert not left, f"Ray processes left after the driver was killed during start-up: {left}"


def test_a_killed_trainings_temporary_folder_is_removed_by_the_next_training(tmp_path):
    """Issue 15.8: a trial killed with SIGKILL leaves its diffmem-<kind>-<pid>-* folder; the next one removes it."""
    import os

    from sweeps.disk import remove_orphaned_run_dirs
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"diffmem-trial-{int(dead.stdout)}-x1_y"
    mine = tmp_path / f"diffmem-packed-{os.getpid()}-a2_b"
    other = tmp_path / "diffmem-notes"
    for folder in (orphan, mine, other):
        (folder / "checkpoint").mkdir(parents=True)
    assert remove_orphaned_run_dirs(str(tmp_path)) == [orphan]
    assert not orphan.exists() and mine.exists() and other.exists()


@pytest.mark.parametrize("as_uri", [False, True])
def test_a_finished_trainings_checkpoints_are_removed_and_nothing_else(tmp_path, as_uri):
    """Issue 15.8: what CheckpointPruner removes from a finished trial's folder: what Tune's checkpoint_* folders
    hold, and nothing else (the empty folders stay, for a restore after a killed driver); the same through a
    --storage URI (sweeps/storage.py)."""
    from sweeps.storage import empty_checkpoints, filesystem
    trial = tmp_path / "width=8_D=20_abc"
    for name in ("checkpoint_000003", "checkpoint_000004"):
        (trial / name / "model").mkdir(parents=True)
        (trial / name / "training-state.pt").write_bytes(b"x" * 100)
        (trial / name / "model" / "weights.pt").write_bytes(b"x" * 100)
    for name in ("result.json", "params.json", "checkpoint_notes.txt"):
        (trial / name).write_text("{}")
    fs, root = filesystem(f"file://{tmp_path}" if as_uri else str(tmp_path))
    assert empty_checkpoints(fs, f"{root}/{trial.name}") == 2
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000003", "checkpoint_000004",
                                                       "checkpoint_notes.txt", "params.json", "result.json"]
    assert not list(trial.glob("checkpoint_*/*"))
    assert empty_checkpoints(fs, f"{root}/no such trial") == 0
