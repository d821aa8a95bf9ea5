"""Config loading: YAML plus dotted overrides; every mistake is one line naming the key and the fix."""
import pytest

from diffmem.config import ConfigError, duration_images, load_config, parse_duration
from diffmem.data import training_set

DIGITS = "experiments/digits.yaml"


def test_defaults_are_the_papers_basic_setup():
    cfg = load_config()
    assert (cfg.model.precond, cfg.model.channels, cfg.model.num_blocks,
            cfg.model.channel_mult) == ("vp", 128, 2, [2, 2, 2])
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.duration, cfg.model.dropout) == (512, 2e-4, "40000ep", 0.13)
    assert cfg.eval.num_samples == 10000 and cfg.eval.threshold == pytest.approx(1 / 3)


def test_yaml_plus_overrides():
    cfg = load_config(DIGITS, ["model.channels=64", "model.channel_mult=[1,1]", "data.labels=random",
                                 "train.ema_schedule=paper_final", "train.ema_beta=0.9"])
    assert cfg.model.channels == 64 and cfg.model.channel_mult == [1, 1]
    assert cfg.data.labels == "random" and cfg.train.ema_beta == 0.9
    assert load_config(DIGITS, {"data.size": 128}).data.size == 128


@pytest.mark.parametrize("override, message", [
    ("model.chanels=64", "unknown config key 'model.chanels'; did you mean 'model.channels'?"),
    ("modle.channels=64", "unknown config section 'modle' in 'modle.channels'; did you mean 'model'?"),
    ("model.channels=wide", "model.channels='wide' must be an integer"),
    ("data.labels=randm", "data.labels='randm' is not one of none, true, random, unique; did you mean 'random'?"),
    ("data.size=0", "data.size=0 must be positive"),
    ("train.duration=40000", "train.duration='40000' is not a duration"),
    ("model.skip_connections=[1,1]", "model.skip_connections has 2 entries, expected 9"),
    ("model.skip_connections=[1,1,1,1,1,1,1,1,2]", "model.skip_connections has 9 entries, expected 9"),
    ("model.dropout=1.5", "model.dropout=1.5 must be in [0, 1)"),
    ("channels=3", "override key 'channels' must be section.name"),
])
def test_bad_values_fail_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_files_and_data():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("experiments/nope.yaml")
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'; available: digits"):
        training_set(load_config(None, ["data.dataset=mnist"]).data)
    with pytest.raises(ConfigError, match=r"data.size=5000 is larger than the 1797 images of digits; "
                                          r"use data.size<=1797"):
        training_set(load_config(None, ["data.size=5000"]).data)


def test_durations():
    assert parse_duration("40000ep") == (40000.0, "ep")
    assert duration_images("2500kimg", 1000) == 2_500_000
    assert duration_images("200ep", 1000) == 200_000


def test_a_key_that_never_did_anything_is_gone_and_an_older_config_holding_it_still_loads():
    """train.checkpoint_every was validated and part of the ledger key but never read (a checkpoint is saved at
    every eval.every snapshot): it is out of the resolved config, and a sweep.json base written with it loads."""
    from diffmem.config import from_dict
    assert "checkpoint_every" not in load_config().to_dict()["train"]
    older = load_config().to_dict()
    older["train"]["checkpoint_every"] = "1000ep"
    assert from_dict(older).to_dict() == load_config().to_dict()
    with pytest.raises(ConfigError, match="unknown config key 'train.checkpoint_evry'"):
        load_config(None, {"train.checkpoint_evry": "5ep"})


def test_a_user_who_sets_a_retired_key_is_told_it_is_gone(tmp_path):
    """A config file or --set naming train.checkpoint_every is the user's intent, so it is refused with why rather
    than dropped as a sweep.json's is."""
    from diffmem.config import parse_override
    why = r"is no longer a setting \(a checkpoint is saved at every eval.every snapshot\); delete it"
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  duration: 8kimg\n  checkpoint_every: 1000ep\n")
    with pytest.raises(ConfigError, match=rf"^train.checkpoint_every in config file '{mine}' {why}$"):
        load_config(mine)
    with pytest.raises(ConfigError, match=rf"^train.checkpoint_every in --set {why}$"):
        parse_override("train.checkpoint_every=5ep")
