"""The training loop for real on the digits: resume, reproducibility, bad input, what it writes."""
import re
import subprocess
import sys

import pytest
import torch

from diffmem.config import load_config
from diffmem.train import CHECKPOINT, train

DIGITS = "experiments/digits.yaml"
TINY = {"data.size": 20, "model.channels": 8, "train.duration": "3kimg", "train.batch_size": 32,
        "eval.every": "1kimg", "eval.num_samples": 16, "eval.batch_size": 16, "eval.num_steps": 6,
        "model.dropout": 0.1, "train.log_every": "1kimg"}


class Interrupted(Exception):
    pass


def _weights(run_dir):
    ckpt = torch.load(run_dir / CHECKPOINT, weights_only=False)
    return ckpt["model"], ckpt["ema"], ckpt["state"]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    cfg = load_config(DIGITS, TINY)
    whole = train(cfg, tmp_path / "whole", log=lambda *_: None)

    def crash_after_first_checkpoint(metrics, saved):
        if metrics["images_seen"] >= 1000:
            raise Interrupted
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "split", report=crash_after_first_checkpoint, log=lambda *_: None)
    assert _weights(tmp_path / "split")[2]["images_seen"] < whole.images_seen
    saved = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=False)   # as written before step_seconds
    saved["state"]["train_seconds"] = seconds = saved["state"].pop("step_seconds")   # had its name: it resumes
    torch.save(saved, tmp_path / "split" / CHECKPOINT)
    resumed = train(cfg, tmp_path / "split", log=lambda *_: None)
    assert resumed.step_seconds > seconds > 0 and "train_seconds" not in _weights(tmp_path / "split")[2]

    (m1, e1, s1), (m2, e2, s2) = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    for a, b in [(m1, m2), (e1, e2)]:
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert [h["mem_ratio"] for h in whole.history] == [h["mem_ratio"] for h in resumed.history]
    assert s1["step"] == s2["step"] and whole.best_mem_ratio == resumed.best_mem_ratio
    ends = ("best_mem_ratio_low", "best_mem_ratio_high")   # the best snapshot's interval survives the resume
    assert [whole.history[-1][k] for k in ends] == [resumed.history[-1][k] for k in ends]
    from diffmem.sequential import ratio_interval
    for h in whole.history:   # every evaluation: its ratio over its samples, with the 95 % interval of that ratio
        assert h["num_samples"] == 16 and (h["mem_ratio_low"], h["mem_ratio_high"]) == \
            ratio_interval(round(h["mem_ratio"] * 16), 16)
        assert h["mem_ratio_low"] <= h["mem_ratio"] <= h["mem_ratio_high"]
        best = next(e for e in whole.history if e["mem_ratio"] == h["best_mem_ratio"])   # the snapshot that gave it
        assert (h["best_mem_ratio_low"], h["best_mem_ratio_high"]) == (best["mem_ratio_low"], best["mem_ratio_high"])


def test_same_config_and_seed_same_result(tmp_path):
    cfg = load_config(DIGITS, {**TINY, "train.duration": "1kimg"})
    a, b = train(cfg, log=lambda *_: None), train(cfg, log=lambda *_: None)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    c = train(load_config(DIGITS, {**TINY, "train.duration": "1kimg", "train.seed": 7}), log=lambda *_: None)
    assert [h["loss"] for h in a.history] != [h["loss"] for h in c.history]


def test_stops_once_the_running_max_reaches_the_target(tmp_path):
    cfg = load_config(DIGITS, {**TINY, "eval.memorized_at": 0.0001, "eval.threshold": 1.0})   # every sample counts
    result = train(cfg, log=lambda *_: None)
    assert result.stopped_early and result.images_seen < 3000 and len(result.history) == 1


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_trains_and_writes_tensorboard_and_grid(tmp_path):
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    run = _cli("diffmem.train", "--config", DIGITS, *sets, "--output", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr
    assert "best memorization ratio" in run.stdout
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "memorization/mem_ratio", "memorization/best_mem_ratio",
            "memorization/mem_ratio_low", "memorization/mem_ratio_high", "memorization/best_mem_ratio_low",
            "memorization/best_mem_ratio_high"} <= set(tags["scalars"])
    assert re.search(r"best memorization ratio (\S+) \[(\S+), (\S+)\] \(95 % Wilson interval over 16 samples\)",
                     run.stdout), run.stdout
    assert "samples/generated_nn1_nn2" in tags["images"]
    assert [e.step for e in events.Scalars("memorization/mem_ratio")] == [1024, 2016, 3008]
    # a line at every train.log_every, as the loss curve is written: no silence before the first evaluation
    logged = [int(m) for m in re.findall(r"^\s*(\d+) img  loss \S+  lr \S+$", run.stdout, re.M)]
    assert logged == [e.step for e in events.Scalars("train/loss")] and logged, run.stdout


def test_cli_optimum_prints_its_ratio(tmp_path):
    run = _cli("diffmem.optimum", "--config", DIGITS, "--set", "data.size=30", "--set", "eval.num_samples=50",
               "--output", str(tmp_path / "opt"))
    assert run.returncode == 0, run.stderr
    assert "theoretical optimum |D|=30: memorization ratio 1.0000" in run.stdout


def test_a_loss_that_becomes_nan_is_one_line_and_nonzero(tmp_path, capsys):
    """In this process (its bad config values: tests/test_bad_input.py TRAIN_CASES; the exit status through a real
    process: test_the_command_lines_say_it_in_one_line there)."""
    from diffmem.train import main
    code = main(["--config", DIGITS, "--set", "train.lr=1e30", "--set", "eval.every=100kimg",
                 "--output", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: loss became"), err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_digits_memorize_at_small_size_and_generalize_at_large():
    small = train(load_config(DIGITS, {"data.size": 20, "eval.memorized_at": 0.9}), log=lambda *_: None)
    large = train(load_config(DIGITS, {"data.size": 320}), log=lambda *_: None)
    assert small.best_mem_ratio >= 0.9
    assert large.best_mem_ratio < 0.5
