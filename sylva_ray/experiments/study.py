"""``sylva-ray study``: the same algorithms and seeds over kinds of heterogeneity, one table.

A comparison on one split answers "which algorithm, here"; a researcher also asks "where does
federation pay at all". ``study`` runs ``compare`` once per *setting* on one base configuration
(the ``shift`` preset by default: 20 clients of the same pool), each in its own folder, then sets
the settings side by side:

    out/
      study.yaml                         what was asked (a re-run with other arguments is refused)
      <setting>/seed<k>/                 a ``compare`` folder per setting and seed (resumable the same way);
                                         seeds go outermost, so a study stopped early holds whole seeds
      study.csv                          one row per setting x algorithm x seed
      study.md                           client means ± standard error over seeds, and every algorithm
                                         minus ``--baseline`` paired by seed
      study.png                          robust accuracy by setting, one bar per algorithm

A setting is ``+``-joined parts: ``iid`` (IID labels), ``alpha<A>`` (Dirichlet label skew with
concentration A) and ``shift`` (the base configuration's feature shift, rotation by default); a
setting without ``shift`` has none. Seed k is the same partition for every algorithm of a setting.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import yaml

from sylva_ray.base.config import ConfigError, apply_overrides
from sylva_ray.base.plots import pyplot, save_figure
from sylva_ray.base.storage import atomic_write_text
from sylva_ray.engine.resolve import build_config
from sylva_ray.engine.rundir import write_table
from sylva_ray.experiments.compare import execute_runs, prepare_comparison, request_of
from sylva_ray.experiments.comparison_report import write_report

log = logging.getLogger(__name__)

MANIFEST = "study.yaml"
#: The study's five settings: no skew, mild and extreme label skew, feature shift, both.
DEFAULT_SETTINGS = ("iid", "alpha1.0", "alpha0.1", "shift", "shift+alpha0.5")
DEFAULT_ALGORITHMS = ("sylva", "sylva-no_phase2", "fedavg_lora_at", "local_at", "fat")
#: The feature shift a ``shift`` part turns on when the base configuration has none.
DEFAULT_SHIFT = "rotation"
#: The figures set side by side: each client's own test split, unweighted client means.
FIGURES = {"clean": "clean_acc_unweighted", "PGD": "robust_acc_unweighted"}
ALPHA_PREFIX = "alpha"


def setting_overrides(setting: str, base_raw: dict[str, Any]) -> dict[str, Any]:
    """The ``data.*`` overrides a setting name stands for; a clear error for a name that is none."""
    parts = [part.strip() for part in setting.split("+") if part.strip()]
    if not parts:
        raise ConfigError(f"--settings entry {setting!r} is empty; e.g. iid, alpha0.1, shift, shift+alpha0.5")
    base_shift = base_raw.get("data", {}).get("shift", "none")
    overrides: dict[str, Any] = {"data.shift": "none"}
    label_parts = []
    for part in parts:
        if part == "shift":
            overrides["data.shift"] = base_shift if base_shift != "none" else DEFAULT_SHIFT
        elif part == "iid":
            overrides["data.partition"] = "iid"
            label_parts.append(part)
        elif part.startswith(ALPHA_PREFIX):
            try:
                alpha = float(part[len(ALPHA_PREFIX) :])
            except ValueError:
                alpha = math.nan
            if not alpha > 0 or not math.isfinite(alpha):
                raise ConfigError(f"--settings entry {setting!r}: {part!r} needs a positive number, e.g. alpha0.5")
            overrides.update({"data.partition": "dirichlet", "data.alpha": alpha})
            label_parts.append(part)
        else:
            raise ConfigError(
                f"--settings entry {setting!r}: unknown part {part!r}; join iid, alpha<A> and shift with '+'"
            )
    if len(label_parts) > 1:
        raise ConfigError(f"--settings entry {setting!r} gives the label split twice ({label_parts}); keep one")
    if not label_parts:
        overrides["data.partition"] = "iid"
    return overrides


def paired_difference(frame: pd.DataFrame, algorithm: str, baseline: str, column: str) -> tuple[float, float, int]:
    """Mean and standard error over seeds of (algorithm - baseline), in points, paired by seed."""
    mine = frame[frame["algorithm"] == algorithm].set_index("seed")[column]
    theirs = frame[frame["algorithm"] == baseline].set_index("seed")[column]
    seeds = mine.index.intersection(theirs.index)
    differences = (mine.loc[seeds] - theirs.loc[seeds]).to_numpy(dtype=float) * 100
    if len(differences) == 0:
        return math.nan, math.nan, 0
    se = float(np.std(differences, ddof=1) / math.sqrt(len(differences))) if len(differences) > 1 else math.nan
    return float(differences.mean()), se, len(differences)


def mean_se(values: pd.Series) -> tuple[float, float]:
    """Mean and standard error (points) of per-seed fractions."""
    points = values.to_numpy(dtype=float) * 100
    se = float(np.std(points, ddof=1) / math.sqrt(len(points))) if len(points) > 1 else math.nan
    return float(points.mean()), se


def _pm(mean: float, se: float) -> str:
    return "-" if math.isnan(mean) else (f"{mean:.1f}" if math.isnan(se) else f"{mean:.1f} ± {se:.1f}")


def _signed(mean: float, se: float) -> str:
    return "-" if math.isnan(mean) else (f"{mean:+.1f}" if math.isnan(se) else f"{mean:+.1f} ± {se:.1f}")


def markdown(frame: pd.DataFrame, settings: list[str], algorithms: list[str], baseline: Optional[str]) -> str:
    lines = [
        "Client means (each client's own test split, unweighted) in %, mean ± standard error over seeds.",
        "",
        "| algorithm | " + " | ".join(f"{s} clean / PGD" for s in settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for algorithm in algorithms:
        cells = []
        for setting in settings:
            rows = frame[(frame["setting"] == setting) & (frame["algorithm"] == algorithm)]
            if rows.empty:
                cells.append("-")
                continue
            clean, pgd = (mean_se(rows[c]) for c in FIGURES.values())
            cells.append(f"{_pm(*clean)} / {_pm(*pgd)}")
        lines.append(f"| {algorithm} | " + " | ".join(cells) + " |")
    if baseline is not None:
        lines += [
            "",
            f"Minus `{baseline}`, paired by seed (points, mean ± standard error over seeds): clean / PGD.",
            "",
            "| algorithm | " + " | ".join(settings) + " |",
            "|---|" + "---|" * len(settings),
        ]
        for algorithm in algorithms:
            if algorithm == baseline:
                continue
            cells = []
            for setting in settings:
                rows = frame[frame["setting"] == setting]
                clean = paired_difference(rows, algorithm, baseline, FIGURES["clean"])
                pgd = paired_difference(rows, algorithm, baseline, FIGURES["PGD"])
                cells.append(f"{_signed(*clean[:2])} / {_signed(*pgd[:2])}")
            lines.append(f"| {algorithm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_study(path: Path, frame: pd.DataFrame, settings: list[str], algorithms: list[str]) -> Optional[Path]:
    """Robust accuracy by setting, one bar per algorithm (mean ± standard error over seeds)."""
    fig, ax = pyplot().subplots(figsize=(max(6.0, 1.6 * len(settings)), 3.6))
    width = 0.8 / max(1, len(algorithms))
    for index, algorithm in enumerate(algorithms):
        means, errors = [], []
        for setting in settings:
            rows = frame[(frame["setting"] == setting) & (frame["algorithm"] == algorithm)]
            mean, se = mean_se(rows[FIGURES["PGD"]]) if not rows.empty else (math.nan, math.nan)
            means.append(mean)
            errors.append(0.0 if math.isnan(se) else se)
        positions = np.arange(len(settings)) + (index - (len(algorithms) - 1) / 2) * width
        ax.bar(positions, means, width, yerr=errors, capsize=2, label=algorithm)
    ax.set_xticks(np.arange(len(settings)), settings)
    ax.set_ylabel("client-mean PGD accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(5, len(algorithms)), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    return save_figure(fig, path)


def check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """A study folder belongs to one request; where the runs execute and who watches them
    (``compare``'s resumable fields: the address, the dashboard, the trackers) may change."""
    path = out / MANIFEST
    if path.is_file():
        previous = yaml.safe_load(path.read_text())
        if {k: request_of(v, k) for k, v in previous.items()} != {k: request_of(v, k) for k, v in manifest.items()}:
            raise ConfigError(
                f"--out {str(out)!r} holds a study with other arguments; use a new --out, or repeat the original "
                "arguments to resume it"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} exists, is not empty and is not a study folder; choose a new folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump(manifest, sort_keys=False))


def write_study(
    out: Path, frames: list[pd.DataFrame], settings: list[str], algorithms: list[str], baseline: Optional[str]
) -> pd.DataFrame:
    """``study.csv`` (every run, failed ones with their error) and ``study.md``/``study.png`` of the
    runs that finished."""
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "setting", table.pop("setting"))
    write_table(out / "study.csv", table)
    finished = table[table["status"] == "ok"] if "status" in table else table.iloc[:0]
    if finished.empty or not set(FIGURES.values()) <= set(finished.columns):
        return table
    atomic_write_text(out / "study.md", markdown(finished, settings, algorithms, baseline))
    plot_study(out / "study.png", finished, settings, algorithms)
    return table


def run_study(
    base_raw: dict[str, Any],
    settings: list[str],
    algorithms: list[str],
    seeds: int,
    out: Path,
    baseline: Optional[str] = "local_at",
    actors_per_run: int = 1,
    max_parallel: Optional[int] = None,
) -> pd.DataFrame:
    """Every setting's comparison, then the side-by-side table; every setting is checked first."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    if not settings:
        raise ConfigError(f"--settings is empty; e.g. {','.join(DEFAULT_SETTINGS)}")
    duplicates = sorted({s for s in settings if settings.count(s) > 1})
    if duplicates:
        raise ConfigError(f"--settings lists {duplicates} twice")
    if baseline is not None and baseline not in algorithms:
        raise ConfigError(f"--baseline {baseline!r} is not among --algorithms {algorithms}")
    raws = {setting: apply_overrides(base_raw, setting_overrides(setting, base_raw)) for setting in settings}
    for setting, raw in raws.items():  # a typo in the last setting must not wait for the first to finish
        try:
            build_config(raw)
        except ConfigError as exc:
            raise ConfigError(f"--settings entry {setting!r}: {exc}") from None
    out = Path(out)
    check_manifest(
        out,
        {
            "settings": settings,
            "algorithms": algorithms,
            "seeds": seeds,
            "actors_per_run": actors_per_run,
            "base_config": base_raw,
        },
    )
    frames = []
    base_seed = int(base_raw.get("runtime", {}).get("seed", 0))
    for k in range(seeds):  # seed by seed: a study stopped early holds whole seeds of every setting
        seed = base_seed + k
        folders = {setting: out / setting / f"seed{seed}" for setting in settings}
        plans = {
            setting: prepare_comparison(
                apply_overrides(raws[setting], {"runtime.seed": seed}),
                algorithms,
                1,
                folders[setting],
                actors_per_run=actors_per_run,
            )
            for setting in settings
        }
        specs = [spec for setting in settings for spec in plans[setting]]  # one pool: no core waits for a setting
        summaries, errors = execute_runs(specs, actors_per_run, max_parallel, desc=f"study seed {seed}")
        offset = 0
        for setting in settings:
            count = len(plans[setting])
            frame = write_report(
                folders[setting],
                plans[setting],
                {i - offset: v for i, v in summaries.items() if offset <= i < offset + count},
                {i - offset: v for i, v in errors.items() if offset <= i < offset + count},
                None,
            )
            frames.append(frame.assign(setting=setting))
            offset += count
        table = write_study(out, frames, settings, algorithms, baseline)  # whole seeds so far
        if errors:
            raise RuntimeError(
                f"{len(errors)} of {len(specs)} runs of seed {seed} failed; see each setting's comparison.csv; "
                "re-run the same command to resume them"
            )
    return table
