"""Live metrics: TensorBoard event files in every run directory, MLflow when a URI is given.

A run's CSV, JSON and PNG files tell its story after the fact; the tracker tells it while it runs,
in the two places researchers already look. ``RUN/tb/`` holds TensorBoard event files written by
tensorboardX (the writer Ray Tune brings), so ``tensorboard --logdir runs/`` lines runs up side by
side:

    round/<name>               the round's figures (step = round, 1-based): the honest clients' mean
                               clean and robust accuracy and loss terms, bytes up and down, the
                               simulated clock, dropped / straggling / offline counts
    client/<name>/<client>     the same per client (the Custom Scalars tab draws one chart per
                               name with a line per client), the aggregation weights among them
    aggregation/weights        the round's aggregation weights as a histogram
    phase2/...                 Phase 2's client means, Shapley values and selected layers (text)
    plots/<file>               the run's plots, at the end
    hparams/                   the configuration with the final figures (the HParams tab)

Each round is logged and flushed *before* its checkpoint; a resumed run opens its writer with
``purge_step`` at the round it resumes from, so a round logged by a session that died before
checkpointing it is hidden when it is run again: no step appears twice, and none is missing.

MLflow (``tracking.mlflow_uri``) is an opt-in, not a dependency: the same metrics, the
configuration as parameters and the run's files as artifacts. A tracker that fails or cannot be
reached is one warning, and the run and its files go on untouched. The tracker's own seconds are kept
(``seconds``) so that ``summary.json`` says what the tracking cost.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.storage import atomic_write_text

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tb"
#: The file holding the MLflow run id, so that a resumed run continues the same MLflow run.
TRACKING_FILE = "tracking.json"
#: Per-client figures logged each round (a client's row in metrics.csv holds them).
CLIENT_SCALARS = (
    "clean_acc",
    "robust_acc",
    "train_loss",
    "train_adversarial",
    "train_similarity",
    "train_proximal",
    "bytes_up",
    "agg_weight",
    "sim_total_s",
)
#: Round-summary fields that are not figures to plot.
NOT_SCALARS = frozenset({"round"})
#: Final figures set beside the configuration in the HParams tab.
FINAL_FIGURES = ("clean_acc", "robust_acc", "autoattack_acc", "strongest_attack_acc")
#: Run files logged as MLflow artifacts at the end (never models or checkpoints: they can be large).
ARTIFACT_SUFFIXES = (".csv", ".json", ".png", ".yaml", ".parquet")
#: MLflow's HTTP client retries for minutes by default; a tracker that cannot be reached should
#: cost one warning, not the run's time. The user's own settings win.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: MLflow accepts at most this many parameters, and this many metrics, per call.
MLFLOW_PARAMS_PER_BATCH, MLFLOW_METRICS_PER_BATCH = 100, 1000
#: Seconds the event writer may hold figures in memory (each round is flushed as it ends anyway).
FLUSH_SECONDS = 10
#: The sub-folder of ``tb/`` holding the HParams session (TensorBoard reads it as its own run).
HPARAMS_DIR = "hparams"
#: MLflow's limit on a parameter value's length.
MLFLOW_PARAM_CHARS = 6000


def round_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """A round summary's numeric figures (rounds.csv's columns): the names used by TensorBoard
    (``round/<name>``), MLflow and a sweep's per-round Tune reports alike."""
    return {
        key: float(value)
        for key, value in summary.items()
        if key not in NOT_SCALARS and isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    }


def flat_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The configuration as ``{dotted field: scalar}``: lists and mappings as JSON text."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[prefix] = "none" if value is None else value
        else:
            flat[prefix] = json.dumps(value, default=str)

    walk("", cfg.to_dict())
    return flat


class RunTracker:
    """Writes a run's figures to TensorBoard (and MLflow) as the run produces them.

    Never ends a run: a tracker call that fails is one warning, and that tracker is off for the
    rest of the session (the run's own files are what the results are).

    Steps: round ``r`` (0-based) is step ``r + 1``; Phase 2, the final figures and the plots are
    step ``rounds + 1`` ("after the last round"), so a resume's ``purge_step`` covers them too.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, first_round: int = 0) -> None:
        """``first_round``: the 0-based round this session starts at (a resume's checkpoint round)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.seconds = 0.0
        self.writer: Any = None
        self.mlflow: Optional[_MLflowRun] = None
        if cfg.tracking.tensorboard:
            self._timed(lambda: self._open_writer(first_round), "TensorBoard")
        if cfg.tracking.mlflow_uri:
            started = time.perf_counter()
            self.mlflow = _MLflowRun.start(cfg, self.run_dir)
            self.seconds += time.perf_counter() - started

    def _open_writer(self, first_round: int) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(
            logdir=str(self.run_dir / TENSORBOARD_DIR),
            # Rounds are logged before their checkpoint: a round logged by a session that died before
            # checkpointing it is run again on resume, and its first logging is purged here.
            purge_step=first_round + 1 if first_round else None,
            flush_secs=FLUSH_SECONDS,
            # Event files are read in name order, and the name's clock has one-second steps: the
            # session's first round and process id keep two sessions' files apart and in order.
            filename_suffix=f".r{first_round:06d}.{os.getpid()}",
        )
        if not first_round:
            self.writer.add_custom_scalars(self._layout())

    def _layout(self) -> dict[str, Any]:
        """Custom Scalars: one chart per per-client figure, a line per client (the default tab
        would draw one chart per client and figure)."""
        return {
            "clients": {name: ["Multiline", [rf"client/{name}/.*"]] for name in CLIENT_SCALARS},
            "round": {
                "accuracy": ["Multiline", [r"round/(clean|robust)_acc$"]],
                "loss terms": ["Multiline", [r"round/train_.*"]],
            },
        }

    def _timed(self, work: Callable[[], None], what: str = "TensorBoard") -> None:
        """Run one tracker call, adding its seconds to ``seconds``; a failure turns TensorBoard off
        with one warning (MLflow guards its own calls)."""
        started = time.perf_counter()
        try:
            work()
        except Exception as exc:  # noqa: BLE001 -- a tracker never ends a run
            log.warning("%s tracking failed (%s: %s); the run goes on without it", what, type(exc).__name__, exc)
            self._drop_writer()
        finally:
            self.seconds += time.perf_counter() - started

    def _drop_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 -- already failing: closing is best effort
                pass

    # --- what the engine calls ------------------------------------------------------------------
    def log_round(self, summary: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> None:
        """One round: its summary (a rounds.csv row) and its clients' rows (metrics.csv rows),
        flushed to disk before the round's checkpoint is written."""
        self._timed(lambda: self._log_round(summary, list(rows)))

    def _log_round(self, summary: Mapping[str, Any], rows: list[Mapping[str, Any]]) -> None:
        step = int(summary["round"]) + 1
        scalars = {f"round/{k}": v for k, v in round_scalars(summary).items()}
        weights = []
        for row in rows:
            client = int(row["client"])
            for name in CLIENT_SCALARS:
                value = row.get(name)
                if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value):
                    scalars[f"client/{name}/{client:03d}"] = float(value)
            if isinstance(row.get("agg_weight"), float) and np.isfinite(row["agg_weight"]):
                weights.append(row["agg_weight"])
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            if weights:
                self.writer.add_histogram("aggregation/weights", np.asarray(weights), step)
            self.writer.flush()
        if self.mlflow is not None:
            self.mlflow.metrics(scalars, step)

    def log_phase2(self, result: Mapping[str, Any], out_dir: Path) -> None:
        """Phase 2's client means, Shapley values and selected layers (step: after the last round)."""
        self._timed(lambda: self._log_phase2(result, Path(out_dir), self.final_step))

    @property
    def final_step(self) -> int:
        return self.cfg.federation.rounds + 1

    def _log_phase2(self, result: Mapping[str, Any], out_dir: Path, step: int) -> None:
        scalars = {
            f"phase2/{k}": float(v)
            for k, v in result.get("means", {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        shapley = out_dir / "shapley.csv"
        table = shapley_markdown(pd.read_csv(shapley)) if shapley.is_file() and shapley.stat().st_size else ""
        selected = result.get("selected", {})
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            if table:
                self.writer.add_text("phase2/shapley", table, step)
            if selected:
                lines = [f"- client {c}: {', '.join(map(str, layers)) or '(none)'}" for c, layers in selected.items()]
                self.writer.add_text("phase2/selected_layers", "\n".join(lines), step)
        if self.mlflow is not None:
            self.mlflow.metrics(scalars, step)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The end: the run's plots as images and the configuration with the final figures as
        hyper-parameters (MLflow: the final figures and the configuration as parameters). The
        run's files go to MLflow with ``publish``, once they are all written."""
        self._timed(lambda: self._finish(summary, self.final_step))

    def _finish(self, summary: Mapping[str, Any], step: int) -> None:
        final = summary.get("final") or {}
        metrics = {f"final/{k}": float(final[k]) for k in FINAL_FIGURES if isinstance(final.get(k), (int, float))}
        params = flat_config(self.cfg)
        if self.writer is not None:
            for png in sorted(self.run_dir.glob("*.png")):
                self.writer.add_image(f"plots/{png.stem}", _read_png(png), step, dataformats="HWC")
            hparams = self.run_dir / TENSORBOARD_DIR / HPARAMS_DIR
            for earlier in hparams.glob("events.out.tfevents.*"):  # a session that died after writing them
                earlier.unlink()
            self.writer.add_hparams(params, metrics, name=HPARAMS_DIR, global_step=step)
        if self.mlflow is not None:
            self.mlflow.metrics(metrics, step)
            self.mlflow.params(params)

    def publish(self) -> None:
        """After the run's last file is written: those files to MLflow, its run marked finished;
        then close."""
        if self.mlflow is not None:
            started = time.perf_counter()
            self.mlflow.publish(self.run_dir)
            self.seconds += time.perf_counter() - started
        self.close()

    def close(self) -> None:
        """Flush and close the event files (also for a session that stops before the end)."""
        self._timed(self._drop_writer)


def shapley_markdown(frame: pd.DataFrame) -> str:
    """Shapley values as a markdown table (clients x layers, ``value ± stderr``, selected in bold)."""
    if frame.empty:
        return ""
    layers = list(dict.fromkeys(frame["layer"]))
    lines = ["| client | " + " | ".join(map(str, layers)) + " |", "|---" * (len(layers) + 1) + "|"]
    for client, group in frame.groupby("client", sort=True):
        cells = []
        by_layer = group.set_index("layer")
        for layer in layers:
            row = by_layer.loc[layer]
            cell = f"{row['value']:.4f} ± {row['stderr']:.4f}"
            cells.append(f"**{cell}**" if bool(row["selected"]) else cell)
        lines.append(f"| {client} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_png(path: Path) -> np.ndarray:
    """An RGB uint8 image (what TensorBoard stores) from a PNG the run wrote."""
    from matplotlib import image

    pixels = image.imread(path)
    if pixels.dtype != np.uint8:
        pixels = (np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    return pixels[..., :3]


def mlflow_name(key: str) -> str:
    """A key as MLflow accepts it (alphanumerics and ``_-. :/``): a device profile's ``@`` becomes ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", key)


class _MLflowRun:
    """One MLflow run per run directory, continued on resume; any failure turns it off with one warning."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(cls, cfg: ExperimentConfig, run_dir: Path) -> Optional["_MLflowRun"]:
        """The run's MLflow run: the one ``tracking.json`` names when it was made at this URI, else a new one."""
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            log.warning(
                "tracking.mlflow_uri is set but MLflow is not installed (pip install mlflow); "
                "the run goes on with TensorBoard and its files only"
            )
            return None
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        uri = cfg.tracking.mlflow_uri
        try:
            client = MlflowClient(tracking_uri=uri)
            recorded_file = run_dir / TRACKING_FILE
            recorded = json.loads(recorded_file.read_text()) if recorded_file.is_file() else {}
            run_id = recorded.get("mlflow_run_id") if recorded.get("mlflow_uri") == uri else None
            if run_id is None:  # a new run, or one resumed against another MLflow than it began with
                name = cfg.tracking.mlflow_experiment or cfg.name
                experiment = client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
                run_id = client.create_run(experiment_id, run_name=run_dir.name).info.run_id
                atomic_write_text(recorded_file, json.dumps({"mlflow_run_id": run_id, "mlflow_uri": uri}))
            return cls(client, run_id)
        except Exception as exc:  # noqa: BLE001 -- any tracker failure: one warning, the run goes on
            log.warning("MLflow at %s cannot be used (%s); the run goes on without it", uri, exc)
            return None

    def _guarded(self, work: Callable[[], None]) -> None:
        if self.client is None:
            return
        try:
            work()
        except Exception as exc:  # noqa: BLE001 -- one warning, then no more MLflow calls this session
            log.warning("MLflow stopped answering (%s); the run goes on without it", exc)
            self.client = None

    def metrics(self, scalars: Mapping[str, float], step: int) -> None:
        """Figures at ``step``, in as many calls as MLflow's batch limit needs."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(mlflow_name(k), float(v), stamp, step) for k, v in scalars.items()]

        def work() -> None:
            for start in range(0, len(items), MLFLOW_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=items[start : start + MLFLOW_METRICS_PER_BATCH])

        self._guarded(work)

    def params(self, params: Mapping[str, Any]) -> None:
        """The configuration as parameters (MLflow keeps a parameter once: logged at the end only)."""
        from mlflow.entities import Param

        items = [Param(mlflow_name(k), str(v)[:MLFLOW_PARAM_CHARS]) for k, v in params.items()]

        def work() -> None:
            for start in range(0, len(items), MLFLOW_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=items[start : start + MLFLOW_PARAMS_PER_BATCH])

        self._guarded(work)

    def publish(self, run_dir: Path) -> None:
        """The run's result files as artifacts (never models or checkpoints), then finished."""

        def work() -> None:
            for path in sorted(run_dir.iterdir()):
                if path.is_file() and path.suffix in ARTIFACT_SUFFIXES:
                    self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id)

        self._guarded(work)


def log_table(folder: Path, name: str, frame: pd.DataFrame) -> None:
    """A bench's table as TensorBoard figures in ``folder/tb``: each numeric column as
    ``<name>/<column>`` over the table's rows (step = row), and the whole table as text. A failure
    is a warning: the bench's CSV is its result."""
    try:
        _write_table_events(folder, name, frame)
    except Exception as exc:  # noqa: BLE001 -- tracking never ends a bench
        log.warning("TensorBoard tracking of %s failed (%s); %s.csv holds the table", name, exc, name)


def _write_table_events(folder: Path, name: str, frame: pd.DataFrame) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(logdir=str(Path(folder) / TENSORBOARD_DIR)) as writer:
        for column in frame.select_dtypes("number").columns:
            for step, value in enumerate(frame[column]):
                if pd.notna(value):
                    writer.add_scalar(f"{name}/{column}", float(value), step)
        # An indented block: TensorBoard renders text as markdown, and a table as a code block reads well.
        text = "\n".join("    " + line for line in frame.to_string(index=False).splitlines())
        writer.add_text(name, text)
