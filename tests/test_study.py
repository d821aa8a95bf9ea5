"""The study runner (sweeps/study.py) and its findings page (sweeps/findings.py)."""
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sweeps.findings import AGREES, DIFFERS, INCONCLUSIVE, spearman, verdict

ROOT = Path(__file__).resolve().parent.parent
STUDY = str(ROOT / "sweeps" / "study.py")


def row(low, high, censored=None):
    """An emm.csv row whose seeds' interval is [low, high); EMM and bracket the interval's ends."""
    return {"emm": low, "high": high, "censored": censored, "interval_low": low, "interval_high": high}


@pytest.mark.parametrize("direction, rows, expected", [
    ("rises", [row(20, 30), row(30, 40)], AGREES),                        # touching ends: apart ([20,30) < [30,40))
    ("rises", [row(20, 40), row(30, 50)], INCONCLUSIVE),                  # overlapping
    ("rises", [row(40, 50), row(20, 30)], DIFFERS),
    ("falls", [row(40, 50), row(30, 40), row(10, 20)], AGREES),
    ("falls", [row(10, 20), row(20, 60), row(10, 30)], INCONCLUSIVE),
    ("rises", [row(None, 10, "<min"), row(160, None, ">=max")], AGREES),  # censored at both ends, still apart
    ("rises", [row(20, 30), row(None, None, "unresolved")], "incomplete"),
    ("non-monotone", [row(20, 30), row(50, 60), row(20, 40)], AGREES),    # a peak apart from both ends
    ("non-monotone", [row(20, 30), row(30, 40), row(50, 60)], DIFFERS),   # monotone, ends apart
    ("non-monotone", [row(20, 40), row(30, 50), row(20, 40)], INCONCLUSIVE),
    ("none", [row(20, 40), row(30, 50)], AGREES),
    ("none", [row(20, 30), row(30, 50)], DIFFERS),
    ("unknown", [row(20, 30), row(30, 40)], "no direction on record"),
])
def test_verdict_follows_the_written_rule(direction, rows, expected):
    if rows[0]["censored"] == "<min":
        rows[0].update(emm=None, high=10)      # as emm.csv has them: '< 10' and '>= 160'
    if rows[-1]["censored"] == ">=max":
        rows[-1].update(emm=160, high=None)
    assert verdict(direction, rows) == expected


def test_spearman_matches_the_pearson_correlation_of_ranks():
    assert spearman([10, 20, 30]) == pytest.approx(1.0)
    assert spearman([30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([5, 5, 5]) is None
    # ties take their average rank: values (1, 2, 2, 3) have ranks (0, 1.5, 1.5, 3), positions (0, 1, 2, 3)
    ranks, pos = [0, 1.5, 1.5, 3], [0, 1, 2, 3]
    mr, mp = sum(ranks) / 4, sum(pos) / 4
    cov = sum((r - mr) * (p - mp) for r, p in zip(ranks, pos))
    pearson = cov / (sum((r - mr) ** 2 for r in ranks) * sum((p - mp) ** 2 for p in pos)) ** 0.5
    assert spearman([1, 2, 2, 3]) == pytest.approx(pearson)


def test_the_page_says_why_an_effect_is_not_shown_and_names_the_paper_scale_config(tmp_path):
    """An inconclusive factor is an effect below the seeds' spread, and says so; every factor names the config
    and command that run it at paper scale; a factor the digits cannot express gives its reason."""
    from sweeps.findings import factor_result, write_page
    from sweeps.study import read_study
    study = read_study(write_study(tmp_path / "study.yaml"))
    study["factors"][1]["finding"]["direction"] = "rises"
    csv = "value,emm,high,censored,interval_low,interval_high,seed_emms,trainings,from_ledger\n"
    (tmp_path / "labels.csv").write_text(csv + "none,20,30,,20,30,20,3,0\ntrue,40,50,,40,50,40,3,0\n")
    (tmp_path / "embedding.csv").write_text(csv + "positional,20,40,,20,40,20,3,0\nfourier,30,50,,30,50,30,3,0\n")
    results = [factor_result(study["factors"][0], tmp_path / "labels.csv"),
               factor_result(study["factors"][1], tmp_path / "embedding.csv")]
    assert [r["verdict"] for r in results] == [AGREES, INCONCLUSIVE + " (direction unverified)"]
    write_page(tmp_path, study, results, ["header"])
    page = (tmp_path / "findings.md").read_text()
    labels, embedding = page.split("### class_labels")[1].split("### time_embedding")
    assert "Why not shown here" not in labels
    assert "an effect of time_embedding, if there is one, is below the seeds' spread at this scale" in embedding
    assert "At paper scale: `python sweeps/emm_search.py --config experiments/paper/conditioning.yaml --factor " \
           "class_labels`" in labels
    assert "--config experiments/paper/model_configuration.yaml --factor time_embedding`" in embedding
    assert "Why not here: no second source of digits. At paper scale: " \
           "`experiments/paper/intra_class_diversity.yaml`" in page


def write_study(path: Path, **changes) -> Path:
    study = {"config": str(ROOT / "experiments" / "digits.yaml"), "preset": "smoke", "seeds": 1,
             "size_range": [10, 20],
             "factors": [
                 {"factor": "class_labels", "values": ["none", "true"],
                  "paper_config": "experiments/paper/conditioning.yaml",
                  "finding": {"where": "Fig. 5", "direction": "rises", "verified": True, "paper": "labels raise it"}},
                 {"factor": "time_embedding", "values": ["positional", "fourier"],
                  "paper_config": "experiments/paper/model_configuration.yaml",
                  "finding": {"where": "Fig. 3", "direction": "unknown", "paper": "no numbers"}}],
             "not_run": [{"factor": "mix_rate", "reason": "no second source of digits.",
                          "paper_config": "experiments/paper/intra_class_diversity.yaml",
                          "finding": {"where": "Fig. 2(c)", "direction": "unknown", "paper": "-"}}]}
    study.update(changes)
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.parametrize("change, words", [
    ({"factors": [{"factor": "widht", "values": [8, 16], "paper_config": "experiments/cifar10.yaml",
                   "finding": {"where": "-", "direction": "rises", "paper": "-"}}]},
     "unknown factor 'widht'; did you mean 'width'?"),
    ({"factors": [{"factor": "width", "values": [8, 16], "paper_config": "experiments/cifar10.yaml",
                   "finding": {"where": "-", "direction": "up", "paper": "-"}}]},
     "direction 'up' must be one of rises, falls"),
    ({"factors": [{"factor": "width", "values": [8], "paper_config": "experiments/cifar10.yaml",
                   "finding": {"where": "-", "direction": "rises", "paper": "-"}}]},
     "must list at least two values"),
    ({"factors": [{"factor": "width", "values": [8, 16], "paper_config": "experiments/paper/widht.yaml",
                   "finding": {"where": "-", "direction": "rises", "paper": "-"}}]},
     "paper_config 'experiments/paper/widht.yaml' is not a file of the checkout"),
    ({"seed": 2}, "unknown key 'seed'"),
    ({"config": "nowhere.yaml"}, "config nowhere.yaml named in"),
])
def test_a_bad_study_file_is_one_line_and_exit_2(tmp_path, change, words):
    study = write_study(tmp_path / "study.yaml", **change)
    proc = subprocess.run([sys.executable, STUDY, str(study), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_factors_picks_the_named_factors_in_the_studys_order_and_refuses_others(tmp_path):
    study = write_study(tmp_path / "study.yaml")
    from sweeps.study import chosen, read_study
    assert [e["factor"] for e in chosen(read_study(study), "time_embedding, class_labels")] == \
        ["class_labels", "time_embedding"]
    assert [e["factor"] for e in chosen(read_study(study), None)] == ["class_labels", "time_embedding"]
    proc = subprocess.run([sys.executable, STUDY, str(study), "--output", str(tmp_path / "out"), "--factors",
                           "class_labels,widht"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "widht is not a factor of the study; choose from class_labels, time_embedding" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_study_continues_only_with_its_own_study_file(tmp_path):
    from diffmem.config import ConfigError
    from sweeps.study import read_state, read_study, write_state
    out = tmp_path / "out"
    out.mkdir()
    study = read_study(write_study(tmp_path / "study.yaml"))
    write_state(out, read_state(out, study))
    changed = read_study(write_study(tmp_path / "study.yaml", seeds=2))
    with pytest.raises(ConfigError, match="differs from the one .* was started with; restore it, or give a new"):
        read_state(out, changed)
    # what the page says of a factor is not how its sweep runs: a corrected finding continues, and is the one used
    reworded = read_study(write_study(tmp_path / "study.yaml"))
    reworded["factors"][0]["finding"]["paper"] = "labels raise it (Fig. 5, corrected)"
    reworded["factors"][1]["paper_config"] = "experiments/cifar10.yaml"
    assert read_state(out, reworded)["study"] == reworded
    moved = read_study(write_study(tmp_path / "study.yaml"))
    moved["factors"][0]["values"] = ["true", "none"]
    with pytest.raises(ConfigError, match=r"\(factor class_labels\)"):
        read_state(out, moved)


def _trainings(ledger: Path) -> int:
    with sqlite3.connect(ledger) as db:
        return db.execute("select count(*) from trainings").fetchone()[0]


@pytest.mark.slow
def test_a_smoke_study_shares_its_ledger_resumes_after_ctrl_c_and_writes_the_page(tmp_path):
    """Two factors at --preset smoke whose first value is the basic setup: the second factor's basic trainings come
    from the first's through the shared ledger; Ctrl-C during the second factor, then the same command finishes
    the study without training anything twice, and the page has both factors and the not-run row."""
    study, out = write_study(tmp_path / "study.yaml"), tmp_path / "out"
    command = [sys.executable, STUDY, str(study), "--output", str(out), "--max-concurrent", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while (time.time() < deadline and proc.poll() is None
           and not list((out / "time_embedding").glob("tune/*/result.json"))):
        time.sleep(1)                   # until the second sweep has a training under way
    proc.send_signal(signal.SIGINT)
    first, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, first[-3000:]
    assert "the same command continues" in first
    state = json.loads((out / "study.json").read_text())
    assert state["factors"]["class_labels"]["done"] and not state["factors"]["time_embedding"]["done"]
    page = (out / "findings.md").read_text()
    assert "| class_labels |" in page and "Not run yet" in page

    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "resuming time_embedding" in proc.stdout and "class_labels" not in proc.stdout.split("\n")[0]
    page = (out / "findings.md").read_text()
    for words in ("| class_labels | none, true |", "| time_embedding | positional, fourier |",
                  "no direction on record", "| mix_rate | - | not measured here", "## The verdict rule",
                  "At paper scale: `python sweeps/emm_search.py --config experiments/paper/conditioning.yaml"):
        assert words in page, words
    assert (out / "findings.png").stat().st_size > 10_000
    # shared ledger: time_embedding=positional is the basic setup, answered by class_labels=none's trainings
    import pandas as pd
    emm = pd.read_csv(out / "time_embedding" / "emm.csv")
    assert emm.loc[emm.value == "positional", "from_ledger"].iloc[0] >= 1
    trials = sum(len(pd.read_csv(out / f / "trials.csv").query("status != 'from_ledger'"))
                 for f in ("class_labels", "time_embedding"))
    assert _trainings(out / "ledger.sqlite") == trials     # every training recorded once, none run twice
    page = subprocess.run([*command, "--page"], capture_output=True, text=True, timeout=300)   # trains nothing
    assert page.returncode == 0 and "| time_embedding | positional, fourier |" in page.stdout, page.stderr[-2000:]
    assert _trainings(out / "ledger.sqlite") == trials


@pytest.mark.parametrize("factor, value", [("width", 16), ("depth", 1), ("time_embedding", "positional"),
                                           ("skip_connections", "all"), ("skip_connections", "1111"),
                                           ("class_labels", "none"), ("num_classes", 10), ("resolution", 8),
                                           ("batch_size", 64), ("weight_decay", 0)])
def test_a_value_that_is_the_digits_basic_setup_resolves_to_its_config(factor, value):
    """So the shared ledger answers it with the basic setup's trainings (one resolved config, one ledger key)."""
    from diffmem.config import apply_overrides, from_dict, read_yaml
    from sweeps.factors import FACTORS
    base = from_dict(read_yaml(str(ROOT / "experiments" / "digits.yaml")))
    resolved = from_dict(apply_overrides(base.to_dict(), FACTORS[factor].overrides(value, base)))
    assert json.dumps(resolved.to_dict(), sort_keys=True) == json.dumps(base.to_dict(), sort_keys=True)
