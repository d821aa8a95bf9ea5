"""Seeing a sweep: TensorBoard (tags, HParams, served on loopback), --status, the HTML report in headless
Chromium, and explore.py's Optuna study. Fast tests use a synthetic sweep folder; the slow ones a real smoke
sweep (one, shared by this module)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SEARCH = str(ROOT / "sweeps" / "emm_search.py")
REPORT = str(ROOT / "sweeps" / "report.py")
EXPLORE = str(ROOT / "sweeps" / "explore.py")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _hparams(events) -> dict:
    from tensorboard.plugins.hparams import metadata
    try:
        content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:
        return {}
    out = {}
    if metadata.EXPERIMENT_TAG in content:
        out["experiment"] = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    if metadata.SESSION_START_INFO_TAG in content:
        out["start"] = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    if metadata.SESSION_END_INFO_TAG in content:
        out["end"] = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    return out


# ---------------------------------------------------------------- a synthetic sweep folder (fast tests)

GRID = [{"label": "width=8", "value": 8, "overrides": {"model.channels": 8}},
        {"label": "width=16", "value": 16, "overrides": {"model.channels": 16}}]
# (grid index, size, best ratio): width=8 resolves to [20, 30); width=16 is open, one training at 40 running
OBSERVED = [(0, 20, 0.95), (0, 40, 0.40), (0, 30, 0.70), (1, 20, 0.97)]


def _fake_picture(ratios) -> np.ndarray:
    from diffmem.data import training_set
    from diffmem.config import load_config
    from diffmem.evaluate import Evaluation
    from diffmem.pictures import nn_grid_picture
    train_set = training_set(load_config(str(ROOT / "experiments" / "digits.yaml"), ["data.size=20"]).data)
    n = len(ratios)
    evaluation = Evaluation(0.5, torch.tensor(ratios),
                            torch.stack([torch.arange(n) % 20, (torch.arange(n) + 1) % 20], 1),
                            train_set.images[:n])
    return nn_grid_picture(evaluation, train_set)


def make_sweep(output: Path, finished: bool) -> Path:
    """A sweep folder as emm_search leaves it: sweep.json, Tune's snapshots and trial folders, TensorBoard runs;
    finished: every bracket closed and the tables written; else width=16 open with one training running."""
    from torch.utils.tensorboard import SummaryWriter

    from sweeps.bisection import EMMSearchState
    from sweeps.results import emm_table, interval_of, write_results
    from sweeps.searcher import SAVE_FORMAT, SAVE_VERSION
    from sweeps.tblog import end_session, start_session
    tune_dir = output / "tune"
    tune_dir.mkdir(parents=True)
    spec = {"version": 1, "factor": "width", "values": [8, 16], "grid_points": GRID,
            "base": {"eval": {"num_samples": 256}}, "config_file": str(ROOT / "experiments" / "digits.yaml"),
            "preset": "smoke", "epsilon": 0.1,
            "tolerance": 0.1, "size_range": [10, 80], "allowed_sizes": list(range(10, 801, 10)), "workers": 1,
            "gpus_per_worker": 0, "ddp": False, "max_failures": 2, "max_concurrent": 2,
            "ledger": str(output / "ledger.sqlite"), "no_reuse": False}
    (output / "sweep.json").write_text(json.dumps(spec))
    state = EMMSearchState(GRID, spec["allowed_sizes"], spec["size_range"])
    observed = OBSERVED + ([(1, 40, 0.91), (1, 50, 0.60)] if finished else [])
    trial_data, rows = [], []
    for k, (g, size, ratio) in enumerate(observed):
        state.start(g, size)
        state.observe(g, size, ratio, images=16000, samples=256)
        trial_data.append(_trial(tune_dir, f"t{k:07d}", g, size, ratio, "TERMINATED"))
        low, high = interval_of(ratio, 256)
        rows.append({"grid_label": GRID[g]["label"], "value": GRID[g]["value"], "size": size, "seed": 0,
                     "best_mem_ratio": ratio,
                     "best_mem_ratio_low": low, "best_mem_ratio_high": high, "memorized": ratio >= 0.9,
                     "stopped_early": False, "images_seen": 16000,
                     "planned_images": 16000, "wall_seconds": 30.0, "trial_id": f"t{k:07d}", "status": "done"})
        run = output / "tensorboard" / GRID[g]["label"] / f"D={size}"
        config = {"grid_label": GRID[g]["label"], "overrides": GRID[g]["overrides"], "size": size}
        with SummaryWriter(str(run)) as writer:
            start_session(writer, config)
            for step in (8000, 16000):
                writer.add_scalar("memorization/mem_ratio", ratio * step / 16000, step)
                writer.add_image("samples/generated_nn1_nn2", _fake_picture([ratio, 0.5, 0.9]), step,
                                 dataformats="HWC")
            end_session(writer, ratio, 0.1, 16000)
    if not finished:
        state.start(1, 40)
        trial_data.append(_trial(tune_dir, "trunning", 1, 40, 0.5, "RUNNING", seconds=10.0))
    searcher = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "metric": "best_mem_ratio", "state": state.to_dict(),
                "running": {} if finished else {"trunning": [1, 40]}, "completed": [], "reused": []}
    (tune_dir / "searcher-state-2026-11-29_00-00-00.pkl").write_text(json.dumps(searcher))
    (tune_dir / "experiment_state-2026-11-29_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))
    if finished:
        trials = pd.DataFrame(rows)
        emm = emm_table("width", state.summary(), trials)
        write_results(output, "width", emm, trials, GRID, 0.1)
    return output


def _trial(tune_dir: Path, trial_id: str, g: int, size: int, ratio: float, status: str, seconds: float = 30.0):
    config = {"grid_index": g, "grid_label": GRID[g]["label"], "grid_value": GRID[g]["value"],
              "overrides": GRID[g]["overrides"], "size": size}
    folder = tune_dir / f"{GRID[g]['label']}_D={size}_{trial_id}"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(config))
    from sweeps.results import interval_of
    low, high = interval_of(ratio, 256)
    result = {"best_mem_ratio": ratio, "best_mem_ratio_low": low, "best_mem_ratio_high": high,
              "images_seen": 8000 if status == "RUNNING" else 16000,
              "planned_images": 16000, "time_total_s": seconds, "trial_id": trial_id, "config": config}
    (folder / "result.json").write_text(json.dumps(result) + "\n")
    return [json.dumps({"trial_id": trial_id, "status": status, "config": config}),
            json.dumps({"last_result": result, "start_time": 0})]


# ---------------------------------------------------------------- TensorBoard, fast

def test_trial_hparams_and_experiment_columns():
    from sweeps.tblog import GRID_KEY, SIZE_KEY, experiment_summary, sweep_hparam_rows, trial_hparams
    hp = trial_hparams({"grid_label": "random_labels=4", "size": 40,
                        "overrides": {"data.labels": "random", "data.label_classes": 4}})
    assert hp == {GRID_KEY: "random_labels=4", "data.label_classes": 4.0, "data.labels": "random", SIZE_KEY: 40.0}
    grid = [{"label": "random_labels=none", "overrides": {"data.labels": "none"}},
            {"label": "random_labels=4", "overrides": {"data.labels": "random", "data.label_classes": 4}}]
    from tensorboard.plugins.hparams import api_pb2, metadata
    summary = experiment_summary(sweep_hparam_rows(grid, [10, 80]))
    experiment = metadata.parse_experiment_plugin_data(summary.value[0].metadata.plugin_data.content)
    infos = {i.name: i for i in experiment.hparam_infos}
    assert set(infos) == {GRID_KEY, "data.labels", "data.label_classes", SIZE_KEY}
    assert infos["data.labels"].type == api_pb2.DATA_TYPE_STRING
    assert sorted(v.string_value for v in infos["data.labels"].domain_discrete.values) == ["none", "random"]
    assert infos[SIZE_KEY].type == api_pb2.DATA_TYPE_FLOAT64 and not infos[SIZE_KEY].HasField("domain_discrete")
    assert [m.name.tag for m in experiment.metric_infos] == ["hparams/best_mem_ratio", "hparams/memorized"]


def test_event_files_hold_the_sweeps_tags(tmp_path):
    out = make_sweep(tmp_path / "sweep", finished=True)
    run = _events(out / "tensorboard" / "width=8" / "D=20")
    assert {"hparams/best_mem_ratio", "hparams/memorized"} <= set(run.Tags()["scalars"])
    assert run.Scalars("hparams/memorized")[-1].value == 1.0
    hp = _hparams(run)
    assert dict(hp["start"].hparams)["model.channels"].number_value == 8
    assert dict(hp["start"].hparams)["|D|"].number_value == 20
    assert "end" in hp and "experiment" not in hp       # one experiment per sweep, in the summary run

    summary = _events(out / "tensorboard" / "summary")
    scalars = summary.Tags()["scalars"]
    assert {"emm/width=8/memorization_ratio", "emm/width=16/memorization_ratio", "emm/width",
            "emm/width=8/memorization_ratio_low", "emm/width=8/memorization_ratio_high"} <= set(scalars)
    curve = summary.Scalars("emm/width=8/memorization_ratio")
    assert [(s.step, round(s.value, 2)) for s in curve] == [(20, 0.95), (30, 0.7), (40, 0.4)]
    assert [(s.step, s.value) for s in summary.Scalars("emm/width")] == [(0, 20.0), (1, 40.0)]
    assert "experiment" in _hparams(summary)
    # the summary is rewritten whole, not appended to, when the results are written again
    from sweeps.tblog import write_sweep_summary
    write_sweep_summary(out, "width", pd.read_csv(out / "emm.csv"), pd.read_csv(out / "trials.csv"), GRID, 0.1)
    assert len(_events(out / "tensorboard" / "summary").Scalars("emm/width=8/memorization_ratio")) == 3


def test_sample_grid_carries_the_nn_ratio():
    from diffmem.pictures import nn_ratio_markdown
    from diffmem.evaluate import Evaluation
    picture = _fake_picture([0.05, 0.5, 0.9])
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert (picture[-8:] < 128).any()         # the ratio row under the grid has text in it

    def red(pic):
        return int(((pic[..., 0] > 180) & (pic[..., 1] < 60) & (pic[..., 2] < 60)).sum())
    # a copy (ratio below 1/3) is framed in red around its whole column, its ratio in red; no copy, no red
    framed, plain = _fake_picture([0.05, 0.5]), _fake_picture([0.5, 0.9])
    assert red(plain) == 0 and red(framed) > 4 * framed.shape[0]
    assert red(framed[:, -framed.shape[1] // 4:]) == 0   # only the first of the two columns: the last has none
    text = nn_ratio_markdown(Evaluation(1 / 3, torch.tensor([0.05, 0.5, 0.9]), torch.zeros(3, 2, dtype=torch.long),
                                        torch.zeros(3, 1, 8, 8)))
    assert "| d1/d2 | 0.050 | 0.500 | 0.900 |" in text and "0.3333" in text


# ---------------------------------------------------------------- --status, fast

def test_status_of_a_running_sweep(tmp_path):
    from sweeps.status import sweep_status
    out = make_sweep(tmp_path / "sweep", finished=False)
    text = sweep_status(out)
    assert text.splitlines()[0].endswith(": running"), text
    assert re.search(r"width=8\s+resolved\s+\[20, 30\)\s+20\s+3 done, 0 running", text), text
    assert re.search(r"width=16\s+open\s+\[20, -\) searching 20\.\.80\s+\?\s+1 done, 1 running", text), text
    assert "width=16|D|=40 (running, 8,000 of 16,000 images, best ratio so far 0.500 [0.439, 0.561])" in text
    assert "20: 0.950 [0.915, 0.970] memorized, 30: 0.700 [0.640, 0.752], 40: 0.400 [0.340, 0.459]" in text
    assert "finished trainings: 4; mean 30 s per training" in text
    # width=16 searches 20..80: log2(log(80/20) / log(1.1)) -> 4 steps, but only 5 sizes lie between
    # (log2(6) -> 3 steps), one of them running; 2 at once: (2 x 30 s + (30 s - 10 s run so far)) / 2 = 40 s
    assert "time left: about 40 s (2 more trainings after the 1 running, 2 at once, 30 s each)" in text


def test_status_of_a_finished_and_of_a_stopped_sweep(tmp_path):
    from sweeps.status import sweep_status
    out = make_sweep(tmp_path / "done", finished=True)
    text = sweep_status(out)
    assert text.splitlines()[0].endswith(": finished") and "time left: none (finished)" in text
    assert re.search(r"width=16\s+resolved\s+\[40, 50\)\s+40", text)
    stopped = make_sweep(tmp_path / "stopped", finished=False)
    (stopped / "emm.csv").write_text("partial\n")
    os.utime(stopped / "emm.csv", (time.time() + 5, time.time() + 5))
    text = sweep_status(stopped)
    assert "stopped before the end" in text.splitlines()[0] and "--resume" in text
    assert "left unfinished (1)" in text


def test_status_flag_of_emm_search(tmp_path):
    run = subprocess.run([sys.executable, SEARCH, "--status", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith(f"error: {tmp_path} is not a sweep folder")
    out = make_sweep(tmp_path / "sweep", finished=True)
    run = subprocess.run([sys.executable, SEARCH, "--status", str(out)], capture_output=True, text=True)
    assert run.returncode == 0 and "finished" in run.stdout.splitlines()[0]


@pytest.mark.parametrize("script, args", [("emm_search.py", ["--status", "SWEEP"]), ("emm_search.py", ["--help"]),
                                          ("explore.py", ["--help"]), ("study.py", ["--help"])])
def test_status_and_help_start_without_torch_ray_or_pandas(tmp_path, script, args):
    """A status or a help is under a second: none of the heavy imports (torch ~3 s, Ray ~2 s, pandas ~1 s)."""
    out = make_sweep(tmp_path / "sweep", finished=True)
    argv = [str(ROOT / "sweeps" / script)] + [str(out) if a == "SWEEP" else a for a in args]
    probe = (f"import sys, runpy; sys.argv = {argv!r}\n"
             f"try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
             f"print('loaded', sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules), 'exit', code)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert run.stdout.strip().splitlines()[-1] == "loaded [] exit 0", run.stdout[-2000:] + run.stderr[-2000:]


def test_a_progress_line_names_the_running_trainings_between_finished_ones(capsys):
    """Issue 15.2: no long silence; one plain line (no colour, no carriage return) when nothing was said for a while."""
    from types import SimpleNamespace

    from sweeps.progress import ProgressPrinter
    running = SimpleNamespace(status="RUNNING", config={"grid_label": "width=16", "size": 40},
                              last_result={"images_seen": 8000, "planned_images": 16000, "best_mem_ratio": 0.5})
    fresh = SimpleNamespace(status="RUNNING", config={"grid_label": "width=8", "size": 20, "seed_index": 1, "seeds": 2},
                            last_result={})
    done = SimpleNamespace(status="TERMINATED", config={"grid_label": "width=8", "size": 30}, last_result={})
    quiet = ProgressPrinter(0.1, every=3600)
    quiet.on_step_end(0, [running, fresh, done])
    assert capsys.readouterr().out == ""                       # said something less than an hour ago
    printer = ProgressPrinter(0.1, every=0)
    printer.on_step_end(0, [running, fresh, done])
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "\r" not in line and "\x1b" not in line
    assert line.endswith("1 trainings finished; running: width=16|D|=40 (8,000 of 16,000 images, best ratio so far "
                         "0.500); width=8|D|=20|seed=1 (starting)\n"), line


def test_a_progress_printer_pickled_by_an_older_diffmem_resumes(capsys):
    """--resume takes the callbacks from tune/tuner.pkl: a printer pickled before the progress line existed
    (its state only epsilon and the first run's start) must print, and count from this run's start."""
    import pickle
    from types import SimpleNamespace

    from sweeps.progress import PROGRESS_EVERY_S, ProgressPrinter
    old = ProgressPrinter.__new__(ProgressPrinter)
    old.__dict__.update(epsilon=0.1, started=0.0)              # the whole state of session 6's first printer
    printer = pickle.loads(pickle.dumps(old))
    assert printer.every == PROGRESS_EVERY_S
    done = SimpleNamespace(status="TERMINATED", config={"grid_label": "skip_connections=all", "size": 40},
                           last_result={"best_mem_ratio": 0.95, "images_seen": 100, "planned_images": 100})
    printer.on_trial_complete(0, [done], done)
    line = capsys.readouterr().out
    assert line.startswith("[     0 s] skip_connections=all|D|=40") and line.rstrip().endswith(
        "best ratio 0.950: memorized (0 still running)"), line


# ---------------------------------------------------------------- report, fast (Chromium when installed)

def _chromium(*args, user_dir: Path, timeout=120):
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", *args],
                          capture_output=True, text=True, timeout=timeout)


def _load_in_chromium(page: Path, tmp_path: Path, screenshot: Path | None = None) -> str:
    """The DOM after load, with a count of the images that decoded (added to a copy of the page)."""
    probe = tmp_path / f"probe-{page.name}"
    counter = ("<script>addEventListener('load', () => { const imgs = [...document.images]; "
               "document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length "
               "+ '/' + imgs.length; });</script>")
    probe.write_text(page.read_text().replace("</body>", counter + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), user_dir=tmp_path / "chromium")
    assert dom.returncode == 0, dom.stderr[-2000:]
    if screenshot is not None:
        shot = _chromium("--window-size=1400,2200", f"--screenshot={screenshot}", page.as_uri(),
                         user_dir=tmp_path / "chromium-shot")
        assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    return dom.stdout


def _check_report_dom(dom: str, sweeps: int, grids: int) -> None:
    assert dom.count('<table class="emm">') == sweeps
    decoded, total = map(int, re.search(r'data-decoded="(\d+)/(\d+)"', dom).groups())
    assert decoded == total >= sweeps * 2 + grids, (decoded, total)   # emm.png, curves.png and the grids
    assert "http://" not in dom and "https://" not in dom               # self-contained


def test_report_is_one_self_contained_page(tmp_path):
    first = make_sweep(tmp_path / "first", finished=True)
    running = make_sweep(tmp_path / "running", finished=False)
    page = tmp_path / "report.html"
    run = subprocess.run([sys.executable, REPORT, str(first), str(running), "--html", str(page)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = page.read_text()
    assert text.count('<table class="emm">') == 1 and "No tables yet" in text   # the running one: its status
    assert text.count("data:image/png;base64,") == 2 + 4     # emm.png, curves.png, 2 bracket ends x 2 points
    assert "width=8, |D| = 20: best ratio 0.950 [0.915, 0.970], memorized" in text   # with its 95 % interval
    assert "width=8, |D| = 30: best ratio 0.700 [0.640, 0.752], not memorized" in text
    assert not re.search(r'(src|href)="(?!data:)', text)


def test_a_sweep_written_with_the_old_column_names_reads_as_a_new_one(tmp_path):
    """emm.csv's trials/reused/low/train_seconds and trials.csv's status 'reused' and train_seconds (before one
    vocabulary, README) read as trainings/from_ledger/wall_seconds (low was the EMM again): the report of such a
    folder is the same page."""
    import pandas as pd
    from sweeps.results import read_emm_csv, read_trials_csv
    new, old = make_sweep(tmp_path / "new", finished=True), make_sweep(tmp_path / "old", finished=True)
    emm, trials = pd.read_csv(old / "emm.csv"), pd.read_csv(old / "trials.csv")
    trials.loc[0, "status"] = "from_ledger"
    trials.to_csv(new / "trials.csv", index=False)
    emm.insert(3, "low", emm.emm)
    emm.rename(columns={"trainings": "trials", "from_ledger": "reused", "wall_seconds": "train_seconds"}).to_csv(
        old / "emm.csv", index=False)
    trials.assign(status=trials.status.replace("from_ledger", "reused")).rename(
        columns={"wall_seconds": "train_seconds"}).to_csv(old / "trials.csv", index=False)
    pd.testing.assert_frame_equal(read_emm_csv(old / "emm.csv"), read_emm_csv(new / "emm.csv"))
    pd.testing.assert_frame_equal(read_trials_csv(old / "trials.csv"), read_trials_csv(new / "trials.csv"))
    pages = []
    for folder in (old, new):
        run = subprocess.run([sys.executable, REPORT, str(folder), "--html", str(folder / "r.html")],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        pages.append(re.search(r'<table class="emm">.*?</table>', (folder / "r.html").read_text(), re.S).group())
    assert pages[0] == pages[1] and "<th>from ledger</th>" in pages[0]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (.ci/run installs Debian's "
                                                         "chromium; locally: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    first, second = make_sweep(tmp_path / "a", finished=True), make_sweep(tmp_path / "b", finished=True)
    page = tmp_path / "report.html"
    from sweeps.report import main
    assert main([str(first), str(second), "--html", str(page)]) == 0
    dom = _load_in_chromium(page, tmp_path, screenshot=tmp_path / "report.png")
    _check_report_dom(dom, sweeps=2, grids=8)


# ---------------------------------------------------------------- explore.py, fast

def test_explore_space_maps_through_the_factor_registry():
    from diffmem.config import load_config
    from sweeps.explore import search_space, trial_label, trial_overrides
    space = search_space(["width", "labels", "ema"], {"factors": {"width": [8, 16]}}, 10)
    assert space["width"] == [8, 16] and space["labels"] == ["none", "true", "random-10", "unique"]
    base = load_config(str(ROOT / "experiments" / "digits.yaml"))
    params = {"width": 16, "labels": "random-10", "ema": 0.9}
    assert trial_overrides(params, base, 10) == {"model.channels": 16, "data.labels": "random",
                                                 "data.label_classes": 10, "train.ema_schedule": "paper_final",
                                                 "train.ema_beta": 0.9}
    assert trial_label(params) == "ema=0.9,labels=random-10,width=16"


@pytest.mark.parametrize("args, message", [
    (["--factors", "widht"], "error: unknown factor 'widht'; did you mean 'width'?"),
    (["--factors", "data_size"], "error: factor data_size cannot be explored here"),
    (["--size", "5000"], "error: --size 5000 must be in [1, 1797]"),
    (["--n-trials", "0"], "error: --n-trials must be >= 1"),
])
def test_explore_bad_input_fails_before_ray_starts(tmp_path, capsys, args, message):
    import ray

    from sweeps.explore import main
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


# ---------------------------------------------------------------- one real smoke sweep (slow)

@pytest.mark.slow
def test_smoke_sweep_tensorboard_tags(smoke_sweep):
    out, _, _ = smoke_sweep
    trials = pd.read_csv(out / "trials.csv")
    runs = sorted((out / "tensorboard").glob("*/D=*"))
    assert len(runs) == len(trials)
    for run in runs:
        events = _events(run)
        tags = events.Tags()
        assert {"train/loss", "train/lr", "memorization/mem_ratio", "memorization/best_mem_ratio",
                "memorization/mem_ratio_low", "memorization/best_mem_ratio_high",
                "train/images_per_sec", "hparams/best_mem_ratio", "hparams/memorized"} <= set(tags["scalars"])
        assert "samples/generated_nn1_nn2" in tags["images"]
        assert "samples/nn_ratio/text_summary" in tags["tensors"]
        hp = _hparams(events)
        start = dict(hp["start"].hparams)
        assert set(start) == {"grid point", "data.labels", "|D|"}
        assert f"D={int(start['|D|'].number_value)}" == run.name and start["grid point"].string_value == run.parent.name
        best = events.Scalars("hparams/best_mem_ratio")[-1].value
        row = trials[(trials.grid_label == run.parent.name) & (trials["size"] == int(run.name[2:]))].iloc[0]
        assert best == pytest.approx(row.best_mem_ratio)
    summary = _events(out / "tensorboard" / "summary")
    assert {"emm/random_labels=none/memorization_ratio", "emm/random_labels=unique/memorization_ratio",
            "emm/random_labels"} <= set(summary.Tags()["scalars"])
    assert "experiment" in _hparams(summary)
    assert not list((out / "tune").glob("*/events.out.tfevents.*"))   # Tune's own copy is left out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_tensorboard_serves_the_sweep_on_loopback(smoke_sweep):
    out, _, _ = smoke_sweep
    port = _free_port()
    tensorboard = shutil.which("tensorboard", path=str(Path(sys.executable).parent)) or "tensorboard"
    proc = subprocess.Popen([tensorboard, "--logdir", str(out), "--host", "127.0.0.1", "--port", str(port),
                             "--reload_interval", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        runs, deadline = [], time.time() + 120
        while time.time() < deadline:
            try:
                runs = _get(f"{base}/data/runs")
                if "tensorboard/summary" in runs and len(runs) > 2:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        trials = pd.read_csv(out / "trials.csv")
        assert len(runs) == len(trials) + 1, runs
        assert all(r.startswith("tensorboard/") for r in runs)
        scalars = _get(f"{base}/data/plugin/scalars/tags")
        one = f"tensorboard/{trials.grid_label[0]}/D={trials['size'][0]}"
        assert {"train/loss", "memorization/mem_ratio", "hparams/best_mem_ratio"} <= set(scalars[one])
        assert "emm/random_labels" in scalars["tensorboard/summary"]
        images = _get(f"{base}/data/plugin/images/tags")
        assert "samples/generated_nn1_nn2" in images[one]
        experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        assert {h["name"] for h in experiment["hparamInfos"]} == {"grid point", "data.labels", "|D|"}
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {"hparams/best_mem_ratio",
                                                                          "hparams/memorized"}
        groups = _get(f"{base}/data/plugin/hparams/session_groups",
                      {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS",
                                                                 "STATUS_FAILURE", "STATUS_RUNNING"],
                       "colParams": [], "startIndex": 0, "sliceSize": 100})
        assert len(groups["sessionGroups"]) == len(trials)
        assert all(g["sessions"][0]["status"] == "STATUS_SUCCESS" for g in groups["sessionGroups"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_status_while_running_and_after(smoke_sweep):
    out, _, while_running = smoke_sweep
    assert while_running is not None, "no --status read caught a training running"
    assert while_running.splitlines()[0].endswith(": running")
    assert re.search(r"random_labels=(none|unique)\|D\|=\d+ \(running", while_running), while_running
    run = subprocess.run([sys.executable, SEARCH, "--status", str(out)], capture_output=True, text=True)
    assert run.returncode == 0
    emm = pd.read_csv(out / "emm.csv")
    assert run.stdout.splitlines()[0].endswith(": finished") and "time left: none (finished)" in run.stdout
    for _, r in emm.iterrows():
        assert re.search(rf"random_labels={r.value}\s+resolved\s+\[{int(r.emm)}, {int(r.high)}\)", run.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (.ci/run installs Debian's "
                                                         "chromium; locally: apt-get install -y chromium)")
def test_report_of_a_smoke_sweep_in_headless_chromium(smoke_sweep, tmp_path):
    out, _, _ = smoke_sweep
    synthetic = make_sweep(tmp_path / "synthetic", finished=True)
    page = tmp_path / "report.html"
    run = subprocess.run([sys.executable, REPORT, str(out), str(synthetic), "--html", str(page)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    dom = _load_in_chromium(page, tmp_path, screenshot=tmp_path / "report.png")
    emm = pd.read_csv(out / "emm.csv")
    _check_report_dom(dom, sweeps=2, grids=len(emm) + 4)
    for _, r in emm.iterrows():   # the memorized end of every bracket has its picture
        assert f"random_labels={r.value}, |D| = {int(r.emm)}: best ratio" in dom


@pytest.mark.slow
def test_explore_runs_three_tiny_trials_and_the_study_reopens(tmp_path):
    import optuna
    out = tmp_path / "explore"
    started = time.time()
    run = subprocess.run([sys.executable, EXPLORE, "--preset", "smoke", "--n-trials", "3", "--size", "20",
                          "--no-dashboard", "--output", str(out)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    study = optuna.load_study(study_name="explore", storage=f"sqlite:///{out / 'optuna.sqlite'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and all(0 <= t.value <= 1 for t in complete)
    assert set(complete[0].params) == {"width", "depth", "labels", "weight_decay", "ema"}
    assert "parameter importance" in run.stdout and "3 finished trainings at |D| = 20" in run.stdout
    for name in ("width", "depth", "labels", "weight_decay", "ema"):
        assert re.search(rf"^{name}\s+\d\.\d{{3}}", run.stdout, re.M), run.stdout
    assert (out / "importances.txt").read_text().strip() in run.stdout
    assert (out / "importances.png").stat().st_size > 5_000      # Optuna's matplotlib plot of the same importances
    # each trial is an emm_search training: its TensorBoard run has the HParams session
    runs = list((out / "tensorboard").glob("*/D=20"))
    assert len(runs) == len({json.dumps(t.params, sort_keys=True) for t in complete})
    assert "start" in _hparams(_events(runs[0]))
    # the driver's summary holds the HParams experiment that the trials' sessions belong to
    assert "could not write" not in run.stderr, run.stderr[-2000:]
    assert "experiment" in _hparams(_events(out / "tensorboard" / "summary"))
    assert list(out.glob("tune-*/*/result.json")) and not list(out.glob("tune-*/*/checkpoint_*/*"))   # 15.8, emptied
    print(f"explore, 3 tiny trials: {time.time() - started:.0f} s")


@pytest.mark.slow
def test_the_dashboard_names_each_running_training_and_the_metrics_follow_the_sweep(tmp_path):
    """Issue 15.3: through the dashboard's HTTP API (Ray's state API, /api/v0/actors), the actor of each running
    training carries its grid point and |D| as its repr name, one actor per training. At the metrics address
    printed at start (what Prometheus scrapes, the Metrics tab's source), the sweep's progress: its trainings by
    state, and each training's images seen and best ratio."""
    import signal
    import threading
    proc = subprocess.Popen([sys.executable, SEARCH, "--preset", "smoke", "--values", "none", "unique", "--output",
                             str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    token = Path.home() / ".ray" / "auth_token"
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token.is_file() else {}
    names, url, metrics, deadline = {}, None, {}, time.time() + 600
    gauge = re.compile(r'^ray_(diffmem_\w+)\{[^}]*(?:state|training)="([^"]+)"[^}]*\} (\S+)$', re.M)
    try:
        while time.time() < deadline and proc.poll() is None and not (len(names) >= 3 and _finished(metrics)):
            time.sleep(1)
            url = url or next((m.group(1) for line in list(lines)
                               if (m := re.match(r"Ray dashboard: (http://\S+)", line))), None)
            address = next((m.group(1) for line in list(lines) if (m := re.match(r"Metrics: (http://\S+)", line))),
                           None)
            if address:
                try:
                    with urllib.request.urlopen(address, timeout=10) as answer:
                        metrics.update({(m[1], m[2]): float(m[3]) for m in gauge.finditer(answer.read().decode())})
                except OSError:
                    pass
            if url is None:
                continue
            try:
                request = urllib.request.Request(f"{url}/api/v0/actors?detail=1&limit=1000", headers=headers)
                with urllib.request.urlopen(request, timeout=10) as answer:
                    body = json.load(answer)
            except OSError:
                continue                            # the dashboard is starting
            for actor in body["data"]["result"]["result"]:
                if actor.get("state") == "ALIVE" and "ResourceTrainable" in actor.get("class_name", ""):
                    names[actor["actor_id"]] = actor.get("repr_name")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    assert url is not None and len(names) >= 3, (names, "".join(lines)[-3000:])
    for name in names.values():                     # e.g. random_labels=unique|D|=40
        assert re.fullmatch(r"random_labels=(none|unique)\|D\|=\d+", name or ""), names
    assert len(set(names.values())) == len(names)   # a fresh actor per training: no name shown twice
    assert _finished(metrics), metrics
    trainings = {key: value for key, value in metrics.items() if key[0] == "diffmem_training_images_seen"}
    assert trainings and all(re.fullmatch(r"random_labels=(none|unique)\|D\|=\d+", t) for _, t in trainings), metrics
    assert all(0 < seen <= 16000 for seen in trainings.values())    # smoke: 16 kimg per training
    assert all(0 <= metrics[("diffmem_training_best_ratio", t)] <= 1 for _, t in trainings if
               ("diffmem_training_best_ratio", t) in metrics)
    assert ("diffmem_trainings", "running") in metrics and ("diffmem_trainings", "failed") in metrics


def _finished(metrics: dict) -> bool:
    """The sweep's gauges say a training has finished."""
    return metrics.get(("diffmem_trainings", "finished"), 0) >= 1
