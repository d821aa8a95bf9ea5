"""The GPU fast path, exercised on CPU: precision (fp32 / tf32 flags / bf16 autocast), channels-last, torch.compile,
and DDP's distributed evaluation and checkpoints in a 2-process gloo group (torch.multiprocessing, no Ray).
Nothing here needs a GPU; bench/train_step.py measures the speed (bench/gpu_check.sh on a lent GPU)."""
import hashlib
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import diffmem.evaluate
import diffmem.train
from diffmem.config import ConfigError, load_config
from diffmem.data import training_set
from diffmem.evaluate import evaluate_denoiser
from diffmem.precision import full_precision, tf32_flags
from diffmem.train import CHECKPOINT, build_denoiser, train

DIGITS = "experiments/digits.yaml"
# 20 steps of 16 images on the 8x8 digits, the loss logged after every step, one evaluation at the end.
FAST = {"data.size": 20, "model.channels": 8, "train.batch_size": 16, "train.duration": "0.32kimg",
        "train.log_every": "0.016kimg", "eval.every": "100kimg", "eval.num_samples": 8, "eval.batch_size": 8,
        "eval.num_steps": 3}


class Scalars:
    """A SummaryWriter stand-in that keeps the logged per-step losses."""

    def __init__(self):
        self.loss = []

    def add_scalar(self, tag, value, step):
        if tag == "train/loss":
            self.loss.append(value)

    def __getattr__(self, name):   # add_image, add_text, ...: not needed here
        if name.startswith("add_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def _losses(overrides, steps=20, **kwargs):
    writer = Scalars()
    result = train(load_config(DIGITS, {**FAST, **overrides}), writer=writer, log=lambda *_: None, **kwargs)
    assert len(writer.loss) == steps
    return torch.tensor(writer.loss, dtype=torch.float64), result


# ---------------------------------------------------------------------------------------------------- config

def test_defaults_are_explicit_and_the_papers():
    t = load_config().train
    assert (t.precision, t.channels_last, t.compile) == ("fp32", True, False)   # paper: fp32, TF32 off


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp16", "train.precision='fp16' is not one of fp32, tf32, bf16; did you mean 'bf16'?"),
    ("train.precision=fp3", "train.precision='fp3' is not one of fp32, tf32, bf16; did you mean 'fp32'?"),
    ("train.precision=bf61", "train.precision='bf61' is not one of fp32, tf32, bf16; did you mean 'bf16'?"),
    ("train.channels_last=maybe", "train.channels_last='maybe' must be true or false"),
    ("train.compile=1", "train.compile=1 must be true or false"),
])
def test_bad_fast_path_settings_fail_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, [override])
    assert str(err.value) == message


# ------------------------------------------------------------------------------------------------- precision

@pytest.mark.parametrize("precision, expected", [("fp32", (False, False)), ("tf32", (True, True)),
                                                 ("bf16", (False, False))])
def test_precision_sets_the_tf32_flags_during_training_and_restores_them(precision, expected):
    before = tf32_flags()
    seen = []
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "tf32"   # the opposite
    try:
        train(load_config(DIGITS, {**FAST, "train.duration": "0.016kimg", "train.precision": precision}),
              report=lambda metrics, saved: seen.append(tf32_flags()), log=lambda *_: None)
        assert seen == [expected]
        assert tf32_flags() == (precision != "tf32",) * 2            # put back as found
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _spy(monkeypatch, module, name, record):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        record(*args, **kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)


def test_bf16_autocasts_the_training_step_only_and_evaluation_is_exact_fp32(monkeypatch):
    steps, sampling = [], []
    _spy(monkeypatch, diffmem.train, "denoising_loss",
         lambda denoiser, images, *a: steps.append(torch.is_autocast_enabled("cpu")))
    _spy(monkeypatch, diffmem.evaluate, "edm_sampler",
         lambda *a, **k: sampling.append((torch.is_autocast_enabled("cpu"), tf32_flags())))
    losses, result = _losses({"train.precision": "bf16"})
    assert steps == [True] * 20 and torch.isfinite(losses).all()
    assert sampling == [(False, (False, False))]
    assert 0 <= result.best_mem_ratio <= 1


def test_bf16_really_computes_in_bf16_and_keeps_fp32_weights(monkeypatch):
    dtypes = []

    def record(denoiser, images, *a):
        net = getattr(denoiser.net, "module", denoiser.net)
        net.out_conv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype)) if not dtypes else None
        dtypes.append(next(net.parameters()).dtype)
    _spy(monkeypatch, diffmem.train, "denoising_loss", record)
    _losses({"train.precision": "bf16", "train.duration": "0.032kimg"}, steps=2)
    assert torch.float32 in dtypes and torch.bfloat16 in dtypes   # fp32 weights, bf16 convolution outputs


def test_evaluation_ignores_an_enclosing_autocast_and_tf32():
    cfg = load_config(DIGITS, FAST)
    data = training_set(cfg.data)
    torch.manual_seed(0)
    denoiser = build_denoiser(cfg, data).eval()
    plain = evaluate_denoiser(denoiser, data, cfg.eval)
    before = tf32_flags()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = evaluate_denoiser(denoiser, data, cfg.eval)
        assert tf32_flags() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert inside.samples.dtype == torch.float32
    assert torch.equal(plain.samples, inside.samples) and torch.equal(plain.nn_index, inside.nn_index)
    with full_precision("cpu"):
        assert not torch.is_autocast_enabled("cpu") and tf32_flags() == (False, False)


# --------------------------------------------------------------------------------------- channels-last, compile

def test_channels_last_is_used_and_gives_the_same_fp32_loss_trajectory(monkeypatch):
    layouts = []
    def record(denoiser, images, *a):   # an 8 -> 8 channel conv (the digits themselves have one channel)
        weight = denoiser.net.enc["8x8_block0"].conv0.weight
        layouts.append((weight.is_contiguous(memory_format=torch.channels_last), weight.is_contiguous()))
    _spy(monkeypatch, diffmem.train, "denoising_loss", record)
    # dropout 0: dropout masks are drawn in memory order, so with dropout > 0 the two layouts draw different
    # (equally distributed) masks; the arithmetic itself is what must agree.
    nchw, _ = _losses({"train.channels_last": False, "model.dropout": 0.0})
    assert set(layouts) == {(False, True)}
    layouts.clear()
    nhwc, _ = _losses({"train.channels_last": True, "model.dropout": 0.0})
    assert set(layouts) == {(True, False)}
    # The same sums in another order: float32 rounding (eps 1.2e-7) per reordered reduction, ~2e-7 relative
    # after 20 steps here. 1e-5 leaves a 50x margin; a layout bug (H and W or channels mixed up) moves the
    # loss by tens of percent.
    torch.testing.assert_close(nhwc, nchw, rtol=1e-5, atol=0)


def test_compile_wraps_the_training_network_only(monkeypatch, tmp_path):
    """The compile branch on CPU, through Dynamo with the eager backend (inductor's C++ build is the slow
    test below): same arithmetic, the checkpoint holds the plain network's keys."""
    monkeypatch.setattr(diffmem.train, "COMPILE_OPTIONS", {"backend": "eager"})
    nets = []
    _spy(monkeypatch, diffmem.train, "denoising_loss", lambda denoiser, *a: nets.append(type(denoiser.net).__name__))
    compiled, _ = _losses({"train.compile": True, "model.dropout": 0.0}, run_dir=tmp_path)
    assert set(nets) == {"OptimizedModule"}
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert not any("_orig_mod" in k for k in [*ckpt["model"], *ckpt["ema"]])
    plain, _ = _losses({"model.dropout": 0.0})
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_compile_with_inductor_on_cpu(monkeypatch):
    """torch.compile's default backend (a C++ build on CPU): a minute or more of compiling on 2 cores."""
    monkeypatch.setattr(diffmem.train, "COMPILE_OPTIONS", {})
    compiled, _ = _losses({"train.compile": True, "model.dropout": 0.0})
    plain, _ = _losses({"model.dropout": 0.0})
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=0)   # fused kernels round differently


# ---------------------------------------------------------------------------------------- DDP (2 gloo processes)

EVAL_CASES = [   # (num_samples, batch_size): uneven batches, more workers than batches, adaptive looks
    {"eval.num_samples": 40, "eval.batch_size": 16}, {"eval.num_samples": 10, "eval.batch_size": 16},
    {"eval.num_samples": 40, "eval.batch_size": 8, "eval.memorized_at": 0.5}]


def _group(rank, world, rendezvous):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def _eval_worker(rank, world, rendezvous, out):
    _group(rank, world, rendezvous)
    try:
        results = []
        for case in EVAL_CASES:
            cfg = load_config(DIGITS, {**FAST, **case, "data.labels": "true", "eval.threshold": 0.9})
            data = training_set(cfg.data)
            torch.manual_seed(0)
            denoiser = build_denoiser(cfg, data).eval()   # the same weights in every process
            spread = evaluate_denoiser(denoiser, data, cfg.eval, device="cpu", rank=rank, world=world)
            single = evaluate_denoiser(denoiser, data, cfg.eval, device="cpu") if rank == 0 else None
            results.append((spread, single))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_evaluation_equals_the_single_process_one(tmp_path):
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert [spread for spread, _ in rank1] == [None] * len(EVAL_CASES)   # only rank 0 gets the result
    for (spread, single), case in zip(rank0, EVAL_CASES):
        adaptive = "eval.memorized_at" in case
        assert len(spread.samples) == (len(single.samples) if adaptive else case["eval.num_samples"])
        assert spread.memorized == single.memorized
        for field in ("samples", "nn_ratio", "nn_index"):
            assert torch.equal(getattr(spread, field), getattr(single, field)), field
        assert spread.ratio == single.ratio


class Interrupted(Exception):
    pass


def _digest(module) -> str:
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


DDP = {**FAST, "train.duration": "0.64kimg", "eval.every": "0.32kimg", "eval.num_samples": 24,
       "eval.batch_size": 8, "model.dropout": 0.1}


def _ddp_worker(rank, world, rendezvous, out, run_dirs, stop_after, overrides):
    """One DDP worker of diffmem.train.train on DDP + overrides. At every evaluation it records a digest of its EMA
    weights, and rank 0 also evaluates that EMA in one process; it keeps the losses it logs; with stop_after it
    dies after that many reports."""
    _group(rank, world, rendezvous)
    digests, single, reports, writer = [], [], [], Scalars()
    real = diffmem.train.evaluate_denoiser

    def spy(ema, data, cfg, device=None, rank=0, world=1):
        digests.append(_digest(ema))
        result = real(ema, data, cfg, device=device, rank=rank, world=world)
        if rank == 0:
            alone = real(ema, data, cfg, device=device)
            single.append(torch.equal(result.samples, alone.samples) and torch.equal(result.nn_index, alone.nn_index)
                          and torch.equal(result.nn_ratio, alone.nn_ratio) and result.ratio == alone.ratio)
        return result
    diffmem.train.evaluate_denoiser = spy

    def report(metrics, saved):
        reports.append({k: v for k, v in metrics.items()   # all but the clocks
                        if k not in ("images_per_sec", "step_seconds", "eval_seconds")})
        if stop_after and len(reports) >= stop_after:
            raise Interrupted
    try:
        train(load_config(DIGITS, {**DDP, **overrides}), run_dirs[rank], report=report, writer=writer,
              log=lambda *_: None)
    except Interrupted:
        pass
    finally:
        torch.distributed.destroy_process_group()
    torch.save({"digests": digests, "single": single, "reports": reports, "loss": writer.loss},
               Path(out) / f"rank{rank}.pt")
    # Leave without C++ static destructors: torch keeps a process group that DDP used alive past
    # destroy_process_group (its gloo threads still run), and its destruction at exit aborted ~1 exit in 4 here
    # ("terminate called without an active exception", SIGABRT) after the results above were saved.
    os._exit(0)


def _ddp_run(tmp_path, name, run_dirs, stop_after=0, overrides=None):
    out = tmp_path / name
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(out / "rendezvous"), str(out), [str(d) for d in run_dirs], stop_after,
                                overrides or {}), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ddp_ranks_agree_evaluate_as_one_process_and_resume_from_the_checkpoint_folder(tmp_path):
    whole_dirs = [tmp_path / "whole0", tmp_path / "whole1"]
    whole = _ddp_run(tmp_path, "whole", whole_dirs)
    # The EMA is the same on every rank at every evaluation (rank 0's initial weights are broadcast), so
    # the ranks' shares of the samples come from one model, and the spread evaluation is the one-process one.
    assert len(whole[0]["digests"]) == 2 and whole[0]["digests"] == whole[1]["digests"]
    assert whole[0]["single"] == [True, True]
    assert whole[0]["reports"] == whole[1]["reports"]
    assert all(math.isfinite(r["loss"]) and 0 <= r["mem_ratio"] <= 1 for r in whole[0]["reports"])
    assert not (whole_dirs[1] / CHECKPOINT).exists()                  # rank 0 alone writes checkpoints

    # A worker failure: both ranks die after the first evaluation. What Ray Train hands back to the new
    # workers is the reported folder (run_dir/checkpoint/) and nothing else: copy only that, resume.
    split_dirs = [tmp_path / "split0", tmp_path / "split1"]
    _ddp_run(tmp_path, "first-half", split_dirs, stop_after=1)
    fresh = [tmp_path / "restored0", tmp_path / "restored1"]
    for d in fresh:
        shutil.copytree(split_dirs[0] / Path(CHECKPOINT).parent, d / Path(CHECKPOINT).parent)
    resumed = _ddp_run(tmp_path, "second-half", fresh)
    assert resumed[0]["reports"] == whole[0]["reports"][1:]
    assert resumed[0]["digests"] == whole[0]["digests"][1:] == resumed[1]["digests"]
    a = torch.load(whole_dirs[0] / CHECKPOINT, weights_only=False)
    b = torch.load(fresh[0] / CHECKPOINT, weights_only=False)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_two_ddp_workers_follow_the_one_process_loss_curve(tmp_path):
    """2 workers x 8 images per step train as 1 process x 16 with the same seed: each rank takes rows rank::2 of the
    global batch and the noise level and noise that the one process draws for those rows (a noise generator seeded
    alike on every rank, diffmem.edm.draw_noise's shard), DDP averages the gradients and the logged loss is the
    global batch's. Dropout 0: its masks are each rank's own draw (the default generator, seed + rank)."""
    same = {"model.dropout": 0.0, "train.duration": "0.32kimg", "eval.every": "0.16kimg", "eval.num_samples": 8}
    ranks = _ddp_run(tmp_path, "ddp", [tmp_path / "rank0", tmp_path / "rank1"], overrides=same)
    writer, reports = Scalars(), []
    train(load_config(DIGITS, {**DDP, **same}), tmp_path / "alone", writer=writer, log=lambda *_: None,
          report=lambda metrics, saved: reports.append(metrics))
    alone = torch.tensor(writer.loss, dtype=torch.float64)
    assert len(alone) == 20 and torch.isfinite(alone).all()   # a loss logged after every one of the 20 steps
    # The same images, noise and update; only the order of float sums differs (two half-batch gradients averaged
    # by the all-reduce, one thread per worker), ~1e-7 relative here. 1e-5 leaves a wide margin; independent
    # noise per rank (the old seed + rank) moves single steps' losses by tens of percent.
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["loss"], dtype=torch.float64), alone, rtol=1e-5, atol=0)
    assert [r["images_seen"] for r in ranks[0]["reports"]] == [r["images_seen"] for r in reports] == [160, 320]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in ranks[0]["reports"]], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in reports], dtype=torch.float64), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------- bench/train_step.py via gpu_check.sh

def test_gpu_check_script_runs_on_cpu_in_smoke_mode(tmp_path):
    """The one-shot GPU check is itself tested here, at toy size on CPU, so a lent GPU is not spent on its bugs."""
    import json
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--smoke", "--variants",
                          "fp32,bf16+cl+compile"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr
    assert "train_step smoke bf16+cl+compile/fp32 images/s" in run.stdout and "machine: " in run.stdout
    assert "one evaluation of 10k samples" in run.stdout
    assert "train_step smoke fp32 FLOP/s / fp32 matmul FLOP/s" in run.stdout
    assert "train_step smoke packed K=2/alone images/s" in run.stdout
    figures = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["variant"] for r in figures["training"]] == ["fp32", "bf16+cl+compile"]
    assert 0 < figures["training"][0]["flops_fraction"] < 1
    packed = json.loads((tmp_path / "gpu_check_packed.json").read_text())["packed"]
    assert [r["pack"] for r in packed] == [1, 1, 2]
    assert all(r["images_per_sec"] > 0 and math.isfinite(r["final_loss"]) for r in figures["training"])
    assert figures["evaluation"]["evaluation_s_per_10k"] > 0


# ------------------------------------------------------------------------------- Ray: a worker killed mid-training

@pytest.mark.slow
def test_ddp_trial_resumes_from_its_checkpoint_after_a_worker_is_killed(tmp_path):
    """emm_trial_ddp under Tune: SIGKILL one Ray Train worker after the first checkpoint; Train's FailureConfig
    restarts the worker group, which resumes from that checkpoint (ray.train.get_checkpoint) and finishes, and
    reports what the in-process trial (emm_trial) reports."""
    import os
    import signal
    import threading
    import time

    import ray
    from ray import tune
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sweeps.reaper import descendants
    from sweeps.spec import settings_of
    from sweeps.trainable import emm_trial_ddp, trial_logdir
    base = load_config(DIGITS, {"model.channels": 8, "train.duration": "8kimg", "eval.every": "1kimg",
                                "eval.num_samples": 16, "eval.batch_size": 16, "eval.num_steps": 4}).to_dict()
    settings = settings_of(base, 0.1, tmp_path, None, early_stop=False, workers=2)
    config = {"grid_index": 0, "grid_label": "killed", "grid_value": None, "overrides": {}, "size": 20}
    ray.init(num_cpus=2, resources={"trial_slot": 1}, include_dashboard=False)
    try:
        trainable = tune.with_resources(tune.with_parameters(emm_trial_ddp, settings=settings),
                                        {"cpu": 0, "trial_slot": 1})
        tuner = tune.Tuner(trainable, param_space=config,
                           run_config=tune.RunConfig(name="killed", storage_path=str(tmp_path), verbose=0))
        result = {}
        fit = threading.Thread(target=lambda: result.update(grid=tuner.fit()))
        fit.start()
        def latest_images():   # Train persists each reported checkpoint folder into storage_path
            seen = 0
            for path in (tmp_path / "train").rglob("checkpoint.pt"):
                try:
                    seen = max(seen, torch.load(path, weights_only=False)["state"]["images_seen"])
                except Exception:   # still being copied
                    pass
            return seen
        deadline = time.time() + 400
        while time.time() < deadline and latest_images() < 3000:
            time.sleep(0.5)
        time.sleep(2)   # a checkpoint counts once the controller has registered it, not when its files land
        workers = [p for p in descendants(os.getpid()) if b"RayTrainWorker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert workers, "no Ray Train worker to kill"
        os.kill(max(workers), signal.SIGKILL)
        fit.join(timeout=900)
        grid = result["grid"]
        assert not grid.errors, grid.errors
        assert grid[0].metrics["images_seen"] >= grid[0].metrics["planned_images"] == 8000
        # what the in-process trial reports (trials.csv's columns), from rank 0 through TuneReportCallback
        keys = {"best_mem_ratio", "best_num_samples", "mem_ratio", "images_seen", "planned_images", "loss", "epoch",
                "train_node_id", "train_node_ip"}
        assert keys <= set(grid[0].metrics) and 0 <= grid[0].metrics["best_mem_ratio"] <= 1
    finally:
        ray.shutdown()
    # rank 0's TensorBoard files: one per start of the worker group; the second starts after a checkpoint
    runs = sorted(trial_logdir(settings, config, tmp_path).glob("events.*"),   # no --storage: OUTPUT/tensorboard
                  key=lambda p: p.stat().st_mtime)
    firsts = []
    for run in runs:
        events = EventAccumulator(str(run)).Reload()
        if "memorization/mem_ratio" in events.Tags()["scalars"]:
            firsts.append(events.Scalars("memorization/mem_ratio")[0].step)
    assert len(firsts) >= 2 and firsts[-1] > firsts[0]
