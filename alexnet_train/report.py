"""A results report for one training output directory: a short text summary and a PNG.

Usage::

    run = load_run("runs/demo")                # OUT/metrics.jsonl, and OUT/config.yaml if present
    print("\\n".join(summary_lines(run)))
    draw(run, run.out_dir / "report.png")      # PlotUnavailable without matplotlib

or ``alexnet-report OUT [--no-plot] [--png FILE]``; a finished training run calls
:func:`report_run` itself.  The figure shows train / val loss and
val top-1 / top-5 per epoch, the best top-1 epoch, and a dashed line where the lr changed.

Only metrics.jsonl is required; rows written before a key existed (``epoch_seconds``,
``data_wait``) are reported as unknown rather than refused.  matplotlib is optional
(``pip install 'alexnet-train[plot]'``) and imported only by :func:`draw`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .checkpoint import atomic_write_bytes
from .tracking import format_duration
from .errors import PlotUnavailable, ReportError

FIGSIZE = (10.0, 4.0)  # inches
DPI = 110
# More lr changes than this (a cosine schedule changes it every epoch) would bury the curves
# under dashed lines: the lr is then drawn as a curve of its own instead.
MAX_LR_MARKS = 8
PLOT_HINT = "matplotlib is not installed; pip install 'alexnet-train[plot]' (or pip install matplotlib)"


@dataclass
class Run:
    out_dir: Path
    rows: list[dict]                 # one per epoch, sorted by epoch
    planned_epochs: int | None = None
    arch: str | None = None
    schedule: str | None = None
    skipped_lines: int = 0           # lines of metrics.jsonl that were not a readable row


def load_run(out_dir: str | Path) -> Run:
    """OUT's metrics (the later row wins for a repeated epoch) and, if readable, its config."""
    out = Path(out_dir)
    path = out / "metrics.jsonl"
    if not path.is_file():
        what = "no such directory" if not out.is_dir() else "not found: no epoch has finished in this OUT"
        raise ReportError(f"{path}: {what}")
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise ReportError(f"{path}: cannot read ({exc.strerror or exc})") from None
    by_epoch: dict[int, dict] = {}
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a crash mid-write leaves half a line
            skipped += 1
            continue
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            skipped += 1
            continue
        by_epoch[epoch] = row  # a resumed run may repeat an epoch: its later row is the real one
    if not by_epoch:
        raise ReportError(f"{path}: no readable epoch row")
    run = Run(out, [by_epoch[e] for e in sorted(by_epoch)], skipped_lines=skipped)
    cfg = _read_config(out / "config.yaml")
    run.planned_epochs = _get(cfg, "train", "epochs", int)
    run.arch = _get(cfg, "model", "arch", str)
    run.schedule = _get(cfg, "schedule", "kind", str)
    return run


def _read_config(path: Path) -> dict:
    # The config only adds context (planned epochs, arch): a missing or damaged one is no error.
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _get(cfg: dict, section: str, key: str, kind: type) -> Any:
    part = cfg.get(section)
    value = part.get(key) if isinstance(part, dict) else None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _num(row: dict, key: str) -> float | None:
    """``row[key]`` as a finite float; None when missing, null, NaN or not a number."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["epoch"], v) for r in rows if (v := _num(r, key)) is not None]
    return [e for e, _ in pairs], [v for _, v in pairs]


def lr_changes(rows: list[dict]) -> list[tuple[int, float, float]]:
    """(epoch, old lr, new lr) for every epoch whose lr differs from the epoch before's."""
    spans = _lr_spans(rows)
    return [(first, old, new) for (old, _, _), (new, first, _) in zip(spans, spans[1:])]


def best_row(rows: list[dict]) -> dict | None:
    """The first epoch with the highest val top-1 (the one best.pth holds)."""
    scored = [r for r in rows if _num(r, "val_top1") is not None]
    return max(scored, key=lambda r: r["val_top1"], default=None)  # max keeps the first of equals


def _f(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _lr_spans(rows: list[dict]) -> list[tuple[float, int, int]]:
    """(lr, first epoch, last epoch) of each run of epochs at one lr (rows without an lr skipped)."""
    spans: list[tuple[float, int, int]] = []
    for row in rows:
        lr = _num(row, "lr")
        if lr is None:
            continue
        if spans and math.isclose(lr, spans[-1][0], rel_tol=1e-9, abs_tol=0.0):
            spans[-1] = (spans[-1][0], spans[-1][1], row["epoch"])
        else:
            spans.append((lr, row["epoch"], row["epoch"]))
    return spans


def summary_lines(run: Run) -> list[str]:
    rows, last = run.rows, run.rows[-1]
    done = last["epoch"]
    head = f"{run.out_dir}: {done}" + (f" of {run.planned_epochs}" if run.planned_epochs else "") + " epochs"
    details = [x for x in (run.arch, run.schedule and f"schedule {run.schedule}") if x]
    lines = [head + (f" ({', '.join(details)})" if details else "")]
    if len(rows) < done:
        lines.append(f"note   metrics.jsonl has rows for {len(rows)} of these {done} epochs")

    best = best_row(rows)
    if best is None:
        lines.append("best   no epoch recorded a val top-1")
    else:
        lines.append(f"best   epoch {best['epoch']}: val top-1 {_f(_num(best, 'val_top1'), '.2f', '%')}  "
                     f"top-5 {_f(_num(best, 'val_top5'), '.2f', '%')}  val loss {_f(_num(best, 'val_loss'), '.4f')}")
    lines.append(f"final  epoch {done}: val top-1 {_f(_num(last, 'val_top1'), '.2f', '%')}  "
                 f"top-5 {_f(_num(last, 'val_top5'), '.2f', '%')}  train loss {_f(_num(last, 'train_loss'), '.4f')}  "
                 f"lr {_f(_num(last, 'lr'), '.4g')}")

    spans = _lr_spans(rows)
    if len(spans) > 4:  # an annealed lr: its ends say more than dozens of spans
        lines.append(f"lr     {spans[0][0]:.4g} (epoch {spans[0][1]}) to {spans[-1][0]:.4g} (epoch {spans[-1][2]}), "
                     f"changed at {len(spans) - 1} epochs")
    elif spans:
        lines.append("lr     " + ", ".join(f"{lr:.4g} ({f'epochs {a}-{b}' if b > a else f'epoch {a}'})"
                                          for lr, a, b in spans))

    _, speed = _series(rows, "images_per_s")
    _, wait = _series(rows, "data_wait")
    if speed:
        lines.append(f"speed  {sum(speed) / len(speed):.0f} img/s training on average"
                     + (f", data wait {100 * sum(wait) / len(wait):.0f}%" if wait else ""))

    timed, seconds = _series(rows, "epoch_seconds")
    if not timed:
        lines.append("time   unknown (metrics.jsonl from before epoch_seconds was recorded)")
    elif len(timed) == len(rows):
        lines.append(f"time   {format_duration(sum(seconds))} training and validating {len(rows)} epochs "
                     f"({format_duration(sum(seconds) / len(rows))} per epoch)")
    else:
        lines.append(f"time   at least {format_duration(sum(seconds))}: {len(timed)} of {len(rows)} epochs "
                     "recorded their time")

    bad = [(r["epoch"], int(b)) for r in rows if (b := _num(r, "bad_images"))]
    if bad:
        lines.append(f"bad    {sum(n for _, n in bad)} unreadable images skipped in total "
                     f"(in {len(bad)} of {len(rows)} epochs)")
    if run.skipped_lines:
        lines.append(f"note   {run.skipped_lines} unreadable line(s) of {run.out_dir / 'metrics.jsonl'} skipped")
    return lines


def _matplotlib():
    """(FigureCanvasAgg, Figure, MaxNLocator); PlotUnavailable where matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401  first: the package itself, as a missing install fails
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotUnavailable(PLOT_HINT) from None
    return FigureCanvasAgg, Figure, MaxNLocator


def _mark_best(acc_ax, rows: list[dict], first: int, last: int) -> None:
    """Circle and label the best top-1 epoch on the accuracy panel, if one has a top-1; returns nothing."""
    best = best_row(rows)
    if best is not None:
        top1 = best["val_top1"]
        acc_ax.plot([best["epoch"]], [top1], "o", markersize=9, markerfacecolor="none",
                    markeredgecolor="crimson", markeredgewidth=1.5, label="best top-1", zorder=5)
        # Text toward the middle of the panel, so it never runs off its edge.
        right_half = best["epoch"] > (first + last) / 2
        low, high = acc_ax.get_ylim()
        above = top1 < low + 0.4 * (high - low)
        acc_ax.annotate(f"best {top1:.2f}%\n(epoch {best['epoch']})", (best["epoch"], top1),
                        xytext=(-12 if right_half else 12, 28 if above else -28), textcoords="offset points",
                        ha="right" if right_half else "left", va="bottom" if above else "top",
                        fontsize=8, color="crimson", bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                                                          "edgecolor": "none", "alpha": 0.8},
                        arrowprops={"arrowstyle": "-", "color": "crimson", "linewidth": 0.8})


def _mark_lr(loss_ax, acc_ax, rows: list[dict]) -> None:
    """Show the lr on both panels: a dashed line per change, or past MAX_LR_MARKS changes its
    curve on the loss panel's right axis; returns nothing."""
    changes = lr_changes(rows)
    if len(changes) <= MAX_LR_MARKS:
        for epoch, _, new in changes:
            for ax in (loss_ax, acc_ax):
                x = epoch - 0.5  # between the last epoch at the old lr and the first at the new
                ax.axvline(x, color="dimgray", linestyle="--", linewidth=1)
                ax.text(x, 0.97, f"lr {new:.4g}", transform=ax.get_xaxis_transform(), rotation=90,
                        ha="left", va="top", fontsize=7, color="dimgray", zorder=6,
                        bbox={"boxstyle": "square,pad=0.15", "facecolor": "white", "edgecolor": "none",
                              "alpha": 0.8})
    else:
        xs, ys = _series(rows, "lr")
        lr_ax = loss_ax.twinx()
        lr_ax.plot(xs, ys, color="dimgray", linestyle="--", linewidth=1, label="lr (right axis)")
        lr_ax.set_ylabel("lr", color="dimgray")
        lr_ax.tick_params(axis="y", colors="dimgray", labelsize=7)
        lr_ax.legend(loc="upper center", fontsize=8)


def draw(run: Run, path: str | Path) -> Path:
    """Write the report figure to ``path`` (PNG, atomically) and return it."""
    FigureCanvasAgg, Figure, MaxNLocator = _matplotlib()
    path, rows = Path(path), run.rows
    # The object API with its own Agg canvas: no pyplot state, no display needed.
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    first, last = rows[0]["epoch"], rows[-1]["epoch"]

    for ax, series, ylabel in ((loss_ax, (("train_loss", "train loss"), ("val_loss", "val loss")), "loss"),
                               (acc_ax, (("val_top1", "val top-1"), ("val_top5", "val top-5")), "val accuracy (%)")):
        for key, label in series:
            xs, ys = _series(rows, key)
            if xs:  # dots show single epochs; past ~30 epochs they only thicken the line
                ax.plot(xs, ys, marker="o" if len(rows) <= 30 else None, markersize=3, linewidth=1.5, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_xlim(first - 0.5, last + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(True, alpha=0.3)
    _mark_best(acc_ax, rows, first, last)
    _mark_lr(loss_ax, acc_ax, rows)

    for ax in (loss_ax, acc_ax):
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values recorded", transform=ax.transAxes, ha="center", color="gray")
    name = run.out_dir.name or run.out_dir.resolve().name
    planned = f" of {run.planned_epochs}" if run.planned_epochs else ""
    fig.suptitle(" | ".join(x for x in (name, run.arch, run.schedule and f"{run.schedule} schedule",
                                        f"{last}{planned} epochs") if x), fontsize=11)
    atomic_write_bytes(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI))
    return path


def report_run(out_dir: str | Path, log: Callable[[str], None]) -> Path | None:
    """The end of a training run: log the summary and write OUT/report.png.

    The run is done whatever happens here: without matplotlib the log says how to get the
    plot, and a PNG that cannot be written is a warning, not a failed run.
    """
    from .checkpoint import WriteError

    run = load_run(out_dir)
    for line in summary_lines(run):
        log(line)
    try:
        path = draw(run, run.out_dir / "report.png")
    except PlotUnavailable as exc:
        log(f"report: {run.out_dir / 'report.png'} not drawn: {exc}")
        return None
    except WriteError as exc:
        log(f"warning: {exc}")
        return None
    log(f"report: {path}")
    return path
