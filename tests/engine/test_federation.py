"""Phase 1's round loop on a fake executor: no Ray, no model, every number known in advance.

The fake answers jobs in *reverse* client order and can fail chosen (round, client) pairs, so the
loop's own duties are what is checked: seeded sampling, ordering by client id, the aggregation
call (FedAvg by sample counts, computed here by hand), drops, bytes, and the checkpoint rows.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import pytest
import torch

from sylva_ray.base.config import ConfigError
from sylva_ray.engine.checkpoint import FederationState, check_resumable
from sylva_ray.engine.client import ClientState
from sylva_ray.engine.federation import Federation, sample_participants
from sylva_ray.engine.jobs import Job, Outcome, WorkerInfo
from sylva_ray.engine.resolve import load_config
from sylva_ray.engine.rundir import CHECKPOINT_NAME
from sylva_ray.method.aggregation import AGGREGATORS, aggregate_fedavg
from sylva_ray.method.wire import decode_state, encode_state

NUM_CLIENTS = 6
KEY = "lora_A.weight"


def upload_of(client: int, round_index: int) -> dict[str, torch.Tensor]:
    """What client ``c`` uploads in round ``r``: a 2x2 tensor filled with 10 r + c."""
    return {KEY: torch.full((2, 2), 10.0 * round_index + client)}


def samples_of(client: int) -> int:
    return client + 1


#: The clients whose uploads each aggregation call received, in the order received.
AGGREGATED: list[list[int]] = []
RECORDING = "recording_fedavg"


def recording_fedavg(states, num_samples, cfg, context):
    """FedAvg that notes whose uploads it got (an upload's value is 10 r + c, and c < 10)."""
    AGGREGATED.append([int(round(float(s[KEY][0, 0]))) % 10 for s in states])
    return aggregate_fedavg(states, num_samples, cfg, context)


class FakeExecutor:
    """Answers every job at once, in reverse client order; ``failures`` are (round, client) pairs."""

    def __init__(self, failures: Sequence[tuple[int, int]] = ()) -> None:
        self.failures = set(failures)
        self.trained: list[list[int]] = []
        self.received: list[dict[str, torch.Tensor]] = []

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            initial_adapter={KEY: torch.zeros(2, 2)},
            initial_personal={"head.weight": torch.zeros(1)},
            full_model_bytes=10_000,
            majority_rates={c: 0.5 for c in range(NUM_CLIENTS)},
            num_train={c: samples_of(c) for c in range(NUM_CLIENTS)},
        )

    def train(self, jobs: Sequence[Job], global_payload: bytes, round_index: int) -> list[Outcome]:
        self.trained.append([job.client_id for job in jobs])
        self.received.append(decode_state(global_payload))
        outcomes = []
        for job in reversed(jobs):
            if (round_index, job.client_id) in self.failures:
                outcomes.append(Outcome(job.client_id, attempts=2, error="RuntimeError: injected"))
                continue
            state = ClientState(
                personal={"head.weight": torch.full((1,), float(job.client_id))},
                rounds_trained=job.state.rounds_trained + 1,
            )
            outcomes.append(
                Outcome(
                    job.client_id,
                    upload=encode_state(upload_of(job.client_id, round_index)),
                    state=state,
                    num_samples=samples_of(job.client_id),
                    metrics={"train_loss": float(job.client_id)},
                )
            )
        return outcomes

    def evaluate(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        return [
            Outcome(
                job.client_id,
                metrics={
                    "clean_acc": 0.8,
                    "robust_acc": 0.4,
                    "num_clean": 10,
                    "num_robust": 10,
                    "clean_on_robust": 0.8,
                },
            )
            for job in reversed(jobs)
        ]

    def coalitions(self, jobs: Sequence[Job], adapter_payload: bytes, on_done=None) -> list[Outcome]:
        raise AssertionError("Phase 1 plays no layer game")

    tailor = protocol = coalitions

    def shutdown(self) -> None:
        pass


@pytest.fixture
def cfg(monkeypatch):
    # Registered for this test only (the registry's entries come back at teardown): a registration at
    # import would leak into the parametrized "every registered aggregator" tests collected later.
    monkeypatch.setattr(AGGREGATORS, "_items", dict(AGGREGATORS._items))
    AGGREGATORS.register(RECORDING)(recording_fedavg)
    return load_config(
        "smoke",
        overrides=[
            f"data.num_clients={NUM_CLIENTS}",
            "federation.rounds=3",
            "federation.participation=0.5",
            f"federation.aggregation={RECORDING}",
            "layer_selection.enabled=false",
            "system.clock=false",  # the fake executor counts no FLOPs (the clock: test_clock.py)
        ],
    )


def by_hand(clients: list[int], round_index: int) -> torch.Tensor:
    """Sample-weighted FedAvg of the uploads, in the test's own arithmetic."""
    total = sum(samples_of(c) for c in clients)
    return sum(samples_of(c) / total * upload_of(c, round_index)[KEY] for c in clients)


def test_rounds_sample_order_aggregate_and_checkpoint(cfg, tmp_path):
    failures = [
        (1, sample_participants(NUM_CLIENTS, 0.5, cfg.runtime.seed, 1)[0]),
        (2, sample_participants(NUM_CLIENTS, 0.5, cfg.runtime.seed, 2)[-1]),
    ]
    executor = FakeExecutor(failures)
    AGGREGATED.clear()
    federation = Federation(cfg, tmp_path, executor)
    while not federation.done:
        federation.run_round()

    for r, clients in enumerate(executor.trained):
        sampled = sample_participants(NUM_CLIENTS, 0.5, cfg.runtime.seed, r)  # seeded, sorted by id
        assert clients == sorted(sampled, key=lambda c: (-samples_of(c), c))  # handed out largest first
        assert len(clients) == NUM_CLIENTS // 2
    assert torch.equal(executor.received[0][KEY], torch.zeros(2, 2))  # round 1 starts from the initial adapter

    metrics = pd.read_csv(tmp_path / "metrics.csv")
    for r in range(3):
        rows = metrics[metrics["round"] == r]
        assert list(rows["client"]) == sorted(rows["client"])  # rows in client order, whatever the finishing order
        kept = [c for c in sorted(executor.trained[r]) if (r, c) not in executor.failures]
        assert AGGREGATED[r] == kept  # the aggregator gets the uploads in client-id order, drops left out
        expected = by_hand(kept, r)
        # The adapter each round sends is the previous round's aggregate, computed here by hand.
        sent_next = executor.received[r + 1][KEY] if r + 1 < 3 else federation.state.global_adapter[KEY]
        assert torch.allclose(sent_next, expected, atol=1e-6), r
        trained = rows[rows["participated"]]
        assert list(trained[~trained["dropped"].astype(bool)]["client"]) == kept
        weights = trained.set_index("client")["agg_weight"].dropna()
        assert weights.to_dict() == pytest.approx({c: samples_of(c) / sum(samples_of(k) for k in kept) for c in kept})

    dropped = metrics[metrics["dropped"].fillna(False).astype(bool)]
    assert [(int(r), int(c)) for r, c in zip(dropped["round"], dropped["client"])] == sorted(executor.failures)
    assert set(dropped["error"]) == {"RuntimeError: injected"} and (dropped["bytes_up"] == 0).all()
    assert (metrics[metrics["participated"]]["bytes_down"] == len(encode_state({KEY: torch.zeros(2, 2)}))).all()

    state = FederationState.load(tmp_path / "checkpoints" / CHECKPOINT_NAME)
    assert state.next_round == 3 and pd.DataFrame(state.rows).shape[0] == len(metrics)
    assert state.bytes_up == int(metrics["bytes_up"].sum())
    participated = {c for clients in executor.trained for c in clients}
    assert {c for c, s in state.client_states.items() if s.rounds_trained} <= participated
    assert len(pd.read_csv(tmp_path / "rounds.csv")) == 3


def test_a_round_where_everyone_drops_keeps_the_global_adapter(cfg, tmp_path):
    executor = FakeExecutor(failures=[(0, c) for c in range(NUM_CLIENTS)])
    federation = Federation(cfg, tmp_path, executor)
    summary = federation.run_round()
    assert summary["dropped"] == NUM_CLIENTS // 2
    assert torch.equal(federation.state.global_adapter[KEY], torch.zeros(2, 2))


def test_resume_continues_at_the_checkpointed_round_from_one_read_of_the_checkpoint(cfg, tmp_path, monkeypatch):
    first = Federation(cfg, tmp_path, FakeExecutor())
    first.run_round()
    reads = []
    real_load = FederationState.load.__func__
    monkeypatch.setattr(
        FederationState, "load", classmethod(lambda cls, path: reads.append(path) or real_load(cls, path))
    )
    state = check_resumable(tmp_path, cfg)
    again = Federation(cfg, tmp_path, FakeExecutor(), state=state)
    assert len(reads) == 1  # the resume check's read is the one the federation continues from
    assert again.state.next_round == 1 and torch.equal(again.state.global_adapter[KEY], first.state.global_adapter[KEY])
    again.run_round()
    assert list(pd.read_csv(tmp_path / "rounds.csv")["round"]) == [0, 1]


def test_a_checkpoint_without_every_field_is_refused_as_damaged(cfg, tmp_path):
    Federation(cfg, tmp_path, FakeExecutor()).run_round()
    path = tmp_path / "checkpoints" / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    del payload["personal"]
    torch.save(payload, path)
    with pytest.raises(ConfigError, match="checkpoint .*personal"):
        check_resumable(tmp_path, cfg)
