"""TensorBoard for a sweep: one log directory, OUTPUT/tensorboard, that `tensorboard --logdir OUTPUT` opens.

- `<grid point>/D=<size>`: one run per training (written by the trial, sweeps/trainable.py and diffmem.train):
  loss, lr, memorization ratio (and the ends of its 95 % interval), images/s against images seen; the sample |
  NN1 | NN2 grid with each sample's NN ratio; and an HParams session: the grid point, the factor's config
  keys and |D| as hyperparameters (and the seed, with --seeds K > 1), `hparams/best_mem_ratio` and
  `hparams/memorized` (0/1) as metrics. With several seeds a training's run is `<grid point>/D=<size>_seed=<s>`
  (`training_run`).
- `summary`: the HParams experiment (which columns the table has) and, per grid point,
  `emm/<grid label>/memorization_ratio` against |D| (step = |D|; `emm/<grid label>/seed=<s>/...` per seed with
  several seeds) with the ends of its 95 % interval (`..._low`, `..._high`), written as trainings finish and
  rewritten whole at the end of the sweep (sweeps/results.py), and `emm/<factor>`: EMM per grid index (step =
  index; the seeds' median).

The HParams protos are built here from tensorboard's own proto modules (no TensorFlow needed) and written
through the trial's SummaryWriter, into the same event file as its scalars.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from sweeps.folder import SweepFolder

SIZE_KEY = "|D|"
GRID_KEY = "grid point"
SEED_KEY = "seed"
METRIC_BEST = "hparams/best_mem_ratio"
METRIC_MEMORIZED = "hparams/memorized"


def tensorboard_dir(output: str | Path) -> Path:
    return SweepFolder(output).tensorboard


def hparam_value(value):
    """A value the HParams plugin can show and sort: numbers as numbers, bools as bools, the rest as text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if value is None or isinstance(value, str):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def seed_tag(config: dict) -> str:
    """'seed=1' for a training of a sweep with several seeds (config "seed_index", "seeds" as the searcher
    suggests them), '' with one seed: the names of a one-seed sweep stay as they were."""
    return f"seed={config.get('seed_index', 0)}" if config.get("seeds", 1) > 1 else ""


def trial_label(config: dict) -> str:
    """A training's name in the Ray dashboard, the console and --status: 'random_labels=10|D|=120', with several
    seeds 'random_labels=10|D|=120|seed=1'."""
    tag = seed_tag(config)
    return f"{config.get('grid_label')}|D|={config.get('size')}" + (f"|{tag}" if tag else "")


def training_run(config: dict) -> str:
    """A training's TensorBoard run under OUTPUT/tensorboard: '<grid point>/D=<size>', with '_seed=<s>' when the
    sweep has several seeds."""
    tag = seed_tag(config)
    return f"{str(config['grid_label']).replace('/', '_')}/D={config['size']}" + (f"_{tag}" if tag else "")


def trial_hparams(config: dict) -> dict:
    """The hyperparameters of one training: its grid point, the config keys its grid point sets, |D|, and its seed
    when the sweep has several (seed s trains with train.seed + s: the override itself is left out, as seed 0
    has none)."""
    hparams = {GRID_KEY: str(config.get("grid_label"))}
    overrides = dict(config.get("overrides") or {})
    if seed_tag(config):
        overrides.pop("train.seed", None)
    hparams.update({key: hparam_value(v) for key, v in sorted(overrides.items())})
    hparams[SIZE_KEY] = float(config["size"])
    if seed_tag(config):
        hparams[SEED_KEY] = float(config["seed_index"])
    return hparams


def _summary(tag: str, plugin_data):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(plugin_data))])


def session_start_summary(hparams: dict, start_time: float | None = None):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time() if start_time is None else start_time)
    for key, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = float(value)
        else:
            info.hparams[key].string_value = str(value)
    return _summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        session_start_info=info, version=metadata.PLUGIN_DATA_VERSION))


def session_end_summary(success: bool = True):
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    status = api_pb2.STATUS_SUCCESS if success else api_pb2.STATUS_FAILURE
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        session_end_info=info, version=metadata.PLUGIN_DATA_VERSION))


def experiment_summary(hparam_rows: list[dict], description: str = ""):
    """The HParams experiment: one column per key of the rows (type and domain from all rows' values) and the
    two metrics. Written once per sweep, so the table has the same columns whichever trial is read first."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    keys: list[str] = []
    for row in hparam_rows:
        keys += [k for k in row if k not in keys]
    infos = []
    for key in keys:
        values = [row[key] for row in hparam_rows if key in row]
        info = api_pb2.HParamInfo(name=key, display_name=key)
        distinct = sorted(set(values), key=lambda v: (str(type(v)), v))
        if all(isinstance(v, bool) for v in values):
            info.type = api_pb2.DATA_TYPE_BOOL
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[struct_pb2.Value(bool_value=v)
                                                                      for v in distinct]))
        elif all(isinstance(v, float) for v in values):
            info.type = api_pb2.DATA_TYPE_FLOAT64
            if key != SIZE_KEY and len(distinct) <= 20:   # |D| goes wherever the search goes: no domain
                info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[struct_pb2.Value(number_value=v)
                                                                          for v in distinct]))
        elif len({str(v) for v in values}) > 50:   # too many to tick: the table filters it by regex
            info.type = api_pb2.DATA_TYPE_STRING
        else:
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[struct_pb2.Value(string_value=str(v))
                                                                      for v in sorted({str(v) for v in values})]))
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=METRIC_BEST), display_name="best memorization ratio",
                                  description="highest memorization ratio over the training's evaluations"),
               api_pb2.MetricInfo(name=api_pb2.MetricName(tag=METRIC_MEMORIZED), display_name="memorized",
                                  description="1 if the best ratio reached 1 - epsilon, else 0")]
    experiment = api_pb2.Experiment(description=description, hparam_infos=infos, metric_infos=metrics,
                                    time_created_secs=time.time())
    return _summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(
        experiment=experiment, version=metadata.PLUGIN_DATA_VERSION))


def sweep_hparam_rows(grid_points: list[dict], size_range, seeds: int = 1) -> list[dict]:
    """What every training of a sweep can have as hyperparameters: its grid point's, |D| over the range, its seed."""
    rows = []
    for point in grid_points:
        for size in size_range:
            for seed in range(seeds):
                rows.append(trial_hparams({"grid_label": point["label"], "overrides": point.get("overrides"),
                                           "size": size, "seed_index": seed, "seeds": seeds}))
    return rows


# ---- per training (called from the trial) ----

def start_session(writer, config: dict) -> None:
    """Mark this run as an HParams session with the training's hyperparameters."""
    writer.file_writer.add_summary(session_start_summary(trial_hparams(config)))
    writer.flush()


def end_session(writer, best_ratio: float, epsilon: float, step: int) -> None:
    """The session's metrics and its end (written when the training has finished)."""
    writer.add_scalar(METRIC_BEST, best_ratio, step)
    from sweeps.bisection import memorized
    writer.add_scalar(METRIC_MEMORIZED, float(memorized(best_ratio, epsilon)), step)
    writer.file_writer.add_summary(session_end_summary(True))
    writer.flush()


# ---- per sweep (called from the driver) ----

def write_experiment(output: str | Path, grid_points: list[dict], size_range, description: str = "",
                     seeds: int = 1) -> None:
    """The HParams experiment in OUTPUT/tensorboard/summary, at the start of a sweep."""
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(SweepFolder(output).summary_run)) as writer:
        writer.file_writer.add_summary(experiment_summary(sweep_hparam_rows(grid_points, size_range, seeds),
                                                          description))


def write_sweep_summary(output: str | Path, factor: str, emm, trials, grid_points: list[dict], epsilon: float,
                        table: str = "") -> Path:
    """Rewrite OUTPUT/tensorboard/summary whole: the HParams experiment, memorization ratio against |D| per grid
    point, EMM per grid index, and the EMM table as text. Returns the run's folder."""
    from torch.utils.tensorboard import SummaryWriter
    run = SweepFolder(output).summary_run
    tmp = run.with_name(f".{run.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sizes = [int(s) for s in trials["size"].dropna()] if len(trials) else []
    size_range = [min(sizes), max(sizes)] if sizes else [1, 1]
    seeds = int(emm.seeds.max()) if "seeds" in emm and len(emm) else 1
    with SummaryWriter(str(tmp)) as writer:
        writer.file_writer.add_summary(experiment_summary(sweep_hparam_rows(grid_points, size_range, seeds),
                                                          f"EMM sweep over {factor}"))
        for point in grid_points:
            mine = trials[(trials.grid_label == point["label"]) & trials.best_mem_ratio.notna()]
            for _, row in mine.sort_values("size").iterrows():
                seed = row.get("seed", 0)
                config = {"grid_label": point["label"], "seed_index": 0 if seed != seed else int(seed), "seeds": seeds}
                _add_ratio(writer, ratio_label(config), int(row["size"]), float(row.best_mem_ratio),
                           row.get("best_mem_ratio_low"), row.get("best_mem_ratio_high"))
        legend = ["| grid index | value | EMM |", "|---|---|---|"]
        for i, row in enumerate(emm.itertuples()):
            value = row.emm
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                writer.add_scalar(f"emm/{factor}", float(value), i)
            legend.append(f"| {i} | {row.value} | {'-' if value != value or value is None else int(value)} "
                          f"{row.censored if isinstance(row.censored, str) else ''} |")
        writer.add_text(f"emm/{factor}/grid_index", "\n".join(legend), 0)
        if table:
            writer.add_text("emm/table", table, 0)
    shutil.rmtree(run, ignore_errors=True)
    tmp.rename(run)
    return run


def ratio_label(config: dict) -> str:
    """Where a training's memorization ratio goes in the summary run: 'emm/<this>/memorization_ratio', the grid
    point, and the seed when the sweep has several."""
    tag = seed_tag(config)
    return f"{config['grid_label']}/{tag}" if tag else str(config["grid_label"])


def _add_ratio(writer, label: str, size: int, ratio: float, low=None, high=None) -> None:
    """emm/<label>/memorization_ratio at step |D|, and its 95 % interval's ends (_low, _high) when known."""
    writer.add_scalar(f"emm/{label}/memorization_ratio", ratio, size)
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"emm/{label}/memorization_ratio_{name}", float(value), size)


class LiveSummary:
    """The driver's writer of `emm/<grid label>/memorization_ratio` points as trainings finish."""

    def __init__(self, output: str | Path):
        self.output = str(output)
        self._writer = None

    def add(self, label: str, size: int, ratio: float, low=None, high=None) -> None:
        """label: ratio_label of the training."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(SweepFolder(self.output).summary_run))
        _add_ratio(self._writer, label, int(size), ratio, low, high)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
