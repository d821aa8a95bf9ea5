"""Packed trainings in a sweep (--pack-size K): each worker process trains up to K trainings at once as packs
(diffmem/packed.py), while Tune, the searcher, the ledger, progress and TensorBoard still see one trial per
training, as without packing.

One PackServer actor per slot holds the slot's CPU (or GPU) and steps its packs; the driver starts them. A trial
is a light client with no CPU of its own (one `pack_member` resource; the sweep runs slots x K of them at once,
so the searcher plans k-section probes for slots x K workers): it joins its training to the least-loaded
server and forwards that server's reports (metrics and the checkpoint as bytes, so server and trial need not
share a disk) to Tune until its training has finished. A server keeps one pack per architecture (random labels
change label_dim) and steps them in turn.

Failures: a member whose loss diverges fails its own trial. A server that dies is restarted by Ray, empty; the
trials it held fail, Tune retries them (--max-failures), and each rejoins from the checkpoint Tune restored to
it. A trial that went away (Ctrl-C, or Tune stopped it) stops polling, and its server drops the member after
ABANDONED_AFTER seconds.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import traceback
import uuid
from pathlib import Path

import ray
import torch

from diffmem.packed import Member, Pack, pack_key, prepare_member
from sweeps.folder import atomic_write
from diffmem.train import CHECKPOINT, TrainingDiverged

SERVER_NAME = "diffmem-pack-server-{}"
POLL_SECONDS = 5.0       # a trial's wait for news from its server
ABANDONED_AFTER = 60.0   # a member whose trial has not polled for this long is dropped


class PackedTrainingFailed(RuntimeError):
    """The pack server could not train this member (its error, or the server restarted without it)."""


class PackServer:
    """Trains the members trials join, in packs, on this process's CPU threads or GPU (a Ray actor: start_servers)."""

    def __init__(self, threads: int):
        torch.set_num_threads(max(1, threads))
        self.cv = threading.Condition()
        self.joining: list[tuple] = []          # (trial key, settings, config, checkpoint bytes)
        self.events: dict[str, list] = {}       # trial key -> events not yet polled
        self.polled: dict[str, float] = {}      # trial key -> when it last polled
        self.members: dict[str, tuple] = {}     # trial key -> (pack, member index, writer, run_dir, settings, config)
        threading.Thread(target=self._loop, daemon=True, name="pack-server").start()

    # ---- called by trials ----
    def load(self) -> int:
        with self.cv:
            return len(self.members) + len(self.joining)

    def join(self, key: str, settings: dict, config: dict, checkpoint: bytes | None) -> None:
        with self.cv:
            self.events[key], self.polled[key] = [], time.monotonic()
            self.joining.append((key, settings, config, checkpoint))
            self.cv.notify_all()

    def poll(self, key: str, timeout: float = POLL_SECONDS) -> list:
        """The member's events since the last poll: ("report", metrics, checkpoint bytes or None), ("done",) or
        ("error", message); waits up to `timeout` for one."""
        with self.cv:
            if key not in self.events:
                return [("error", "its pack server restarted without it (the server process was lost)")]
            self.polled[key] = time.monotonic()
            self.cv.wait_for(lambda: self.events[key], timeout)
            events, self.events[key] = self.events[key], []
            if events and events[-1][0] != "report":   # the member is over
                self.events.pop(key), self.polled.pop(key, None)
            return events

    # ---- the training thread ----
    def _emit(self, key: str, event: tuple) -> None:
        with self.cv:
            if key in self.events:
                self.events[key].append(event)
                self.cv.notify_all()

    def _loop(self) -> None:
        packs: list[Pack] = []
        while True:
            with self.cv:
                if not self.joining and not any(len(p) for p in packs):
                    self.cv.wait(timeout=1.0)
                joining, self.joining = self.joining, []
                now = time.monotonic()
                abandoned = [k for k in self.members if now - self.polled.get(k, now) > ABANDONED_AFTER]
            for key in abandoned:
                self._close(key)
                pack, index = self.members.pop(key)[:2]
                pack.drop(index)
            for job in joining:
                self._admit(packs, *job)
            for pack in [p for p in packs if len(p)]:
                try:
                    finished = pack.step()
                except Exception:   # a bug, not one member's divergence: every member of this pack fails
                    message = traceback.format_exc(limit=5)
                    for key in [k for k, m in self.members.items() if m[0] is pack]:
                        self._finish(key, PackedTrainingFailed(message))
                    packs.remove(pack)
                    continue
                for index, result in finished:
                    key = next(k for k, m in self.members.items() if m[0] is pack and m[1] == index)
                    self._finish(key, result)

    def _admit(self, packs: list[Pack], key: str, settings: dict, config: dict, checkpoint: bytes | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from sweeps.disk import run_dir_of_this_process
        from sweeps.trainable import begin_training, trial_config, trial_logdir
        run_dir = run_dir_of_this_process("packed")
        writer = None
        try:
            if checkpoint is not None:
                (run_dir / CHECKPOINT).parent.mkdir(parents=True)
                (run_dir / CHECKPOINT).write_bytes(checkpoint)

            def report(metrics: dict, saved: Path | None) -> None:
                self._emit(key, ("report", metrics, saved.read_bytes() if saved is not None else None))

            writer = SummaryWriter(str(trial_logdir(settings, config, run_dir)))   # no --storage with packs
            begin_training(config, writer)
            self.members[key] = (None, None, writer, run_dir, settings, config)
            run = prepare_member(Member(trial_config(settings, config), run_dir, report, writer, log=lambda *_: None))
            fits = pack_key(run.cfg, run.prep.data)
            pack = next((p for p in packs if len(p) and p.key == fits), None) or \
                next((p for p in packs if not len(p)), None)
            if pack is None:
                pack = Pack()
                packs.append(pack)
            joined = pack.admit(run)
            if isinstance(joined, tuple):   # its checkpoint was already past its last evaluation
                self.members[key] = (pack, joined[0], writer, run_dir, settings, config)
                self._finish(key, joined[1])
            else:
                self.members[key] = (pack, joined, writer, run_dir, settings, config)
        except Exception as error:
            self.members.setdefault(key, (None, None, writer, run_dir, settings, config))
            self._finish(key, error)

    def _finish(self, key: str, result) -> None:
        """Close a member: its HParams session and ledger record (sweeps.trainable.end_training), then its news."""
        from sweeps.trainable import end_training
        _, _, writer, run_dir, settings, config = self.members[key]
        try:
            if isinstance(result, BaseException):
                message = str(result) if isinstance(result, TrainingDiverged) else \
                    "".join(traceback.format_exception_only(result)).strip()
                self._emit(key, ("error", message, type(result).__name__))
            else:
                end_training(settings, config, result, writer, record=True)
                self._emit(key, ("done",))
        finally:
            self._close(key)
            self.members.pop(key, None)

    def _close(self, key: str) -> None:
        _, _, writer, run_dir, *_ = self.members[key]
        if writer is not None:
            writer.close()
        shutil.rmtree(run_dir, ignore_errors=True)


_servers: list = []   # the driver's handles: Ray ends an actor, named or not, once no handle to it is left


def start_servers(count: int, threads: int, gpus: float = 0) -> None:
    """The sweep's pack servers, owned by the driver (they end with it); Ray restarts a lost one, empty."""
    server = ray.remote(PackServer)
    _servers[:] = [server.options(name=SERVER_NAME.format(i), num_cpus=threads, num_gpus=gpus, max_restarts=-1,
                                  max_concurrency=1000).remote(threads) for i in range(count)]
    ray.get([s.load.remote() for s in _servers])   # started (and placed) before the first trial looks for them


def train_in_pack(settings: dict, config: dict, run_dir: Path, report) -> None:
    """A trial's training in a pack: join the least-loaded server with the checkpoint Tune restored into run_dir,
    forward its reports (the checkpoint written back into run_dir) until the training is done."""
    servers = [ray.get_actor(SERVER_NAME.format(i)) for i in range(settings["pack_servers"])]
    loads = ray.get([s.load.remote() for s in servers])
    server = servers[loads.index(min(loads))]
    key = f"{os.getpid()}-{uuid.uuid4().hex}"
    saved = run_dir / CHECKPOINT
    ray.get(server.join.remote(key, settings, config, saved.read_bytes() if saved.exists() else None))
    while True:
        for event in ray.get(server.poll.remote(key)):
            if event[0] == "report":
                _, metrics, checkpoint = event
                if checkpoint is not None:
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(saved, lambda p, data=checkpoint: p.write_bytes(data))
                report(metrics, saved if checkpoint is not None else None)
            elif event[0] == "done":
                return
            else:
                error = TrainingDiverged if event[-1] == "TrainingDiverged" else PackedTrainingFailed
                raise error(event[1])
