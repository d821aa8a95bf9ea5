"""The EMA schedules against the paper's code (sail-sg/DiffMemorize train.py + training/training_loop.py),
written out again here, step by step over a whole ramp-up and after it; the training loop's use of them;
`python -m diffmem.train --dry-run` on the paper's config."""
import math
from pathlib import Path

import pytest

from diffmem.config import ConfigError, load_config
from diffmem.train import Schedule, main, schedule, train
from sweeps.factors import FACTORS
from tests.test_datasets import write_cifar

ROOT = Path(__file__).resolve().parent.parent
CIFAR10 = str(ROOT / "experiments" / "cifar10.yaml")
SIZES = (500, 1000, 2000, 5000, 50000)
BATCHES = (128, 512, 896)


def paper_code_beta(mode, image_num, batch_size, cur_nimg, final_ema=0.99929):
    """The paper's code, term by term: train.py sets the kimg counts from --ema=0.5 and |D| = image_num, the
    training loop computes beta from the images seen before the step (cur_nimg grows after the update)."""
    ema_halflife_kimg = int(0.5 * image_num / 50)
    data_ratio = 50000 / image_num
    ema_halflife_nimg = min(ema_halflife_kimg * 1000, cur_nimg * 0.05)
    if mode == "mode2":
        return 0.5 ** (512 / max(ema_halflife_nimg, 1e-8) / data_ratio)
    ema_constant = 0.5 ** (batch_size / 500 / 1000)
    return final_ema / ema_constant * (0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8) / data_ratio))


def cifar_plan(size, batch, final=None) -> Schedule:
    base = load_config(CIFAR10, {"data.size": size, "train.batch_size": batch})
    overrides = {"data.size": size, "train.batch_size": batch}
    if final is not None:   # Table 3 through its factor, as a sweep sets it
        overrides |= FACTORS["ema"].overrides(final, base)
    return schedule(load_config(CIFAR10, overrides), size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode, final", [("mode2", None), ("mode4", 0.99929), ("mode4", 0.9), ("mode4", 0.0)])
def test_beta_is_the_papers_at_every_step_of_the_ramp_up_and_after(size, batch, mode, final):
    plan = cifar_plan(size, batch, final)
    ramp_end_step = math.ceil(200 * size / batch)   # 0.05 x images seen reaches h = 10 |D|
    for step in range(ramp_end_step + 200):
        seen = step * batch
        expected = paper_code_beta(mode, size, batch, seen, final)
        assert math.isclose(plan.ema_beta(seen), expected, rel_tol=1e-13), (step, seen, expected)
    after = plan.ema_beta(10 * plan.total)
    if mode == "mode2":   # the same per-step beta at every |D| and batch size
        assert after == pytest.approx(0.5 ** (512 / 500_000), rel=1e-15) and round(after, 5) == 0.99929
    else:
        assert after == pytest.approx(final, abs=1e-15)
    assert plan.ema_beta(0) == 0   # the first step copies the network


def test_edm_halflife_schedule_is_edms():
    cfg = load_config(ROOT / "experiments" / "digits.yaml")
    plan = schedule(cfg, 64)
    for seen in range(0, 20000, 64):   # EDM: 0.5 ** (batch / max(min(h, 0.05 seen), 1e-8))
        assert plan.ema_beta(seen) == pytest.approx(0.5 ** (64 / max(min(640, 0.05 * seen), 1e-8)), rel=1e-14)


def test_the_loop_takes_the_beta_of_the_images_seen_before_each_step(monkeypatch):
    seen_by_beta, seen_by_lr = [], []
    real_beta, real_lr = Schedule.ema_beta, Schedule.learning_rate
    monkeypatch.setattr(Schedule, "ema_beta", lambda self, seen: seen_by_beta.append(seen) or real_beta(self, seen))
    monkeypatch.setattr(Schedule, "learning_rate", lambda self, seen: seen_by_lr.append(seen) or real_lr(self, seen))
    cfg = load_config(ROOT / "experiments" / "digits.yaml", {
        "data.size": 20, "model.channels": 8, "train.duration": "0.16kimg", "train.batch_size": 32,
        "eval.every": "1kimg", "eval.num_samples": 4, "eval.batch_size": 4, "eval.num_steps": 2})
    train(cfg, log=lambda *_: None)
    assert seen_by_beta == seen_by_lr == [0, 32, 64, 96, 128]


@pytest.mark.parametrize("overrides, message", [
    ({"train.ema_schedule": "paper_final"}, "train.ema_schedule=paper_final needs train.ema_beta"),
    ({"train.ema_beta": 0.9}, "train.ema_beta=0.9 is read only by train.ema_schedule=paper_final"),
    ({"train.ema_schedule": "mode2"}, "train.ema_schedule='mode2' is not one of paper, paper_final, halflife"),
    ({"train.ema_schedule": "paper_final", "train.ema_beta": 1.0}, "train.ema_beta=1.0 must be in [0, 1)"),
    ({"train.ema_rampup": -0.05}, "train.ema_rampup=-0.05 must be a positive share"),
    ({"train.ema_rampup": float("nan")}, "train.ema_rampup=nan must be a finite number > 0, or null"),
])
def test_bad_ema_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CIFAR10, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_dry_run_prints_the_papers_schedule(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_cifar(tmp_path, per_batch=1000)[0]   # 5,000 training images in the official format
    for size, batch in [(1000, 512), (5000, 512), (1000, 128)]:
        assert main(["--config", CIFAR10, "--dry-run", "--set", f"data.path={folder}", "--set", f"data.size={size}",
                     "--set", f"train.batch_size={batch}"]) == 0
        out = capsys.readouterr().out
        assert f"  size: {size}\n" in out and f"  batch_size: {batch}\n" in out   # the resolved config
        assert f"training       {40000 * size:,} images (40,000.0 epochs, {-(-40000 * size // batch):,} steps)" in out
        assert f"over {200 * size:,} images (200.0 epochs" in out   # lr warm-up and EMA ramp-up: both 200 epochs
        assert "beta after the ramp-up      0.99929 (half-life " + f"{500_000 * batch / 512:,.0f} images" in out
        assert f"evaluations    {40000 * size // 2_500_000}, every 2,500,000 images" in out
        assert "10,000 per evaluation (seeds 0-9999)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
