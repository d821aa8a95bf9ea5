"""experiments/paper/: one config per figure or table of the paper. Each loads, sweeps factors the registry
knows with at least the paper's values, expands into grid points whose configs load (no dataset is read),
keeps the basic setup of experiments/cifar10.yaml, and names a command that emm_search.py accepts."""
import re
import shlex
from pathlib import Path

import pytest

from diffmem.config import load_config, read_yaml
from sweeps.emm_search import parse_args
from sweeps.factors import FACTORS, grid_points

ROOT = Path(__file__).resolve().parent.parent
PAPER = sorted((ROOT / "experiments" / "paper").glob("*.yaml"))
CIFAR10 = ROOT / "experiments" / "cifar10.yaml"
# What a figure's base may change in the basic setup, and why (see each file's header).
DATA_CHANGES = {"data_dimension": {"resolution"}, "skip_connections": {"resolution"},
                "skip_connections_ncsnpp": {"resolution"}, "intra_class_diversity": {"mix_path"}}
MODEL_CHANGES = {"skip_connections_ncsnpp": {"arch", "precond", "embedding", "channel_mult_noise", "encoder",
                                             "resample_filter"}}   # NCSN++ / VE / Fourier (paper.md §4)
FIGURES = {"data_dimension": "Fig. 2(a)", "inter_class_diversity": "Fig. 2(b)", "intra_class_diversity": "Fig. 2(c)",
           "model_configuration": "Fig. 3", "skip_connections": "Fig. 4", "skip_connections_ncsnpp": "Fig. 4",
           "conditioning": "Fig. 5",
           "batch_size": "Table 1", "weight_decay": "Table 2", "ema": "Table 3"}


def test_there_is_one_file_per_figure_and_table():
    assert sorted(p.stem for p in PAPER) == sorted(FIGURES)


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_loads_and_its_grid_points_load(path):
    base = load_config(path)
    sweep = read_yaml(path)["sweep"]
    assert set(sweep) == {"size_range", "size_step", "factors"}
    lo, hi = sweep["size_range"]
    assert sweep["size_step"] == 10 and 10 <= lo < hi and lo % 10 == 0 and hi % 10 == 0
    assert sweep["factors"]
    for name, values in sweep["factors"].items():
        assert name in FACTORS, name
        assert set(FACTORS[name].paper_values) <= set(values), name   # at least the paper's values
        for point in grid_points(FACTORS[name], values, base):
            load_config(path, point["overrides"])


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_is_the_basic_setup(path):
    paper, basic = load_config(path), load_config(CIFAR10)
    assert (paper.train, paper.eval) == (basic.train, basic.eval)
    changed = {k for k, v in vars(paper.data).items() if v != getattr(basic.data, k)}
    assert changed == DATA_CHANGES.get(path.stem, set())
    changed = {k for k, v in vars(paper.model).items() if v != getattr(basic.model, k)}
    assert changed == MODEL_CHANGES.get(path.stem, set())
    assert basic.train.precision == "fp32"


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_header_names_the_figure_and_commands_that_parse(path):
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert header.startswith(f"# {FIGURES[path.stem]}")
    text = header.replace("\\\n#", " ").replace("#", " ")
    commands = re.findall(r"python sweeps/emm_search\.py ([^\n]*)", text)
    factors = set(read_yaml(path)["sweep"]["factors"])
    swept = set()
    for command in commands:
        args = parse_args(shlex.split(command))
        assert args.config == f"experiments/paper/{path.name}" and args.gpus_per_trial == 8
        assert args.address == "auto" and args.output.startswith("/mnt/shared/results/")
        swept.add(args.factor)
    assert factors <= swept
