"""Analysis API over a finished run directory.

    model = sylva_ray.load_client_model("runs/...", client_id=3)   # eval mode, takes [0,1] images
    test = sylva_ray.load_client_split("runs/...", client_id=3, split="test")
    with torch.no_grad():
        accuracy = (model(test.pixels()).argmax(1).numpy() == test.labels).mean()

The model is the client's final personalised model: the pre-trained backbone with the run's final
global LoRA merged in (peft ``merge_and_unload``) and the client's own head, resize and
normalisation inside, so torchattacks can attack it directly.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from sylva_ray.engine.rundir import load_run_config
from sylva_ray.method.algorithms import algorithm_for
from sylva_ray.method.data import ArrayDataset, DataSource, Partition, client_data, load_source
from sylva_ray.method.pretrained import build_pretrained_model

SPLITS = ("train", "test")


def _model_file(run_dir: Path, client_id: int) -> Path:
    path = Path(run_dir) / "models" / f"client_{client_id:04d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved model for client {client_id} (finished run? output.save_models on?)")
    return path


def phase1_dir(run_dir: Path) -> Path:
    """A ``phase2-*`` result folder points at the Phase-1 run it tailored."""
    pointer = run_dir / "phase1_run.txt"
    return Path(pointer.read_text().strip()) if pointer.is_file() else run_dir


def load_client_model(run_dir: str | Path, client_id: int) -> nn.Module:
    """Client ``client_id``'s final personalised model, merged, in eval mode, on the CPU.

    After Phase 2 (``models/phase2_client_NNNN.safetensors`` present) that is the tailored model:
    the merged global adapter with the client's tuned layers and head on top.
    """
    run_dir = Path(run_dir)
    base_dir = phase1_dir(run_dir)
    cfg = load_run_config(base_dir)
    if not 0 <= client_id < cfg.data.num_clients:
        raise IndexError(f"client_id={client_id}: the run has clients 0..{cfg.data.num_clients - 1}")
    state = load_file(str(_model_file(base_dir, client_id)))
    source = load_source(cfg.data)
    scope = algorithm_for(cfg).scope
    model = scope.wrap(build_pretrained_model(cfg.model, cfg.data, source), cfg.lora)
    scope.load(model, state)
    if scope.name == "full":  # full-model algorithms saved the whole (global) model
        return model.requires_grad_(False).eval()
    merged = model.merge_and_unload().eval()
    tailored = run_dir / "models" / f"phase2_client_{client_id:04d}.safetensors"
    if tailored.is_file():
        result = merged.load_state_dict(load_file(str(tailored)), strict=False)
        if result.unexpected_keys:
            raise KeyError(f"{tailored}: tensors the model does not have: {result.unexpected_keys[:3]}")
    return merged


def load_run_partition(run_dir: str | Path) -> tuple[DataSource, Partition]:
    """The run's data source and its partition (every client's sample indices), read once."""
    run_dir = phase1_dir(Path(run_dir))
    source = load_source(load_run_config(run_dir).data)
    return source, Partition.load(run_dir / "partition.json", expected_fingerprint=source.fingerprint())


def load_client_split(run_dir: str | Path, client_id: int, split: str = "test") -> ArrayDataset:
    """Client ``client_id``'s own ``train`` or ``test`` split, exactly as the run used it."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    source, partition = load_run_partition(run_dir)
    if not 0 <= client_id < partition.num_clients:
        raise IndexError(f"client_id={client_id}: the run has clients 0..{partition.num_clients - 1}")
    return getattr(client_data(source, partition, client_id), split)
