"""Leave no Ray processes behind when the sweep's driver dies, even by kill -9.

ray.shutdown() cleans up after a normal exit or Ctrl-C, but after a SIGKILL of the driver Ray 2.60 leaves
`ray::DashboardAgent` and `ray::RuntimeEnvAgent` running (seen on 2 cores, Ray 2.60). The
driver starts this watcher in its own session: it remembers every descendant of the driver (the local
cluster's processes) while the driver lives, and once it is gone terminates those still running. A
process is matched by pid and start time, so a reused pid is never hit. Linux (/proc) only.

    python -m sweeps.reaper DRIVER_PID
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sweeps.disk import remove_orphaned_run_dirs


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below root."""
    children: dict[int, list[int]] = {}
    starts = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[1]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = starts[child]
                todo.append(child)
    return found


def watch(driver: int, poll_s: float = 0.5, grace_s: float = 5.0) -> int:
    known: dict[int, int] = {}
    me = os.getpid()
    while _stat(driver) is not None:
        known.update({p: s for p, s in descendants(driver).items() if p != me})
        time.sleep(poll_s)
    alive = [p for p, s in known.items() if (st := _stat(p)) is not None and st[1] == s]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_stat(p) is not None for p in alive):
            time.sleep(0.2)
        alive = [p for p in alive if (st := _stat(p)) is not None and st[1] == known[p]]
    remove_orphaned_run_dirs()   # the trainings' temporary folders, which their killed processes could not remove
    return len(alive)


def start_reaper() -> None:
    """Start the watcher for this process (the driver), detached so a kill of the driver spares it."""
    if sys.platform.startswith("linux"):
        subprocess.Popen([sys.executable, "-m", "sweeps.reaper", str(os.getpid())], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=str(Path(__file__).resolve().parent.parent))


if __name__ == "__main__":
    raise SystemExit(watch(int(sys.argv[1])))
