"""Reading TensorBoard event files back with tensorboard's own reader (a test dependency)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

#: Keep every event: the reader samples long series by default.
EVERYTHING = {"scalars": 0, "images": 0, "tensors": 0, "histograms": 0}


def load(logdir: Path) -> EventAccumulator:
    """Every event of one run folder (all its event files, purges applied as TensorBoard does)."""
    accumulator = EventAccumulator(str(logdir), size_guidance=EVERYTHING)
    accumulator.Reload()
    return accumulator


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` in the order TensorBoard shows them."""
    events = load(logdir)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def texts(logdir: Path) -> dict[str, str]:
    """``tag -> the last text logged under it`` (tensorboardX stores text as tensors)."""
    events = load(logdir)
    found = {}
    for tag in events.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            proto = events.Tensors(tag)[-1].tensor_proto
            found[tag.removesuffix("/text_summary")] = proto.string_val[0].decode()
    return found
