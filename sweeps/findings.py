"""The findings page of a study (sweeps/study.py): each factor's EMM per value beside the paper's finding, with a
verdict from one written rule (VERDICT_RULE, printed on the page).

A factor's EMM rows are its sweep's emm.csv: per value the seeds' median EMM and the interval [smallest low,
largest high) over the seeds (README "Training seeds"). Values are in the order the study lists them, which for
a categorical factor is the order the paper's direction speaks of (e.g. skips kept at rising resolution).
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from sweeps.results import _overlap, format_emm, interval_text, plain_log_axis, read_emm_csv
from sweeps.folder import atomic_write

DIRECTIONS = ("rises", "falls", "non-monotone", "none", "unknown")
AGREES, DIFFERS, INCONCLUSIVE = "agrees", "differs", "inconclusive at this spread"

VERDICT_RULE = """\
A value's interval is [smallest low, largest high) of its seeds' EMM brackets (nominal 1 - 2^(1-K) for the median
seed's EMM with K seeds). Two values are *apart* when their intervals do not overlap. With the values in the
study's order, first and last:
- **rises**: *agrees* if the last is apart from and above the first; *differs* if apart and below; else
  *inconclusive at this spread*.
- **falls**: the mirror image.
- **non-monotone**: *agrees* if an interior value is apart from both ends on the same side (a peak or a valley);
  *differs* if the ends are apart and the median EMMs are monotone; else *inconclusive at this spread*.
- **none** (no effect): *agrees* if no two values are apart; else *differs*.
- A direction marked *unverified* is a recollection of the reference notes (docs/paper.md), not the paper's
  text: its verdict is shown, and says so. Where no direction is on record the verdict is *no direction on
  record* and the measured trend stands alone.
- A value whose search did not close (open, unresolved) makes the factor *incomplete*.
Measured trend: Spearman's rank correlation rho between the value's position and its median EMM (a censored EMM
counts at its bound: '>= hi' as hi, '< lo' as half of lo)."""


def _apart(a: dict, b: dict) -> bool:
    return not _overlap(a, b)


def _above(a: dict, b: dict) -> bool:
    """a apart from and above b: a's lowest end is at or past b's highest."""
    return b["interval_high"] is not None and a["interval_low"] is not None and a["interval_low"] >= b["interval_high"]


def point_emm(row: dict) -> float | None:
    """The median EMM as a number for the trend: '>= hi' counts as hi, '< lo' as lo / 2, open or unresolved None."""
    if row["censored"] == ">=max":
        return row["emm"]
    if row["censored"] == "<min":
        return row["high"] / 2
    return row["emm"]


def spearman(values: list[float]) -> float | None:
    """Rank correlation of positions 0..n-1 with values (average ranks for ties); None for constant values."""
    n = len(values)
    if n < 2:
        return None
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    mean = (n - 1) / 2
    cov = sum((p - mean) * (r - mean) for p, r in enumerate(ranks))
    var_p = sum((p - mean) ** 2 for p in range(n))
    var_r = sum((r - mean) ** 2 for r in ranks)
    return None if var_r == 0 else cov / math.sqrt(var_p * var_r)


def verdict(direction: str, rows: list[dict]) -> str:
    """VERDICT_RULE applied to one factor's rows (dicts with emm, low, high, censored, interval_low, interval_high)."""
    if any(r["censored"] == "unresolved" or point_emm(r) is None for r in rows):
        return "incomplete"
    if direction == "unknown":
        return "no direction on record"
    first, last, inner = rows[0], rows[-1], rows[1:-1]
    if direction in ("rises", "falls"):
        high, low = (last, first) if direction == "rises" else (first, last)
        return AGREES if _above(high, low) else DIFFERS if _above(low, high) else INCONCLUSIVE
    if direction == "non-monotone":
        if any((_above(r, first) and _above(r, last)) or (_above(first, r) and _above(last, r)) for r in inner):
            return AGREES
        medians = [point_emm(r) for r in rows]
        monotone = (all(a <= b for a, b in zip(medians, medians[1:]))
                    or all(a >= b for a, b in zip(medians, medians[1:])))
        return DIFFERS if monotone and _apart(first, last) else INCONCLUSIVE
    if direction == "none":
        return DIFFERS if any(_apart(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]) else AGREES
    raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")


def read_rows(emm_csv: Path) -> list[dict]:
    """emm.csv as dicts, with empty cells as None."""
    frame = read_emm_csv(emm_csv, keep_default_na=True, dtype={"value": str})
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    for r in rows:
        for key in ("emm", "high", "interval_low", "interval_high", "trainings", "from_ledger"):
            if r[key] is not None:
                r[key] = int(r[key])
    return rows


def emm_cell(row: dict) -> str:
    return f"{format_emm(SimpleNamespace(**row))} {interval_text(SimpleNamespace(**row))}"


def factor_result(entry: dict, emm_csv: Path | None) -> dict:
    """One factor of the study with its measured rows, trend and verdict (emm_csv None or absent: not run yet,
    rows None)."""
    finding = entry["finding"]
    if emm_csv is None or not emm_csv.is_file():
        return {**entry, "rows": None, "rho": None, "verdict": "not run yet"}
    rows = read_rows(emm_csv)
    trend = [point_emm(r) for r in rows]
    rho = None if any(t is None for t in trend) else spearman(trend)
    text = verdict(finding["direction"], rows)
    if text in (AGREES, DIFFERS, INCONCLUSIVE) and not finding.get("verified", False):
        text += " (direction unverified)"
    return {**entry, "rows": rows, "rho": rho, "verdict": text}


def _direction_text(finding: dict) -> str:
    d = finding["direction"]
    return {"unknown": "none on record", "none": "no effect", "non-monotone": "EMM non-monotone"}.get(d, f"EMM {d}")


def write_page(output: Path, study: dict, results: list[dict], header: list[str]) -> str:
    """OUTPUT/findings.md and findings.png; returns the summary table (what the README quotes)."""
    table = ["| factor | values (study order) | EMM [interval) per value | paper's finding | where | measured rho | "
             "verdict |", "|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["finding"]
        where = f["where"] + ("" if f.get("verified", False) or f["direction"] == "unknown" else ", unverified")
        cells = "; ".join(f"{row['value']}: {emm_cell(row)}" for row in r["rows"]) if r["rows"] else "-"
        rho = "-" if r["rho"] is None else f"{r['rho']:+.2f}"
        table.append(f"| {r['factor']} | {', '.join(map(str, r['values']))} | {cells} | "
                     f"{_direction_text(f)} | {where} | {rho} | {r['verdict']} |")
    for n in study.get("not_run", []):
        table.append(f"| {n['factor']} | - | not measured here: {n['reason']} | {_direction_text(n['finding'])} | "
                     f"{n['finding']['where']} | - | paper scale: `{n['paper_config']}` |")
    summary = "\n".join(table)
    lines = ["# The paper's findings, measured (sweeps/study.py)", "", *header, "", "## Summary", "", summary, "",
             "## The verdict rule", "", VERDICT_RULE, ""]
    lines += ["## Per factor", ""]
    for r in results:
        f = r["finding"]
        lines += [f"### {r['factor']}", "", f"Paper ({f['where']}): {f['paper']}", ""]
        if r.get("note"):
            lines += [r["note"], ""]
        if not r["rows"]:
            lines += ["Not run yet: the study stopped before this factor (the same command continues it).", ""]
            continue
        lines += ["| value | EMM | per seed | interval | trainings | from ledger |", "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['value']} | {format_emm(SimpleNamespace(**row))} | {row['seed_emms']} | "
                         f"{interval_text(SimpleNamespace(**row))} | {row['trainings']} | {row['from_ledger']} |")
        lines += ["", f"Verdict: **{r['verdict']}**" + ("" if r["rho"] is None else f" (rho {r['rho']:+.2f})"), ""]
        if r["verdict"].startswith(INCONCLUSIVE):
            lines += [f"Why not shown here: the intervals the verdict rule compares overlap, so an effect of "
                      f"{r['factor']}, if there is one, is below the seeds' spread at this scale.", ""]
        lines += [f"At paper scale: `python sweeps/emm_search.py --config {r['paper_config']} --factor "
                  f"{r['factor']}` (on a cluster: README, \"Running the paper's study on a cluster\").", ""]
    for n in study.get("not_run", []):
        lines += [f"### {n['factor']} (not measured here)", "", f"Paper ({n['finding']['where']}): "
                  f"{n['finding']['paper']}", "", f"Why not here: {n['reason']} At paper scale: "
                  f"`{n['paper_config']}`.", ""]
    done = [r for r in results if r["rows"]]
    trained = sum(row["trainings"] for r in done for row in r["rows"])
    from_ledger = sum(row["from_ledger"] for r in done for row in r["rows"])
    lines += ["## What it cost", "",
              f"{trained} trainings ran; separate sweeps would have run {trained + from_ledger}: the shared ledger "
              f"answered {from_ledger} (the basic setup and other repeated configurations at a size and seed already "
              f"trained).", ""]
    page = "\n".join(lines)
    atomic_write(output / "findings.md", lambda p: p.write_text(page))
    plot_findings(output / "findings.png", results)
    return summary


def plot_findings(path: Path, results: list[dict]) -> None:
    """One panel per measured factor: median EMM per value, interval as error bar, seeds as dashes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sweeps.results import seed_emms
    done = [r for r in results if r["rows"]]
    cols = 4
    rows_n = max(1, math.ceil(len(done) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(done):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, done):
        for i, row in enumerate(r["rows"]):
            low, high = row["interval_low"], row["interval_high"]
            centre = point_emm(row)
            if centre is None:
                continue
            low = low if low is not None else centre / 2
            high = high if high is not None else centre * 2
            ax.errorbar([i], [centre], yerr=[[max(centre - low, 0)], [max(high - centre, 0)]], fmt="o", capsize=3,
                        color="C3" if row["censored"] else "C0")
            ax.plot([i + 0.1] * len(seed_emms(SimpleNamespace(**row))), seed_emms(SimpleNamespace(**row)), "_",
                    color="gray", ms=7)
        ax.set_xticks(range(len(r["rows"])), [str(row["value"]) for row in r["rows"]], fontsize=7)
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_title(f"{r['factor']}: paper {_direction_text(r['finding'])}\n{r['verdict']}", fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("EMM (|D|)", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
