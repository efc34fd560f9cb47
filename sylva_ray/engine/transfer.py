"""Transfer attacks in the final protocol: which sources attack which victim, the final models they
need, and the crafting a victim's protocol job does before the victim is scored.

Data flow: the driver plans each victim's sources (``plan_sources``) and broadcasts every client's
final model once (``encode_models``); a protocol job crafts on each source for the victim's attacked
subset (``craft_for_victim``), then scores the victim on them with its white-box protocol
(``evaluation.evaluate(transfer=...)``); its rows (``transfer_rows``) come back with the outcome.
Seeds come from (run seed, source, victim), so no figure depends on which actor ran the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from sylva_ray.base.config import ExperimentConfig
from sylva_ray.base.seeding import derive_seed
from sylva_ray.method.evaluation import EvalResult, binomial_se
from sylva_ray.method.transfer import craft_transfer, transfer_label
from sylva_ray.method.wire import decode_state, encode_state

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TransferSource:
    """One model an attacker crafts on. ``attacker``: the participant who crafts (whose head the
    ``global`` source carries, whose model a ``peers`` source is; for ``public``, whose train split
    fits its head where the data has no public share)."""

    kind: str
    attacker: Optional[int] = None

    @property
    def label(self) -> str:
        return f"peer{self.attacker}" if self.kind == "peers" else self.kind


def plan_sources(
    kinds: Sequence[str], victim: int, participants: Sequence[int], has_global: bool
) -> list[TransferSource]:
    """The sources that attack ``victim``: the public model, the global model with the head of the
    next participant after the victim (the same attacker whoever runs the job), and every other
    participant's final model. ``global`` needs shared tensors (``local_at`` has none); every source
    but ``public`` needs another participant."""
    others = sorted(c for c in participants if c != victim)
    attacker = next((c for c in others if c > victim), others[0] if others else None)
    sources: list[TransferSource] = []
    if "public" in kinds:
        sources.append(TransferSource("public", attacker))
    if "global" in kinds and has_global and attacker is not None:
        sources.append(TransferSource("global", attacker))
    if "peers" in kinds:
        sources.extend(TransferSource("peers", c) for c in others)
    return sources


PERSONAL, TUNED, PARTICIPANTS = "personal", "tuned", "participants"


def needs_models(kinds: Sequence[str]) -> bool:
    """Whether the sources need the participants' final models (the public one needs none)."""
    return any(kind in kinds for kind in ("global", "peers"))


def encode_models(personal: Mapping[int, State], tuned: Optional[Mapping[int, bytes]] = None) -> bytes:
    """Every participant's final model on top of the broadcast adapter, as one payload: its personal
    tensors (Phase 1; none for full-model algorithms, whose one model is the adapter) and, after
    Phase 2, its tailored ones. Who the participants are is recorded apart from their tensors."""
    flat = {f"{PERSONAL}/{c}/{k}": v for c, state in personal.items() for k, v in state.items()}
    flat[PARTICIPANTS] = torch.tensor(sorted(personal), dtype=torch.int64)
    for client, payload in (tuned or {}).items():
        flat.update({f"{TUNED}/{client}/{k}": v for k, v in decode_state(payload).items()})
    return encode_state(flat)


@dataclass
class FinalModels:
    """``encode_models``' payload, decoded: per participant, its personal and its tailored tensors."""

    personal: dict[int, State]
    tuned: dict[int, State]

    def personal_of(self, client: int) -> State:
        """A participant's personal tensors (empty for full-model algorithms); an unknown client is a bug."""
        if client not in self.personal:
            raise KeyError(f"client {client} is not among the final models' participants {sorted(self.personal)}")
        return self.personal[client]


def decode_models(payload: bytes) -> FinalModels:
    decoded = decode_state(payload)
    participants = decoded.pop(PARTICIPANTS).tolist()
    models = FinalModels({int(c): {} for c in participants}, {})
    for key, tensor in decoded.items():
        part, client, name = key.split("/", 2)
        target = models.personal if part == PERSONAL else models.tuned
        target.setdefault(int(client), {})[name] = tensor
    return models


def craft_for_victim(
    cfg: ExperimentConfig,
    num_classes: int,
    device: torch.device,
    victim: int,
    sources: Sequence[TransferSource],
    build: Callable[[TransferSource], nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Adversarial images for the victim's attacked subset, by ``transfer_label``: each source's
    model comes from ``build`` (``ClientWorker.source_model``) and only it is differentiated."""
    crafted: dict[str, torch.Tensor] = {}
    for source in sources:
        model = build(source)
        seed = derive_seed(cfg.runtime.seed, "transfer", source.label, victim)
        for attack, adversarial in craft_transfer(
            model,
            cfg.evaluation.transfer_attacks,
            cfg.attack,
            images,
            labels,
            num_classes,
            cfg.train.eval_batch_size,
            seed,
            device,
        ).items():
            crafted[transfer_label(source.label, attack)] = adversarial
    return crafted


def transfer_rows(
    victim: int, sources: Sequence[TransferSource], result: EvalResult, details: Mapping[str, str]
) -> list[dict[str, Any]]:
    """``transfer.csv``'s rows for one victim: source, its kind and attacker, attack, samples,
    accuracy and its binomial standard error; ``source_detail`` says what the source model was."""
    by_label = {s.label: s for s in sources}
    rows = []
    for label, accuracy in (result.transfer_acc or {}).items():
        source_label, attack = label.split("|", 1)
        source = by_label[source_label]
        samples = result.num_robust
        rows.append(
            {
                "victim": victim,
                "source": source_label,
                "kind": source.kind,
                "attacker": source.attacker,
                "attack": attack,
                "samples": samples,
                "accuracy": accuracy,
                "se": binomial_se(accuracy, samples),
                "source_detail": details.get(source_label, ""),
            }
        )
    return rows
