"""One real smoke sweep for the whole session: the sweep tests (tests/test_sweeps.py) compare against it and
the watching tests (tests/test_watch.py) read its TensorBoard, status and report. Its --status is read while
it runs."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

SEARCH = str(Path(__file__).resolve().parent.parent / "sweeps" / "emm_search.py")


def a_sweep(**given):
    """A sweeps.spec.Sweep as a unit test needs one: what it gives, harmless values for the rest."""
    from sweeps.spec import Sweep
    return Sweep(**{"factor": "random_labels", "values": [], "grid_points": [], "base": {}, "epsilon": 0.1,
                    "tolerance": 0.1, "size_range": [10, 200], "allowed_sizes": [], "workers": 1,
                    "gpus_per_worker": 0, "ddp": False, "max_failures": 1, "max_concurrent": None, "ledger": None,
                    "no_reuse": False, "config_file": "experiments/digits.yaml", **given})


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """(output folder, console output, --status text read while it ran or None)."""
    from sweeps.status import sweep_status
    out = tmp_path_factory.mktemp("smoke") / "out"
    proc = subprocess.Popen([sys.executable, SEARCH, "--preset", "smoke", "--no-dashboard", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out.parent)
    while_running = None
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        time.sleep(2)
        if while_running is None and (out / "tune").is_dir():
            try:
                text = sweep_status(out)
            except Exception:
                continue            # the folder is being created
            if "\nrunning (" in text and "time left: about" in text:
                while_running = text
    stdout, _ = proc.communicate(timeout=max(1, deadline - time.time()))
    assert proc.returncode == 0, stdout[-3000:]
    return out, stdout, while_running


def resumed_trainings(out: Path) -> int:
    """Trainings of the sweep in `out` whose TensorBoard run has two event files, the second's first evaluation
    later than the first's: a retry that began from a checkpoint, not from step 0."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def first_evaluation(run):
        events = EventAccumulator(str(run)).Reload()
        if "memorization/mem_ratio" in events.Tags()["scalars"]:
            return events.Scalars("memorization/mem_ratio")[0].step
        return None
    resumed = 0
    for logdir in (out / "tensorboard").glob("*/D=*"):
        runs = sorted(logdir.glob("events.*"), key=lambda p: p.stat().st_mtime)
        steps = [first_evaluation(r) for r in runs]
        if len(steps) == 2 and None not in steps and steps[1] > steps[0]:
            resumed += 1
    return resumed


def assert_smoke_table(out: Path, smoke_sweep, value: str = "none") -> None:
    """The EMM table of a sweep of one smoke grid point (in `out`) is the smoke sweep's row for it: the same answer
    whatever happened on the way (a kill, a lost node, packing, remote storage)."""
    import pandas as pd
    columns = ["value", "emm", "high", "censored"]
    alone = pd.read_csv(smoke_sweep[0] / "emm.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out / "emm.csv")[columns],
                                  alone[alone.value == value][columns].reset_index(drop=True))
