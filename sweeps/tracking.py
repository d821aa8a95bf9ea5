"""Opt-in tracking where researchers already look: W&B (--wandb PROJECT) and MLflow (--mlflow URI).

Each training is one run, through Ray Tune's own logger callbacks (WandbLoggerCallback, MLflowLoggerCallback),
with TensorBoard's hyperparameters (sweeps.tblog.trial_hparams: grid point, the config keys it sets, |D|, seed)
and every result the training reports (memorization ratio and its running maximum with their 95 % intervals,
loss, lr, images seen). When the sweep has its table, one more run, "<factor> EMM", holds it: emm.csv as a
table, EMM per grid point, emm.md, emm.png, curves.png. A sweep's runs are grouped under its folder's name (the
W&B group, the MLflow experiment). W&B's runs are written under OUTPUT/wandb (with WANDB_MODE=offline only
there; `wandb sync` uploads them later); `--mlflow sqlite:///path/mlflow.db` is a local store (MLflow 3
refuses its old file:// store; check says so before Ray starts), `http://host:5000` a tracking server. The
packages are an extra: pip install 'diffmem[tracking]'.
"""
from __future__ import annotations

import importlib.util
import math
import re
import time
from pathlib import Path

from diffmem.config import ConfigError
from sweeps.folder import SweepFolder

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}   # flag -> module


def check(tracking: dict) -> None:
    """Before Ray starts: each tracker asked for can be imported, and MLflow's store answers."""
    for flag, module in PACKAGES.items():
        if tracking.get(flag) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--{flag} needs the {module} package; pip install 'diffmem[tracking]' "
                              f"(or leave --{flag} out)")
    if tracking.get("mlflow"):
        from mlflow.tracking import MlflowClient
        try:
            MlflowClient(tracking_uri=tracking["mlflow"]).search_experiments(max_results=1)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
            raise ConfigError(f"--mlflow {tracking['mlflow']}: {first[:300]}; give a tracking server "
                              f"(http://host:port) or a local database (sqlite:///path/mlflow.db)") from None


def group_name(output: Path) -> str:
    return Path(output).resolve().name


class _HParamsAsConfig:
    """Ray's logger callbacks log trial.config as the run's parameters; show them TensorBoard's hyperparameters
    instead (the callbacks run in the driver's one thread, so the config is back before anything else reads it)."""

    @staticmethod
    def param_name(name: str) -> str:
        return name

    def log_trial_start(self, trial):
        from sweeps.tblog import trial_hparams
        config = trial.config
        trial.config = {self.param_name(k): v for k, v in trial_hparams(config).items()}
        try:
            super().log_trial_start(trial)
        finally:
            trial.config = config

    def log_trial_result(self, iteration, trial, result):
        # Tune's result carries the trial config, which Ray's callbacks log again (W&B: into the run's config)
        super().log_trial_result(iteration, trial, {k: v for k, v in result.items() if k != "config"})


def callbacks(tracking: dict, output: Path) -> list:
    """The Tune callbacks for the trackers asked for (one run per training)."""
    found = []
    if tracking.get("wandb"):
        from ray.air.integrations.wandb import WandbLoggerCallback

        class WandbPerTraining(_HParamsAsConfig, WandbLoggerCallback):
            pass
        found.append(WandbPerTraining(project=tracking["wandb"], group=group_name(output),
                                      dir=str(Path(output).resolve())))
    if tracking.get("mlflow"):
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class MLflowPerTraining(_HParamsAsConfig, MLflowLoggerCallback):
            @staticmethod
            def param_name(name: str) -> str:   # MLflow takes letters, digits and _-. :/ ("|D|" is "D")
                return re.sub(r"[^\w\-. :/]", "", name)

            def log_trial_result(self, iteration, trial, result):
                # one request per result (Ray's util sends one per metric: 27 SQLite commits or HTTP calls),
                # at TensorBoard's step, the images seen
                from mlflow.entities import Metric
                from mlflow.tracking import MlflowClient
                step, now = int(result.get("images_seen") or iteration), int(time.time() * 1000)
                metrics = [Metric(key, float(value), now, step) for key, value in result.items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)]
                MlflowClient(tracking_uri=self.tracking_uri).log_batch(self._trial_runs[trial], metrics=metrics)
        found.append(MLflowPerTraining(tracking_uri=tracking["mlflow"], experiment_name=group_name(output),
                                       tags={"diffmem": "training"}))
    return found


def _emm_metrics(emm) -> dict[str, float]:
    return {f"emm/{row.value}": float(row.emm) for row in emm.itertuples()
            if isinstance(row.emm, (int, float)) and math.isfinite(row.emm)}


def log_table(tracking: dict, output: Path, factor: str, emm, epsilon: float) -> None:
    """The sweep's EMM table as one run of each tracker, once the table is written in OUTPUT."""
    output = Path(output).resolve()
    files = [f for f in SweepFolder(output).results() if f.name != "trials.csv"]
    params = {"factor": factor, "epsilon": epsilon, "output": str(output)}
    if tracking.get("mlflow"):
        import mlflow
        mlflow.set_tracking_uri(tracking["mlflow"])
        mlflow.set_experiment(group_name(output))
        with mlflow.start_run(run_name=f"{factor} EMM", tags={"diffmem": "emm"}):
            mlflow.log_params(params)
            mlflow.log_metrics(_emm_metrics(emm))
            mlflow.log_table(emm.astype(str), artifact_file="emm_table.json")
            for path in files:
                mlflow.log_artifact(str(path))
    if tracking.get("wandb"):
        import wandb
        run = wandb.init(project=tracking["wandb"], group=group_name(output), name=f"{factor} EMM",
                         job_type="emm", dir=str(output), config=params, reinit="create_new")
        try:
            run.log({"emm": wandb.Table(dataframe=emm.astype(str)), **_emm_metrics(emm),
                     **{p.stem: wandb.Image(str(p)) for p in files if p.suffix == ".png"}})
            for path in files:
                run.save(str(path), base_path=str(output), policy="now")
        finally:
            run.finish()
