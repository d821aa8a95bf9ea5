"""Nearest neighbours for the memorization ratio: diffmem.memorization.nearest_neighbours (k = 2) against
the floor, one bare GEMM of the same shape (g @ t.T, float32), and against torch.cdist + topk and faiss.

Sizes (generated x training x dimension), one line each:
    digits         256 x  1,797 x    64   (the digits experiments)
    cifar-scaled 2,000 x 10,000 x 3,072   (default: CIFAR-10's dimension, a fifth of its counts each way,
                                           a 1/25 of the work, so the whole file runs in about a minute)
    cifar       10,000 x 50,000 x 3,072   (--full: 10k samples against CIFAR-10's 50k training images,
                                           ~1 TFLOP per method, minutes on a 2-core CPU)
Data: uniform random pixel values in [0, 255), as the 8-bit images the ratio is measured on.

Timing: every method runs `reps` times, interleaved (gemm, ours, cdist, faiss, gemm, ...), and each keeps
its best time, so a machine shared with other jobs slows all of them alike; every figure is a ratio
against the GEMM measured in the same run. The clock is wall time, or with --threads 1 the process's CPU
time, which other jobs barely disturb (on a busy 2-core machine, wall-time ratios of the many-small-ops
digits size swing 2x between runs). cdist works on chunks of 1,024 generated rows (its full
matrix would be N x M floats); faiss (IndexFlatL2, exact) counts building the index (pip install -e
.[bench]; skipped if not installed or not on the CPU).

Memory: a child process measures how far one nearest_neighbours call raises the peak RSS
(resource.getrusage, inputs allocated beforehand) at N generated x CIFAR-10's 50,000 training images, and
compares it with the chunk bound (a centred copy of the generated images, one training chunk, one
block of scores and the winners' differences) and with one N x M float32 matrix, which it must stay below.

    python bench/nn.py [--full] [--threads 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import clock, machine_line, write_json  # noqa: E402
from diffmem.memorization import _BLOCK, nearest_neighbours  # noqa: E402

try:
    import faiss
except ImportError:
    faiss = None

SIZES = {"digits": (256, 1_797, 64), "cifar-scaled": (2_000, 10_000, 3_072), "cifar": (10_000, 50_000, 3_072)}
REPS = {"digits": 30, "cifar-scaled": 5, "cifar": 2}
MEMORY_TRAIN = 50_000                      # CIFAR-10's training set
CDIST_CHUNK = 1024
GOAL = 1.3                                 # the target: within 1.3x of the GEMM, faster than faiss


def pixels(n: int, d: int, seed: int, device: str) -> torch.Tensor:
    """Uniform [0, 255) float32, filled in place (no temporary as large as the data)."""
    generator = torch.Generator(device).manual_seed(seed)
    return torch.empty(n, d, device=device).uniform_(0, 255, generator=generator)


def cdist_topk(g: torch.Tensor, t: torch.Tensor):
    parts = [torch.topk(torch.cdist(c, t), 2, dim=1, largest=False) for c in g.split(CDIST_CHUNK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def faiss_search(g: torch.Tensor, t: torch.Tensor):
    index = faiss.IndexFlatL2(t.shape[1])
    index.add(t.numpy())
    d2, i = index.search(g.numpy(), 2)
    return torch.from_numpy(d2).sqrt(), torch.from_numpy(i)


def best_times(methods: dict, reps: int, sync) -> dict[str, list[float]]:
    times = {name: [] for name in methods}
    for _name, f in methods.items():             # warm-up: first-call costs (libraries, page faults)
        f()
    for _ in range(reps):
        for name, f in methods.items():
            sync()
            start = clock()
            f()
            sync()
            times[name].append(clock() - start)
    return times


def chunk_bound_bytes(n: int, m: int, d: int) -> int:
    """Extra memory of nearest_neighbours by construction (float32, default chunks of 2,048)."""
    rows = min(2048, m)
    padded = -(-rows // _BLOCK) * _BLOCK
    winners = 2 * min(256, n) * 2 * d   # the k = 2 winners' rows gathered, and their differences (_WINNER_ROWS)
    return 4 * (n * (d + 1) + padded * (d + 1) + min(2048, n) * padded + winners) + 64 * n


def memory_child(n: int, m: int, d: int) -> None:
    """Run in a fresh process: peak RSS growth of one call, inputs already allocated."""
    g, t = pixels(n, d, 0, "cpu"), pixels(m, d, 1, "cpu")
    nearest_neighbours(g[:64], t[:4096])        # load the libraries and touch the small buffers first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nearest_neighbours(g, t)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_growth_bytes": (after - before) * 1024}))   # ru_maxrss is in KiB on Linux


def measure_memory(n: int, m: int, d: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--threads", str(torch.get_num_threads()),
                          "--memory-child", str(n), str(m), str(d)],
                         capture_output=True, text=True, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth_bytes"]
    return {"shape": [n, m, d], "peak_rss_growth_bytes": growth,
            "chunk_bound_bytes": chunk_bound_bytes(n, m, d), "n_by_m_float32_bytes": 4 * n * m}


def run_size(name: str, device: str, reps: int) -> dict:
    n, m, d = SIZES[name]
    g, t = pixels(n, d, 0, device), pixels(m, d, 1, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    methods = {"gemm": lambda: g @ t.T, "ours": lambda: nearest_neighbours(g, t, k=2),
               "cdist": lambda: cdist_topk(g, t)}
    if faiss is not None and device == "cpu":
        methods["faiss"] = lambda: faiss_search(g, t)
    times = best_times(methods, reps, sync)
    best = {k: min(v) for k, v in times.items()}
    ratios = {k: best[k] / best["gemm"] for k in best if k != "gemm"}
    ours_d, ours_i = nearest_neighbours(g, t, k=2)
    ref_d, ref_i = cdist_topk(g, t)
    agree = {"cdist_index_agreement": (ours_i == ref_i).float().mean().item(),
             "cdist_max_rel_distance_diff": ((ours_d - ref_d).abs() / ref_d.clamp_min(1e-6)).max().item()}
    if "faiss" in methods:
        faiss_i = faiss_search(g.cpu(), t.cpu())[1]
        agree["faiss_index_agreement"] = (ours_i.cpu() == faiss_i).float().mean().item()
    return {"shape": [n, m, d], "reps": reps, "seconds": times, "best_seconds": best, "ratios": ratios,
            **agree}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="CIFAR-10 size, 10k x 50k x 3072, instead of cifar-scaled")
    parser.add_argument("--device", default="cpu", help="torch device (faiss runs on the CPU only)")
    parser.add_argument("--threads", type=int, help="torch and faiss CPU threads; 1 also times by process "
                        "CPU time, which other jobs on the machine barely disturb (default: all, wall time)")
    parser.add_argument("--reps", type=int, help="timed repetitions per method (default: per size)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        if faiss is not None:
            faiss.omp_set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return {}

    faiss_part = f", faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads)" if faiss else ""
    machine = machine_line(args.device, faiss_part)
    print(machine)
    if faiss is None:
        print("faiss not installed: pip install -e .[bench]")
    figures = {"machine": machine, "sizes": {}}
    for name in ("digits", "cifar" if args.full else "cifar-scaled"):
        fig = run_size(name, args.device, args.reps or REPS[name])
        figures["sizes"][name] = fig
        r, (n, m, d) = fig["ratios"], fig["shape"]
        faiss_part = f"  faiss/gemm {r['faiss']:.2f}x" if "faiss" in r else ""
        met = r["ours"] <= GOAL and r["ours"] < r.get("faiss", float("inf"))
        goal = f"goal ours <= {GOAL}x gemm" + (" and < faiss" if "faiss" in r else " (no faiss)")
        fig["goal_met"] = met
        print(f"nn {name} ({n} x {m} x {d}) ours/gemm {r['ours']:.2f}x  cdist/gemm {r['cdist']:.2f}x"
              f"{faiss_part}"
              f"  [gemm {fig['best_seconds']['gemm'] * 1e3:.3g} ms, best of {fig['reps']}; indices = cdist's "
              f"for {fig['cdist_index_agreement']:.2%}; {goal}: {'met' if met else 'not met'}]")
    if args.device == "cpu":
        n = SIZES["cifar" if args.full else "cifar-scaled"][0]
        mem = measure_memory(n, MEMORY_TRAIN, 3072)
        figures["memory"] = mem
        mib = 2 ** 20
        print(f"nn memory ({n} x {MEMORY_TRAIN} x 3072) ours peak RSS "
              f"+{mem['peak_rss_growth_bytes'] / mib:.0f} MiB"
              f" / chunk bound {mem['chunk_bound_bytes'] / mib:.0f} MiB / one N x M float32 matrix "
              f"{mem['n_by_m_float32_bytes'] / mib:.0f} MiB: "
              f"{mem['peak_rss_growth_bytes'] / mem['n_by_m_float32_bytes']:.2f}x of it")
        assert mem["peak_rss_growth_bytes"] < mem["n_by_m_float32_bytes"], "held an N x M matrix"
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
