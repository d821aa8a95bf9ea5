"""Packed trainings (diffmem/packed.py) for real on the digits: each member is its solo training up to float
rounding, members with different |D|, seeds, lr, weight decay, EMA and durations leave the pack when each is done,
a killed pack resumes every member from its own checkpoint (in a pack or alone), a diverging member leaves alone."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffmem.config import ConfigError, load_config
from diffmem.packed import Member, train_packed
from conftest import assert_smoke_table, resumed_trainings
from diffmem.train import CHECKPOINT, TrainingDiverged, train

DIGITS = "experiments/digits.yaml"
SHORT = {"model.channels": 8, "train.batch_size": 32, "train.duration": "12ep", "train.lr_warmup": "2ep",
         "train.log_every": "4ep", "eval.every": "4ep", "eval.num_samples": 16, "eval.batch_size": 16,
         "eval.num_steps": 6}
MEMBERS = [   # different |D| (so different durations and evaluation points), seeds, lr, decay, EMA schedule
    {"data.size": 30, "train.seed": 0},
    {"data.size": 50, "train.seed": 1, "train.lr": 1e-3, "train.weight_decay": 1e-3},
    {"data.size": 40, "train.seed": 2, "train.ema_schedule": "paper"}]


def configs(extra=None):
    return [load_config(DIGITS, {**SHORT, **m, **(extra or {})}) for m in MEMBERS]


def quiet(*_):
    pass


def assert_same_training(solo, packed):
    assert (packed.steps, packed.images_seen) == (solo.steps, solo.images_seen)
    assert len(packed.history) == len(solo.history)
    for a, b in zip(solo.history, packed.history):
        assert a["images_seen"] == b["images_seen"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (b["mem_ratio"], b["num_samples"]) == (a["mem_ratio"], a["num_samples"])
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)


def checkpoint(run_dir):
    return torch.load(run_dir / CHECKPOINT, weights_only=True)


def without_key_bias(name, tensor):
    """The attention's key bias shifts every logit of a query alike, so softmax removes it: its gradient is zero but
    for rounding, which Adam scales up to lr-sized steps of either sign. It has no effect on the output; it is left
    out of the comparison (qkv channels are (C, 3) interleaved: the key is the middle one)."""
    if name.endswith("qkv.bias"):
        tensor = tensor.clone().reshape(-1, 3)
        tensor[:, 1] = 0
    return tensor


def assert_same_checkpoint(a, b):
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            torch.testing.assert_close(without_key_bias(name, b[part][name]), without_key_bias(name, tensor),
                                       rtol=1e-4, atol=1e-6)
    names = list(a["model"])   # the parameters in the optimizer's order (the digits' network has no saved buffers)
    assert len(names) == len(a["optimizer"]["state"])
    for i, s in a["optimizer"]["state"].items():
        assert float(b["optimizer"]["state"][i]["step"]) == float(s["step"])
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(without_key_bias(names[i], b["optimizer"]["state"][i][moment]),
                                       without_key_bias(names[i], s[moment]), rtol=1e-3,
                                       atol=1e-4 * float(s[moment].abs().max()))   # gradients' rounding
    assert b["state"]["images_seen"] == a["state"]["images_seen"]


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """configs() trained alone, each in its own run folder."""
    out = tmp_path_factory.mktemp("solo")
    return [(train(c, out / f"m{k}", log=quiet), out / f"m{k}") for k, c in enumerate(configs())]


def test_each_packed_member_is_its_solo_training(solo, tmp_path):
    packed = train_packed([Member(c, tmp_path / f"m{k}", log=quiet) for k, c in enumerate(configs())])
    assert len({result.steps for result, _ in solo}) == 3   # the members leave the pack at different steps
    for k, ((alone, run_dir), b) in enumerate(zip(solo, packed)):
        assert_same_training(alone, b)
        assert_same_checkpoint(checkpoint(run_dir), checkpoint(tmp_path / f"m{k}"))


def test_conditional_members_with_random_labels():
    cfgs = [load_config(DIGITS, {**SHORT, "data.size": size, "data.labels": "random", "data.label_classes": 4,
                                 "train.seed": seed,
                                 "train.duration": "6ep"}) for size, seed in ((20, 3), (30, 4))]
    for a, b in zip([train(c, log=quiet) for c in cfgs], train_packed([Member(c, log=quiet) for c in cfgs])):
        assert_same_training(a, b)


def test_a_member_that_memorizes_stops_early_and_the_others_go_on(solo):
    # threshold 1: every sample is nearer its nearest than its second-nearest image, so the first snapshot decides
    early = load_config(DIGITS, {**SHORT, "data.size": 30, "eval.threshold": 1.0, "eval.memorized_at": 0.9})
    packed = train_packed([Member(c, log=quiet) for c in [early, *configs()[1:]]])
    assert packed[0].stopped_early and len(packed[0].history) == 1
    for a, b in zip([train(early, log=quiet), *[result for result, _ in solo[1:]]], packed):
        assert_same_training(a, b)


def test_a_diverging_member_leaves_with_its_error_and_the_others_finish(solo):
    cfgs = configs()
    cfgs[1] = load_config(DIGITS, {**SHORT, **MEMBERS[1], "train.lr": 1e30})
    results = train_packed([Member(c, log=quiet) for c in cfgs])
    assert isinstance(results[1], TrainingDiverged) and "lower train.lr" in str(results[1])
    for k in (0, 2):
        assert_same_training(solo[k][0], results[k])


def test_trainings_of_different_batch_sizes_are_refused():
    cfgs = [load_config(DIGITS, {**SHORT, "data.size": 30}), load_config(DIGITS, {**SHORT, "train.batch_size": 16})]
    with pytest.raises(ConfigError, match="one train.batch_size"):
        train_packed([Member(c, log=quiet) for c in cfgs])


CHILD = """
import sys, time, torch
from diffmem.config import load_config
from diffmem.packed import Member, train_packed
sys.path.insert(0, {tests!r})
from test_packed import configs
torch.set_num_threads(1)
slow = lambda metrics, saved: time.sleep(0.5)   # room for the kill between checkpoints; the numbers are untouched
train_packed([Member(c, {out!r} + f"/m{{k}}", report=slow, log=lambda *a: None)
              for k, c in enumerate(configs({extra!r}))])
"""


def test_a_killed_pack_resumes_every_member_from_its_checkpoint(tmp_path):
    longer = {"train.duration": "24ep"}
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=os.path.dirname(__file__), out=str(tmp_path),
                                                                  extra=longer)], start_new_session=True)
    paths = [tmp_path / f"m{k}" / CHECKPOINT for k in range(len(MEMBERS))]
    deadline = time.monotonic() + 240
    while not all(p.exists() for p in paths) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)   # as a lost worker: no cleanup, no last checkpoint
    child.wait()
    assert child.returncode == -signal.SIGKILL
    seen = [checkpoint(p.parent.parent)["state"]["images_seen"] for p in paths]
    cfgs = configs(longer)
    whole = [train(c, log=quiet) for c in cfgs]
    assert all(0 < s < w.images_seen for s, w in zip(seen, whole))   # killed mid-training, every member

    logs = {k: [] for k in range(len(cfgs))}
    # member 0 resumes alone (its checkpoint is the solo format), the others in a pack
    alone = train(cfgs[0], tmp_path / "m0", log=logs[0].append)
    packed = train_packed([Member(c, tmp_path / f"m{k}", log=logs[k].append) for k, c in enumerate(cfgs) if k])
    for k, resumed in enumerate([alone, *packed]):
        assert logs[k][0].startswith("resumed from") and f"at {seen[k]} images" in logs[k][0]
        assert_same_training(whole[k], resumed)


SEARCH = str(Path(__file__).resolve().parent.parent / "sweeps" / "emm_search.py")


@pytest.mark.slow
def test_a_packed_sweep_survives_its_lost_pack_server_and_finds_the_same_table(smoke_sweep, tmp_path):
    """The smoke sweep's first grid point with --pack-size 2 (4 trainings at once in 2 pack servers), the servers
    killed mid-training as lost workers: the trainings they held resume from their checkpoints, the EMM is the
    unpacked sweep's, and the ledger holds each training once."""
    import pandas as pd
    from sweeps.ledger import Ledger
    from sweeps.reaper import descendants
    out = tmp_path / "packed"
    proc = subprocess.Popen([sys.executable, SEARCH, "--preset", "smoke", "--no-dashboard", "--pack-size", "2",
                             "--values", "none", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline, killed = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None and not killed:
        time.sleep(0.2)
        if list((out / "tune").glob("*/checkpoint_000000")):   # a training has a checkpoint: kill its servers
            for pid in descendants(proc.pid):
                try:
                    if b"PackServer" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                except OSError:
                    pass
    stdout, _ = proc.communicate(timeout=900)
    assert killed, "no pack server was running"
    assert proc.returncode == 0, stdout[-3000:]
    assert "4 trainings at once in packs of up to 2" in stdout
    assert_smoke_table(out, smoke_sweep)
    trials = pd.read_csv(out / "trials.csv")
    assert len(Ledger(out / "ledger.sqlite")) == len(trials)   # each training recorded once, none lost

    assert resumed_trainings(out) >= 1   # a retry began from its checkpoint
