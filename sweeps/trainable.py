"""Tune function trials: one EDM training of one grid point at one |D|, through diffmem's narrow door.

`emm_trial` trains in the trial's own process (one worker). `emm_trial_ddp` is the Ray 2.60 Train V2
pattern (`Tuner(TorchTrainer(...))` fails under Train V2): the Tune trial is a light driver that builds and
fits a TorchTrainer whose workers run the same `diffmem.train.train` loop under DDP. Both report the running
maximum memorization ratio after every evaluation and stop once it reaches 1 - epsilon: the maximum can
only grow, so the trial's answer ("memorized") is then final.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from ray import tune

from diffmem.config import apply_overrides, from_dict
from diffmem.train import CHECKPOINT, train
from sweeps.disk import run_dir_of_this_process
from sweeps.ledger import Ledger, key_context, training_key
from sweeps.results import interval_of
from sweeps.folder import TENSORBOARD, TRAIN_NAME
from sweeps.storage import filesystem, join, root, upload
from sweeps.tblog import end_session, start_session, tensorboard_dir, trial_label, training_run


def trial_config(settings: dict, config: dict):
    """The resolved diffmem Config of one trial: base config, grid-point overrides, |D| and the stop rule.

    train.device 'auto' becomes the device the trial reserves: cuda with GPUs per worker, else cpu. The
    driver (which may have no GPU) and the trial then agree on it, and a trial without a GPU of its own never
    takes one Ray does not hide from it (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for 0-GPU workers)."""
    memorized_at = 1 - settings["epsilon"] if settings.get("early_stop", True) else None   # a curve (sweeps/curve.py)
    overrides = {**config["overrides"], "data.size": config["size"], "eval.memorized_at": memorized_at}
    cfg = from_dict(apply_overrides(settings["base"], overrides))
    if cfg.train.device == "auto":
        cfg.train.device = "cuda" if settings.get("gpus_per_worker", 0) > 0 else "cpu"
    return cfg


def trial_key(settings: dict, config: dict) -> tuple[str, dict, dict]:
    """(ledger key, resolved config, key context) of one trial, the same in the driver and in the trial."""
    cfg = trial_config(settings, config)
    resolved, context = cfg.to_dict(), key_context(cfg)
    return training_key(resolved, context), resolved, context


def trial_logdir(settings: dict, config: dict, run_dir: Path) -> Path:
    """Where a trial's TensorBoard events and sample grids go: OUTPUT/tensorboard/<grid point>/D=<size>[_seed=<s>]
    (sweeps.tblog.training_run); with --storage, the training's run folder, from which share_tensorboard sends
    them to the storage (the sweep folder is the driver's alone, sweeps/storage.py)."""
    if settings.get("storage"):
        return run_dir / TENSORBOARD
    return tensorboard_dir(settings["output"]) / training_run(config)


def share_tensorboard(settings: dict, config: dict, writer, logdir: Path) -> None:
    """With --storage: the training's TensorBoard run so far, to URI/tensorboard/<run>, at each checkpoint and at
    its end; the driver brings it into OUTPUT/tensorboard (sweeps.progress.FromStorage)."""
    if settings.get("storage") and writer is not None:
        writer.flush()
        fs, path = filesystem(settings["storage"])
        upload(logdir, fs, join(path, TENSORBOARD, training_run(config)))


def where_this_trains() -> dict:
    """The Ray node of the process that trains (rank 0's under DDP), reported with every result so trials.csv says
    where each training ran. Tune's own node_ip is the trial actor's, which a DDP trial's workers need not share;
    the node id tells apart nodes that share an address."""
    import ray
    return {"train_node_id": ray.get_runtime_context().get_node_id(),
            "train_node_ip": ray.util.get_node_ip_address()}


def _restore_into(checkpoint, run_dir: Path) -> None:
    """Copy a reported checkpoint folder back to where diffmem.train looks for it. One the sweep emptied (its
    training had finished, sweeps/disk.py) holds nothing: the training starts afresh (only with --no-reuse does
    a finished training get this far)."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as d:
        target = run_dir / CHECKPOINT
        if (Path(d) / target.name).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(d) / target.name, target)


def _run(settings: dict, config: dict, run_dir: Path, report, writer, logdir: Path | None, record: bool) -> None:
    torch.set_num_threads(max(1, int(settings.get("threads_per_worker", 1))))
    begin_training(config, writer)

    def report_and_share(metrics: dict, saved: Path | None) -> None:
        if saved is not None:   # what a retry elsewhere would not have: the events up to this checkpoint
            share_tensorboard(settings, config, writer, logdir)
        report(metrics, saved)

    result = train(trial_config(settings, config), run_dir, report=report_and_share, writer=writer,
                   log=lambda *_: None)
    end_training(settings, config, result, writer, record)
    share_tensorboard(settings, config, writer, logdir)


def begin_training(config: dict, writer) -> None:
    """Before a trial's training: its HParams session (sweeps/tblog.py)."""
    if writer is not None:
        start_session(writer, config)


def end_training(settings: dict, config: dict, result, writer, record: bool) -> None:
    """After a trial's training: the end of its HParams session, and its record in the ledger the moment it
    finishes, before Tune hears of it (with --storage the driver records it: sweeps.progress.FromStorage)."""
    if writer is not None:
        end_session(writer, result.best_mem_ratio, settings["epsilon"], result.images_seen)
    if record and settings.get("ledger") and not settings.get("storage"):
        key, resolved, context = trial_key(settings, config)   # the data fingerprint of the arrays it trained on
        Ledger(settings["ledger"]).put(key, resolved, context, result.history[-1], result.step_seconds)


def relocated(path: str | None, old_output: str, new_output: str) -> str | None:
    """A path of a sweep folder that moved from old_output to new_output: inside the folder, it moved with it (the
    default ledger, OUTPUT/ledger.sqlite); outside (a shared --ledger), it stays."""
    if path is None:
        return None
    inside = Path(path).is_relative_to(old_output)
    return str(Path(new_output) / Path(path).relative_to(old_output)) if inside else path


def settings_moved_to(settings: dict, output: str) -> dict:
    """A sweep's trial settings with the sweep folder at `output` (its own ledger with it, a shared one staying)."""
    return {**settings, "output": output, "ledger": relocated(settings["ledger"], settings["output"], output)}


class KnownResults:
    """Asked by the searcher before it proposes a training: the ledger's record of that trial, if any."""

    def __init__(self, settings: dict):
        self.settings = settings
        self._ledger = None      # opened (and checked) once

    def moved_to(self, output: str) -> None:
        """The sweep folder is now at `output` (a restored searcher's settings hold the old paths)."""
        self.settings = settings_moved_to(self.settings, output)
        self._ledger = None

    def __call__(self, config: dict) -> dict | None:
        if getattr(self, "_ledger", None) is None:   # also when unpickled from an older tuner.pkl
            self._ledger = Ledger(self.settings["ledger"])
        return self._ledger.get(trial_key(self.settings, config)[0])


def _report_known(settings: dict, config: dict) -> bool:
    """A trial the ledger already holds (it finished before a killed driver's last snapshot): report the
    record, marked from_ledger, instead of training again. Never with --no-reuse (settings["no_reuse"]), nor with
    --storage, where the ledger is the driver's alone (such a trial trains again, from its checkpoint if any)."""
    if settings.get("no_reuse") or not settings.get("ledger") or settings.get("storage"):
        return False
    known = KnownResults(settings)(config)
    if known is not None:   # the interval the training reported: from its ratio and the samples behind it
        low, high = interval_of(known["best_mem_ratio"], known["best_num_samples"])
        tune.report({k: known[k] for k in ("best_mem_ratio", "best_num_samples", "images_seen", "planned_images")}
                    | {"best_mem_ratio_low": low, "best_mem_ratio_high": high, "from_ledger": 1})
    return known is not None


def emm_trial(config: dict, settings: dict) -> None:
    """One training in this process, or with --pack-size K > 1 in a pack server's (sweeps/packing.py).
    Checkpoints go to Tune, so a failed or restored trial resumes."""
    from torch.utils.tensorboard import SummaryWriter
    if _report_known(settings, config):
        return
    run_dir = run_dir_of_this_process("trial")
    node = where_this_trains()
    try:
        _restore_into(tune.get_checkpoint(), run_dir)

        def report(metrics: dict, saved: Path | None) -> None:
            checkpoint = tune.Checkpoint.from_directory(str(saved.parent)) if saved is not None else None
            tune.report(metrics | node, checkpoint=checkpoint)

        if settings.get("pack_size", 1) > 1:   # trained in a pack by a pack server (sweeps/packing.py)
            from sweeps.packing import train_in_pack
            train_in_pack(settings, config, run_dir, report)
            return
        logdir = trial_logdir(settings, config, run_dir)
        with SummaryWriter(str(logdir)) as writer:
            _run(settings, config, run_dir, report, writer, logdir, record=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _ddp_worker(loop_config: dict) -> None:
    """One Ray Train worker: the same training loop, its share of each batch, gradients averaged by DDP."""
    import ray.train
    from torch.utils.tensorboard import SummaryWriter
    settings, config = loop_config["settings"], loop_config["config"]
    rank = ray.train.get_context().get_world_rank()
    run_dir = run_dir_of_this_process(f"rank{rank}")
    node = where_this_trains()
    try:
        _restore_into(ray.train.get_checkpoint(), run_dir)

        def report(metrics: dict, saved: Path | None) -> None:   # every rank reports; rank 0 holds the checkpoint
            checkpoint = ray.train.Checkpoint.from_directory(str(saved.parent)) if saved is not None else None
            ray.train.report(metrics | node, checkpoint=checkpoint)

        logdir = trial_logdir(settings, config, run_dir) if rank == 0 else None
        writer = SummaryWriter(str(logdir)) if rank == 0 else None
        try:
            _run(settings, config, run_dir, report, writer, logdir, record=rank == 0)
        finally:
            if writer is not None:
                writer.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def emm_trial_ddp(config: dict, settings: dict) -> None:
    """A Tune trial that drives a TorchTrainer with settings["workers"] DDP workers (gloo on CPU, NCCL on GPU).

    The Train run is named after the Tune trial id, which survives Tuner.restore, so a restored trial's
    TorchTrainer resumes from its own last checkpoint (Train V2 auto-resume)."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    if _report_known(settings, config):
        return
    use_gpu = settings.get("gpus_per_worker", 0) > 0
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"settings": settings, "config": config},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings["workers"], use_gpu=use_gpu,
            resources_per_worker={"GPU": 1} if use_gpu else {"CPU": settings.get("threads_per_worker", 1)}),
        run_config=ray.train.RunConfig(
            name=f"train_{tune.get_context().get_trial_id()}",
            storage_path=join(root(settings.get("storage"), settings["output"]), TRAIN_NAME),
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            # fail instead of waiting forever for workers that cannot be placed (a Ray 2.60 Train V2 hang)
            failure_config=ray.train.FailureConfig(max_failures=settings.get("max_failures", 1),
                                                   controller_failure_limit=1)),
    )
    trainer.fit()


def named(trial_function, settings: dict):
    """`trial_function` with `settings` as Tune's trainable class, whose actors the Ray dashboard (Actors, and the
    state API's repr_name) lists by the training they run, e.g. 'random_labels=16|D|=80|seed=1': Ray reads an
    actor's repr once, after its start, so a reused actor keeps its first name (sweeps.tuner.reuse_actors)."""
    from ray.tune.trainable.function_trainable import wrap_function
    base = wrap_function(tune.with_parameters(trial_function, settings=settings))

    def setup(self, config):
        self._name = trial_label(config)   # ImplicitFunc.__repr__ returns it
        return base.setup(self, config)

    return type("EMMTraining", (base,), {"setup": setup})
