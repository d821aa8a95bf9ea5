"""Issue 13.4: a sweep whose trials keep everything on remote storage (--storage URI, pyarrow's file systems, Ray
Tune's own remote storage), while the sweep folder is the driver's alone (sweeps/storage.py). file:// is the
pyarrow file system that runs here without a network service; the URI's folder is not the sweep folder, so a
trial that wrote into the sweep folder, or a driver that read Tune's experiment from it, would show."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_smoke_table
from sweeps.reaper import descendants

ROOT = Path(__file__).resolve().parent.parent
SEARCH = str(ROOT / "sweeps" / "emm_search.py")


def _running_with_checkpoint(proc: subprocess.Popen, bucket: Path) -> dict[int, str]:
    """Trial processes of the sweep whose trial has a checkpoint on the storage, with their trial's folder name:
    Tune runs each in a working folder named as its trial."""
    saved = {p.parent.name for p in bucket.glob("tune/*/checkpoint_000000")}
    found = {}
    for pid in descendants(proc.pid):
        try:
            trial = Path(os.readlink(f"/proc/{pid}/cwd")).name
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::") and trial in saved:   # an actor
                found[pid] = trial                                                                 # in a trial
        except OSError:   # it ended meanwhile
            pass
    return found


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_sweep_on_remote_storage_retries_a_killed_training_stops_resumes_and_keeps_its_folder_local(
        smoke_sweep, tmp_path):
    out, bucket = tmp_path / "out", tmp_path / "bucket"
    command = [sys.executable, SEARCH, "--preset", "smoke", "--values", "none", "--no-dashboard",
               "--storage", f"file://{bucket}", "--output", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    # A training's process killed once its trial has a checkpoint on the storage (as an OOM kill): Tune retries it
    # from that checkpoint, read back from the URI.
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (trials_killed := _running_with_checkpoint(proc,
                                                                                                            bucket)):
        time.sleep(0.2)
    assert trials_killed, "no running training with a checkpoint to kill"
    for pid in trials_killed:
        os.kill(pid, signal.SIGKILL)
    while time.time() < deadline and proc.poll() is None and "retry 1 of" not in (out / "sweep.log").read_text():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)   # then a scheduler's stop, and --resume from the URI
    first, _ = proc.communicate(timeout=300)
    # SIGTERM is taken as Ctrl-C: Tune saves its state, the tables written are whole and say they are partial
    assert proc.returncode == 143, first[-3000:]
    assert "Stopped before the end" in (out / "emm.md").read_text() and "open" in (out / "emm.md").read_text()
    resumed = subprocess.run([sys.executable, SEARCH, "--resume", str(out), "--no-dashboard"], capture_output=True,
                             text=True, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]

    # the trials' files are on the storage, and nothing of Tune's or Ray Train's in the sweep folder
    assert list(bucket.glob("tune/*/result.json")) and list(bucket.glob("tune/*/checkpoint_*"))
    assert not list(bucket.glob("tune/*/checkpoint_*/*"))        # emptied as each training finished, there
    assert (bucket / "tune" / "tuner.pkl").is_file()
    assert not (out / "tune").exists() and not (out / "train").exists()
    # the driver recorded every training in its ledger, once, and brought each TensorBoard run home
    trials = pd.read_csv(out / "trials.csv")
    with sqlite3.connect(out / "ledger.sqlite") as db:
        assert db.execute("select count(*) from trainings").fetchone()[0] == len(trials) >= 3
    runs = sorted(p.relative_to(bucket / "tensorboard") for p in bucket.glob("tensorboard/*/D=*"))
    assert len(runs) == len(trials)
    for run in runs:
        assert _files(out / "tensorboard" / run) == _files(bucket / "tensorboard" / run) != {}
    # the same answer as the smoke sweep's (sweep folder only) for that grid point, and --status reads the URI
    assert_smoke_table(out, smoke_sweep)
    # the killed training went on from its checkpoint, not from step 0: the images it reported never repeat
    for trial in set(trials_killed.values()):
        lines = (bucket / "tune" / trial / "result.json").read_text().splitlines()
        seen = [json.loads(line)["images_seen"] for line in lines if line.strip()]
        assert len(seen) >= 2 and seen == sorted(set(seen)), seen
    status = subprocess.run([sys.executable, SEARCH, "--status", str(out)], capture_output=True, text=True,
                            timeout=120)
    assert f"sweep random_labels in {out}: finished" in status.stdout, status.stdout + status.stderr
    assert f"{len(trials)} done" in status.stdout


def test_a_uris_options_stay_last_when_a_path_is_joined_to_it():
    """S3-compatible stores (MinIO, Ceph) are reached through options in the URI; a path goes before them."""
    from sweeps.storage import check_uri, join
    uri = "s3://bucket/sweeps?endpoint_override=minio:9000&scheme=http"
    assert join(uri, "tune", "tuner.pkl") == "s3://bucket/sweeps/tune/tuner.pkl?endpoint_override=minio:9000&scheme=http"
    assert join("file:///shared/sweeps/", "tune") == "file:///shared/sweeps/tune"
    assert check_uri("s3://bucket/sweeps/?region=us-east-1") == "s3://bucket/sweeps?region=us-east-1"


@pytest.fixture(scope="module")
def s3_storage():
    """A --storage URI on an S3 endpoint on the loopback interface: moto's server speaks the S3 protocol to
    pyarrow's S3 client as AWS or MinIO would (there is no network here), reached as an S3-compatible store is,
    through the URI's endpoint_override, scheme and region options."""
    import socket

    import pyarrow.fs as pafs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "diffmem-test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "diffmem-test")
        try:
            deadline = time.time() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert server.poll() is None and time.time() < deadline, "moto_server did not start"
                    time.sleep(0.2)
            uri = f"s3://diffmem/sweeps?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
            pafs.FileSystem.from_uri(f"{uri}&allow_bucket_creation=true")[0].create_dir("diffmem")   # the bucket
            yield uri
        finally:
            server.terminate()
            server.wait(timeout=30)


def test_a_sweep_on_s3_compatible_storage_is_found_by_resume_and_status_and_its_runs_copied(s3_storage, tmp_path):
    """Through pyarrow's S3 client and Ray Tune's own check: the experiment under a URI with options is where
    --resume (Tuner.can_restore) and --status (its last activity) look, and a TensorBoard run goes there and back
    whole. Before, the options ended up inside the path ('...&region=us-east-1/tune'): both failed."""
    from ray import tune

    from conftest import a_sweep
    from sweeps.status import last_activity
    from sweeps.storage import download, experiment, filesystem, join, upload
    out = tmp_path / "out"
    where = experiment(a_sweep(storage=s3_storage), out)
    assert not tune.Tuner.can_restore(where) and last_activity(where, out) is None
    fs, path = filesystem(where)
    assert path == "diffmem/sweeps/tune"
    with fs.open_output_stream(f"{path}/tuner.pkl") as f:   # what Tune writes first when it starts an experiment
        f.write(b"\x80")
    assert tune.Tuner.can_restore(where) and abs(last_activity(where, out) - time.time()) < 120

    run = tmp_path / "run"
    (run / "plugins").mkdir(parents=True)
    (run / "events.out.tfevents.1").write_bytes(os.urandom(3000))
    (run / "plugins" / "hparams.pb").write_bytes(b"session")
    fs, path = filesystem(join(s3_storage, "tensorboard", "random_labels=none", "D=10"))
    upload(run, fs, path)
    assert download(fs, path, tmp_path / "back") and _files(tmp_path / "back") == _files(run)
