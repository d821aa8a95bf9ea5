"""One HTML page a person can read, for one sweep or several side by side.

    python sweeps/report.py results/width-20261129-101500 results/depth-20261129-121500 --html report.html

Per sweep: the EMM table, EMM against the factor's values, the memorization curves, and the sample | NN1 |
NN2 grids (last evaluation, from the training's TensorBoard events) of the trainings that decide each
bracket: the largest |D| that memorized and the smallest that did not, i.e. the ones closest to the
threshold. Self-contained: every image is embedded (base64), no scripts, no external files, so the page can
be mailed or archived. A sweep that is still running shows its --status instead of the tables.
"""
from __future__ import annotations

import base64
import html
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:      # `python sweeps/report.py` from a checkout
    sys.path.insert(0, str(ROOT))

from diffmem.config import ConfigError  # noqa: E402
from sweeps.folder import SweepFolder  # noqa: E402

SAMPLES_TAG = "samples/generated_nn1_nn2"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .3em; }
h2 { font-size: 1.25em; margin: 0 0 .3em; }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
.sweeps { display: grid; grid-template-columns: repeat(var(--n), minmax(520px, 1fr)); gap: 2em; overflow-x: auto; }
.sweep { border-top: 3px solid #4a78b5; padding-top: .6em; min-width: 0; }
.meta { color: #555; font-size: .9em; margin: .2em 0 .8em; }
.wide { overflow-x: auto; }   /* a table wider than its column scrolls in it instead of running into the next */
table.emm { border-collapse: collapse; font-size: .92em; }
table.emm th, table.emm td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: right; }
table.emm th:first-child, table.emm td:first-child { text-align: left; }
table.emm td.censored { color: #b03030; }
img { max-width: 100%; height: auto; image-rendering: pixelated; }
img.grid { image-rendering: auto; }
img.tiny { width: 100%; image-rendering: pixelated; }
img.plot { image-rendering: auto; }
figure { margin: .5em 0 1em; }
figcaption { font-size: .85em; color: #444; margin-top: .2em; }
pre { background: #f5f5f5; padding: .6em; overflow-x: auto; font-size: .8em; }
.note { color: #777; font-style: italic; font-size: .9em; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, cls: str = "") -> str:
    return f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}"{f" class={cls!r}" if cls else ""}>'


def _width(png: bytes) -> int:
    import io

    from PIL import Image
    with Image.open(io.BytesIO(png)) as image:
        return image.size[0]


def _num(x) -> int | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return int(x)


def last_sample_grid(run_dir: Path) -> tuple[bytes, int, str | None] | None:
    """(PNG, images seen, that evaluation's memorization ratio with its 95 % interval, as text) of the last sample
    grid in a training's TensorBoard run, or None when the run or its images are missing."""
    if not run_dir.is_dir() or not list(run_dir.glob("events.*")):
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir), size_guidance={"images": 1, "scalars": 0})
    events.Reload()
    if SAMPLES_TAG not in events.Tags()["images"]:
        return None
    image = events.Images(SAMPLES_TAG)[-1]
    from sweeps.results import ratio_text
    values = {}
    for name in ("mem_ratio", "mem_ratio_low", "mem_ratio_high"):
        if f"memorization/{name}" in events.Tags()["scalars"]:
            at_step = [s.value for s in events.Scalars(f"memorization/{name}") if s.step == image.step]
            values[name] = at_step[-1] if at_step else None
    ratio = values.get("mem_ratio")
    text = None if ratio is None else ratio_text(ratio, values.get("mem_ratio_low"), values.get("mem_ratio_high"))
    return image.encoded_image_string, image.step, text


def deciding_trainings(trials, emm_row, grid_label: str, epsilon: float) -> list[dict]:
    """The trainings of one grid point closest to the threshold: the ones at the bracket's ends (largest |D|
    that memorized, smallest that did not); without a bracket end, the nearest ratio on that side."""
    mine = trials[(trials.grid_label == grid_label) & trials.best_mem_ratio.notna()]
    picked = []
    for end, memorized in ((_num(emm_row.get("emm")), True), (_num(emm_row.get("high")), False)):
        side = mine[mine.memorized.astype(str).str.lower() == str(memorized).lower()]
        if not len(side):
            continue
        at_end = side[side["size"] == end] if end is not None else side.iloc[0:0]
        row = at_end.iloc[-1] if len(at_end) else side.loc[(side.best_mem_ratio - (1 - epsilon)).abs().idxmin()]
        picked.append(row.to_dict())
    return picked


def _emm_table(emm, epsilon: float) -> str:
    from sweeps.results import format_emm, interval_text, spread_note, versus_previous
    head = ("<tr><th>value</th><th>EMM</th><th>per seed</th><th>interval</th><th>vs previous</th>"
            "<th>bracket [EMM, high)</th><th>trainings</th><th>from ledger</th><th>training images</th>"
            "<th>seconds</th></tr>")
    rows = []
    for _, r in emm.iterrows():
        censored = isinstance(r.censored, str) and r.censored
        rows.append(f"<tr><td>{html.escape(str(r.value))}</td>"
                    f"<td{' class=censored' if censored else ''}>{html.escape(format_emm(r))}</td>"
                    f"<td>{html.escape(str(r.seed_emms))}</td><td>{html.escape(interval_text(r))}</td>"
                    f"<td>{html.escape(versus_previous(r))}</td>"
                    f"<td>[{_num(r.emm) if _num(r.emm) is not None else '-'}, "
                    f"{_num(r.high) if _num(r.high) is not None else '-'})</td>"
                    f"<td>{int(r.trainings)}</td><td>{int(r.from_ledger)}</td><td>{int(r.training_images):,}</td>"
                    f"<td>{float(r.wall_seconds):.0f}</td></tr>")
    caption = f"EMM: largest |D| with memorization ratio &ge; {1 - epsilon:.2f}"
    return (f'<div class="wide"><table class="emm"><caption>{caption}</caption>{head}{"".join(rows)}</table></div>'
            f'<p class="meta">{html.escape(spread_note(emm))}</p>')


def sweep_section(output: Path) -> str:
    from sweeps.spec import read_spec
    spec = read_spec(output, "report")   # a garbage, foreign or incomplete sweep.json is one line
    factor, epsilon = spec.factor, spec.epsilon
    parts = [f"<h2>{html.escape(factor)}</h2>",
             f'<div class="meta">{html.escape(str(output))} &middot; '
             f'config {html.escape(Path(spec.config_file).name)}'
             f'{" + preset " + html.escape(spec.preset) if spec.preset else ""} &middot; '
             f'epsilon {epsilon} &middot; tolerance {spec.tolerance} &middot; |D| range {spec.size_range}</div>']
    try:
        from sweeps.status import sweep_status
        status = sweep_status(output)
    except Exception as e:   # the report still shows what the folder holds
        status = f"(status unavailable: {e})"
    folder = SweepFolder(output)
    if not folder.emm_csv.is_file():
        parts.append('<p class="note">No tables yet: the sweep is running or stopped before its first table. '
                     'Where it stands:</p>')
        parts.append(f"<pre>{html.escape(status)}</pre>")
        return f'<section class="sweep">{"".join(parts)}</section>'
    from sweeps.results import format_emm, read_emm_csv, read_trials_csv
    emm = read_emm_csv(folder.emm_csv, keep_default_na=False, na_values=[""])
    trials = read_trials_csv(folder.trials_csv, keep_default_na=False, na_values=[""])
    if "seeds" not in emm:   # written before --seeds: one seed, its bracket as the interval, no comparison
        emm = emm.assign(seeds=1, seed_emms=[format_emm(r) for _, r in emm.iterrows()], interval_low=emm.emm,
                         interval_high=emm.high, distinguishable_from_previous="")
    parts.append(_emm_table(emm, epsilon))
    for path, title in ((folder.emm_png, f"EMM against {factor} (bracket, with several seeds their interval, as "
                                         f"error bar; red: censored)"),
                        (folder.curves_png, "Memorization ratio against |D| (bars: 95 % intervals; dashed: 1 − ε)")):
        if path.is_file():
            parts.append(f"<h3>{html.escape(title)}</h3><figure>"
                         f"{_img(path.read_bytes(), title, 'plot')}</figure>")
    threshold = ((spec.base or {}).get("eval") or {}).get("threshold", 1 / 3)
    threshold = "1/3" if abs(threshold - 1 / 3) < 1e-9 else f"{threshold:g}"
    parts.append("<h3>Samples beside their nearest training images, at the bracket ends</h3>"
                 '<p class="meta">Rows: generated samples, their nearest (NN1) and second-nearest (NN2) training '
                 f"images; d1/d2 under each column is ||x − NN1|| / ||x − NN2|| (a copy below {threshold}). "
                 "Last evaluation of each training.</p>")
    from sweeps import curve
    from sweeps.results import FROM_LEDGER, ratio_text
    from sweeps.tblog import seed_tag, tensorboard_dir, training_run
    for _, row in emm.iterrows():
        label = curve.LABEL if curve.is_curve(factor) else f"{factor}={row.value}"
        for t in deciding_trainings(trials, row.to_dict(), label, epsilon):
            size = int(t["size"])
            verdict = "memorized" if str(t["memorized"]).lower() == "true" else "not memorized"
            best = ratio_text(float(t["best_mem_ratio"]), t.get("best_mem_ratio_low"), t.get("best_mem_ratio_high"))
            config = {"grid_label": label, "size": size, "seed_index": int(t.get("seed", 0)), "seeds": int(row.seeds)}
            tag = seed_tag(config)
            caption = f"{label}, |D| = {size}{f', {tag}' if tag else ''}: best ratio {best}, {verdict}"
            grid = last_sample_grid(tensorboard_dir(output) / training_run(config))
            if grid is None:
                why = ("from the results ledger: trained by an earlier sweep"
                       if t.get("status") == FROM_LEDGER else "no sample grid in its TensorBoard run")
                parts.append(f'<p class="note">{html.escape(caption)} &mdash; {why}.</p>')
                continue
            png, step, ratio = grid
            more = f"; at {step:,} images, memorization ratio {ratio}" if ratio is not None else \
                f"; at {step:,} images"
            parts.append(f"<figure>{_img(png, caption, 'grid' if _width(png) >= 400 else 'tiny')}"
                         f"<figcaption>{html.escape(caption + more)}</figcaption></figure>")
    parts.append(f"<details><summary>status</summary><pre>{html.escape(status)}</pre></details>")
    return f'<section class="sweep">{"".join(parts)}</section>'


def render(outputs: list[Path]) -> str:
    sections = [sweep_section(Path(o)) for o in outputs]
    title = "EMM sweeps: " + ", ".join(html.escape(Path(o).name) for o in outputs)
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>{title}</title>"
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
            f'<p class="meta">Written {time.strftime("%Y-%m-%d %H:%M")} by sweeps/report.py. '
            f"EMM (effective model memorization): the largest training-set size whose model still reproduces "
            f"its training images (Gu et al., TMLR 2025).</p>"
            f'<div class="sweeps" style="--n: {len(sections)}">{"".join(sections)}</div></body></html>\n')


def main(argv=None) -> int:
    from diffmem.cli import ArgumentParser   # argparse's errors as one line
    p = ArgumentParser(prog="report.py", description="\n\n".join(__doc__.split("\n\n")[:2]))
    p.add_argument("outputs", nargs="+", metavar="OUTPUT", help="output folders of sweeps (emm_search --output)")
    p.add_argument("--html", help="where to write the page (default OUTPUT/report.html for one sweep, "
                                  "report.html here for several)")
    args = p.parse_args(argv)
    outputs = [Path(o) for o in args.outputs]
    target = Path(args.html) if args.html else (outputs[0] / "report.html" if len(outputs) == 1 else
                                                Path("report.html"))
    try:
        page = render(outputs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page)
    tmp.replace(target)
    print(f"report: {target} ({len(page) / 1e6:.1f} MB, {len(outputs)} sweep{'s' if len(outputs) > 1 else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
