"""Byzantine clients and robust aggregation: every rule against hand-computed answers, every
behaviour against its definition, and the federation's honest-only accounting."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from sylva_ray.base.config import AdversaryConfig, ConfigError, FederationConfig
from sylva_ray.engine.checkpoint import config_fingerprint, fingerprint_differences
from sylva_ray.engine.client import ClientState, ClientWorker
from sylva_ray.engine.federation import ADVERSARY_FILE, Federation
from sylva_ray.engine.jobs import Job, Outcome, WorkerInfo
from sylva_ray.engine.resolve import load_config
from sylva_ray.method.aggregation import aggregate
from sylva_ray.method.byzantine import (
    BEHAVIOURS,
    AttackContext,
    Behaviour,
    alie_z_max,
    craft_colluding_upload,
    craft_own_upload,
    flip_labels,
    malicious_clients,
    malicious_count,
)
from sylva_ray.method.data import load_source, make_partition
from sylva_ray.method.robust_aggregation import aggregation_problem
from sylva_ray.method.update_space import RoundContext, flatten_state, unflatten_like
from sylva_ray.method.wire import decode_state, encode_state

KEY_A, KEY_B = "blocks.0.lora_A.weight", "blocks.0.lora_B.weight"


def split(vector: Sequence[float]) -> dict[str, torch.Tensor]:
    """A 3-entry update as two tensors: A gets entries 0-1 (sorted first), B entry 2."""
    v = torch.tensor(vector, dtype=torch.float32)
    return {KEY_A: v[:2].reshape(1, 2).clone(), KEY_B: v[2:].reshape(1, 1).clone()}


REFERENCE = split([1.0, -2.0, 0.5])


def uploads(updates: Sequence[Sequence[float]]) -> list[dict[str, torch.Tensor]]:
    """Uploads = reference + update: the rules must take the reference back off."""
    ref = flatten_state(REFERENCE)
    return [split(ref + np.asarray(u)) for u in updates]


def aggregated_update(name: str, updates, cfg=None, f: int = 0, counts=None):
    cfg = cfg or FederationConfig()
    counts = counts or [1] * len(updates)
    state, weights = aggregate(name, uploads(updates), counts, cfg, RoundContext(REFERENCE, f, seed=3))
    return flatten_state(state) - flatten_state(REFERENCE), weights


# --- robust rules, by hand ------------------------------------------------------------------------
UPDATES = [[0.0, 1.0, 2.0], [1.0, 3.0, -1.0], [2.0, 2.0, 0.0], [10.0, -9.0, 7.0], [0.5, 1.5, 1.0]]


def test_median_by_hand():
    update, weights = aggregated_update("median", UPDATES)
    assert update == pytest.approx([1.0, 1.5, 1.0], abs=1e-6)  # per coordinate: the 3rd of 5 sorted values
    # client 1 is the middle in coordinate 0, client 4 in 1 and 2
    assert weights == pytest.approx([0, 1 / 3, 0, 0, 2 / 3])
    even, w_even = aggregated_update("median", UPDATES[:4])
    assert even == pytest.approx([1.5, 1.5, 1.0], abs=1e-6)  # mean of the two middles
    assert w_even.sum() == pytest.approx(1.0)


def test_trimmed_mean_by_hand():
    cfg = FederationConfig(trim_fraction=0.2)  # floor(0.2 x 5) = 1 dropped at each end
    update, weights = aggregated_update("trimmed_mean", UPDATES, cfg)
    assert update == pytest.approx([(0.5 + 1 + 2) / 3, (1 + 1.5 + 2) / 3, (0 + 1 + 2) / 3], abs=1e-6)
    assert weights.sum() == pytest.approx(1.0) and weights[3] == 0  # the outlier is trimmed everywhere


def _krum_by_hand(vectors: np.ndarray, f: int) -> np.ndarray:
    n = len(vectors)
    scores = []
    for i, x in enumerate(vectors):
        d = sorted(float(((x - y) ** 2).sum()) for j, y in enumerate(vectors) if j != i)
        scores.append(np.mean(d[: n - f - 1]))
    return np.asarray(scores)


def test_krum_and_multi_krum_by_hand():
    vectors = np.asarray(UPDATES)
    scores = _krum_by_hand(vectors, f=1)
    best = int(np.argmin(scores))
    update, weights = aggregated_update("krum", UPDATES, f=1)
    assert update == pytest.approx(vectors[best], abs=1e-6)
    assert weights.tolist() == [float(i == best) for i in range(5)]
    update, weights = aggregated_update("multi_krum", UPDATES, f=1)
    kept = np.argsort(scores)[:4]
    assert update == pytest.approx(vectors[kept].mean(axis=0), abs=1e-6)
    assert weights[3] == 0 and weights[kept] == pytest.approx([0.25] * 4)


def test_geometric_median_ignores_a_far_point():
    update, weights = aggregated_update("geometric_median", [[0, 0, 0], [0, 0, 0], [0, 0, 0], [30, 40, 0]])
    assert update == pytest.approx([0, 0, 0], abs=1e-4)
    assert weights[3] < 1e-4 and weights.sum() == pytest.approx(1.0)


def test_centered_clipping_by_hand():
    cfg = FederationConfig(cc_radius=1.0, cc_iterations=1)
    update, weights = aggregated_update("centered_clipping", [[3, 4, 0], [0, 1, 0]], cfg)
    assert update == pytest.approx([(0.6 + 0) / 2, (0.8 + 1) / 2, 0], abs=1e-6)  # [3,4] clipped to norm 1
    assert weights == pytest.approx([0.2 / 2, 1 / 2])
    twice, _ = aggregated_update(
        "centered_clipping", [[3, 4, 0], [0, 1, 0]], FederationConfig(cc_radius=1.0, cc_iterations=2)
    )
    v = np.array([0.3, 0.9, 0])
    step = [(np.array(x) - v) * min(1, 1 / np.linalg.norm(np.array(x) - v)) for x in ([3, 4, 0], [0, 1, 0])]
    assert twice == pytest.approx(v + np.mean(step, axis=0), abs=1e-6)


def test_clipping_pre_step_with_fedavg_and_the_median_radius():
    cfg = FederationConfig(pre_aggregation=["clipping"], clip_radius=1.0)
    update, weights = aggregated_update("fedavg", [[3, 4, 0], [0, 0.5, 0]], cfg, counts=[1, 3])
    assert update == pytest.approx(0.25 * np.array([0.6, 0.8, 0]) + 0.75 * np.array([0, 0.5, 0]), abs=1e-6)
    assert weights == pytest.approx([0.25, 0.75])
    # radius None: the median norm (of 5, 1 and 13 -> 5) clips only the longest
    update, _ = aggregated_update(
        "fedavg", [[3, 4, 0], [0, 1, 0], [5, 12, 0]], FederationConfig(pre_aggregation=["clipping"])
    )
    assert update == pytest.approx((np.array([3, 4, 0]) + [0, 1, 0] + np.array([5, 12, 0]) * 5 / 13) / 3, abs=1e-6)


def test_mixing_pre_steps_leave_no_per_client_weight_and_bucketing_is_seeded():
    cfg = FederationConfig(pre_aggregation=["bucketing"], bucket_size=2)
    first, weights = aggregated_update("median", UPDATES, cfg)
    again, _ = aggregated_update("median", UPDATES, cfg)
    assert np.isnan(weights).all() and first == pytest.approx(again)
    state_before = np.random.get_state()[1].copy()
    aggregated_update("median", UPDATES, cfg)  # bucketing shuffles with numpy's global generator...
    assert (np.random.get_state()[1] == state_before).all()  # ...seeded for the block, then restored
    other, _ = aggregate("median", uploads(UPDATES), [1] * 5, cfg, RoundContext(REFERENCE, 0, seed=4))
    assert not np.allclose(flatten_state(other) - flatten_state(REFERENCE), first)  # another seed, other buckets
    assert np.isnan(aggregated_update("krum", UPDATES, FederationConfig(pre_aggregation=["nnm"]), f=1)[1]).all()


def test_aggregation_problem_counts_what_is_left_after_bucketing():
    krum = FederationConfig(pre_aggregation=["bucketing"], bucket_size=2)
    assert aggregation_problem("krum", FederationConfig(), 3, 9) is None  # 9 > 2 x 3 + 2
    assert "gets n = 5 (after bucketing by 2)" in aggregation_problem("krum", krum, 3, 9)
    assert aggregation_problem("median", krum, 3, 9) is None
    assert "nnm needs more than f = 3" in aggregation_problem("median", FederationConfig(pre_aggregation=["nnm"]), 3, 3)


@pytest.mark.parametrize(
    "name", ["median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "centered_clipping"]
)
def test_every_robust_rule_keeps_keys_shapes_and_dtypes(name):
    states = uploads(UPDATES)
    states = [{k: v.to(torch.bfloat16) if k == KEY_B else v for k, v in s.items()} for s in states]
    merged, _ = aggregate(name, states, [1] * 5, FederationConfig(), RoundContext(REFERENCE, 1))
    assert {k: (v.shape, v.dtype) for k, v in merged.items()} == {k: (v.shape, v.dtype) for k, v in states[0].items()}


def test_unflatten_inverts_flatten():
    state = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([7.0], dtype=torch.float16)}
    back = unflatten_like(flatten_state(state), state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    with pytest.raises(ValueError, match="entries"):
        unflatten_like(np.zeros(3), state)


# --- behaviours, by definition ---------------------------------------------------------------------
CONTEXT = AttackContext(participants=10, colluders=3, num_clients=10, seed=11)
OWN_UPDATE = np.array([0.5, -1.0, 2.0])


def own(behaviour: str, **fields) -> np.ndarray:
    cfg = AdversaryConfig(behaviour=behaviour, fraction=0.3, **fields)
    crafted = craft_own_upload(uploads([OWN_UPDATE])[0], REFERENCE, cfg, CONTEXT)
    assert {k: v.shape for k, v in crafted.items()} == {k: v.shape for k, v in REFERENCE.items()}
    return flatten_state(crafted) - flatten_state(REFERENCE)


def test_own_update_behaviours():
    assert own("sign_flip") == pytest.approx(-OWN_UPDATE, abs=1e-6)
    assert own("sign_flip", flip_scale=4.0) == pytest.approx(-4 * OWN_UPDATE, abs=1e-5)
    assert own("scale", boost=3.0) == pytest.approx(3 * OWN_UPDATE, abs=1e-5)
    assert own("scale") == pytest.approx(10 * OWN_UPDATE, abs=1e-5)  # model replacement: x num_clients
    assert own("free_rider") == pytest.approx(np.zeros(3), abs=1e-7)
    noise = own("gaussian", noise_mean=5.0, noise_std=0.0)
    assert noise == pytest.approx([5.0] * 3, abs=1e-5)
    first, second = own("gaussian"), own("gaussian")
    assert first == pytest.approx(second) and not np.allclose(first, OWN_UPDATE)  # seeded by the context


def test_gaussian_noise_has_the_configured_moments():
    cfg = AdversaryConfig(behaviour="gaussian", fraction=0.3, noise_mean=1.0, noise_std=2.0)
    big = {KEY_A: torch.zeros(1, 40_000)}
    crafted = craft_own_upload(big, big, cfg, CONTEXT)[KEY_A].double()
    assert float(crafted.mean()) == pytest.approx(1.0, abs=0.05) and float(crafted.std()) == pytest.approx(
        2.0, abs=0.05
    )


HONEST = np.array([[1.0, 0.0, 2.0], [3.0, 2.0, 2.0], [2.0, 4.0, 5.0]])


def colluding(behaviour: str, **fields) -> np.ndarray:
    cfg = AdversaryConfig(behaviour=behaviour, fraction=0.3, **fields)
    crafted = craft_colluding_upload(uploads(HONEST), REFERENCE, cfg, CONTEXT)
    return flatten_state(crafted) - flatten_state(REFERENCE)


def test_alie_and_ipm_by_definition():
    mean, std = HONEST.mean(axis=0), HONEST.std(axis=0, ddof=1)
    assert colluding("alie", alie_tau=1.5) == pytest.approx(mean + 1.5 * std, abs=1e-5)
    # the paper's z_max: n = 10, f = 3 -> s = floor(6) - 3 = 3, z = Phi^-1(7/10)
    assert alie_z_max(10, 3) == pytest.approx(norm.ppf(0.7))
    assert colluding("alie") == pytest.approx(mean + norm.ppf(0.7) * std, abs=1e-5)
    assert colluding("ipm", ipm_tau=0.5) == pytest.approx(-0.5 * mean, abs=1e-6)
    # half the round or more colluding: s <= 0 would make z infinite; it stays finite (one supporter)
    assert alie_z_max(10, 6) == pytest.approx(norm.ppf(0.9)) and np.isfinite(alie_z_max(3, 2))


def test_label_flip_and_the_registry_kinds():
    assert flip_labels(np.array([0, 1, 9]), 10).tolist() == [9, 8, 0]
    kinds = {name: BEHAVIOURS.get(name).kind for name in BEHAVIOURS.names()}
    assert kinds == {
        "alie": "colluding",
        "free_rider": "own",
        "gaussian": "own",
        "ipm": "colluding",
        "label_flip": "data",
        "scale": "own",
        "sign_flip": "own",
    }
    with pytest.raises(ValueError, match="colluding"):
        craft_own_upload(REFERENCE, REFERENCE, AdversaryConfig(behaviour="alie"), CONTEXT)


def test_the_malicious_set_is_seeded_nested_and_rounded_half_up():
    assert malicious_count(10, 0.25) == 3 and malicious_count(10, 0.0) == 0 and malicious_count(4, 0.3) == 1
    small, large = malicious_clients(10, 0.1, 5), malicious_clients(10, 0.3, 5)
    assert len(small) == 1 and len(large) == 3 and set(small) <= set(large)
    assert malicious_clients(10, 0.3, 5) == large  # a function of (clients, fraction, seed) alone
    assert len({tuple(malicious_clients(10, 0.3, s)) for s in range(6)}) > 1  # the seed picks the set


# --- the federation: what travels, who is counted --------------------------------------------------
NUM_CLIENTS = 6


class HonestExecutor:
    """Every client uploads reference + (client + 1) x ones; records the jobs' malicious flags."""

    def __init__(self) -> None:
        self.flags: list[dict[int, bool]] = []

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            initial_adapter={k: v.clone() for k, v in REFERENCE.items()},
            initial_personal={"head.weight": torch.zeros(1)},
            full_model_bytes=10_000,
            majority_rates={c: 0.5 for c in range(NUM_CLIENTS)},
            num_train={c: 10 for c in range(NUM_CLIENTS)},
        )

    def train(self, jobs: Sequence[Job], global_payload: bytes, round_index: int) -> list[Outcome]:
        self.flags.append({job.client_id: job.malicious for job in jobs})
        received = flatten_state(decode_state(global_payload))
        return [
            Outcome(
                job.client_id,
                upload=encode_state(split(received + (job.client_id + 1))),
                state=ClientState(personal={"head.weight": torch.zeros(1)}, rounds_trained=1),
                num_samples=10,
                metrics={"train_loss": 1.0},
            )
            for job in jobs
        ]

    def evaluate(self, jobs: Sequence[Job], adapter_payload: bytes) -> list[Outcome]:
        # malicious clients' own models score 0.1, honest ones 0.9: the summary must not mix them
        return [
            Outcome(
                job.client_id,
                metrics={
                    "clean_acc": 0.1 if job.client_id in self.malicious else 0.9,
                    "robust_acc": 0.05 if job.client_id in self.malicious else 0.6,
                    "num_clean": 10,
                    "num_robust": 10,
                    "clean_on_robust": 0.1 if job.client_id in self.malicious else 0.9,
                },
            )
            for job in jobs
        ]

    malicious: frozenset[int] = frozenset()
    gpu_peak_mb: dict = {}

    def coalitions(self, jobs, adapter_payload, on_done=None):
        raise AssertionError("no layer game here")

    tailor = protocol = coalitions

    def shutdown(self) -> None:
        pass


def _config(*overrides: str):
    return load_config(
        "smoke",
        overrides=[
            f"data.num_clients={NUM_CLIENTS}",
            "federation.rounds=2",
            "layer_selection.enabled=false",
            "evaluation.global_test=false",
            "system.clock=false",  # the fake executor counts no FLOPs (the clock: test_clock.py)
            *overrides,
        ],
    )


def test_colluders_upload_the_alie_vector_and_the_summary_counts_honest_clients_only(tmp_path):
    cfg = _config(
        "adversary.fraction=0.34",
        "adversary.behaviour=alie",
        "adversary.alie_tau=1.0",
        "adversary.start_round=1",
        "federation.aggregation=fedavg",
    )
    executor = HonestExecutor()
    executor.malicious = frozenset(malicious_clients(NUM_CLIENTS, 0.34, cfg.runtime.seed))
    federation = Federation(cfg, tmp_path, executor)
    assert len(executor.malicious) == 2
    record = json.loads((tmp_path / ADVERSARY_FILE).read_text())
    assert record["clients"] == sorted(executor.malicious) and record["behaviour"] == "alie"

    federation.run_round()  # round 0: before start_round nobody attacks
    assert not any(executor.flags[0].values())
    start = flatten_state(federation.state.global_adapter)
    assert start - flatten_state(REFERENCE) == pytest.approx([3.5] * 3)  # mean of 1..6
    federation.run_round()
    assert executor.flags[1] == {c: c in executor.malicious for c in range(NUM_CLIENTS)}
    honest = np.array([c + 1 for c in range(NUM_CLIENTS) if c not in executor.malicious], dtype=float)
    crafted = honest.mean() + 1.0 * honest.std(ddof=1)  # every coordinate of every honest update is c + 1
    expected = (honest.sum() + len(executor.malicious) * crafted) / NUM_CLIENTS
    assert flatten_state(federation.state.global_adapter) - start == pytest.approx([expected] * 3, abs=1e-5)

    metrics = pd.read_csv(tmp_path / "metrics.csv")
    second = metrics[metrics["round"] == 1]
    assert second["bytes_up"].nunique() == 1  # a crafted upload is counted as sent, the size of an honest one
    assert metrics.set_index(["round", "client"])["malicious"].xs(1).to_dict() == {
        c: c in executor.malicious for c in range(NUM_CLIENTS)
    }
    summary = federation.finish()
    assert summary["final"]["clean_acc"] == pytest.approx(0.9) and summary["phase1"]["robust_acc"] == pytest.approx(0.6)
    assert summary["malicious_clients"]["clean_acc"] == pytest.approx(0.1)
    assert summary["adversary"]["clients"] == sorted(executor.malicious) and summary["adversary"]["honest"] == 4
    assert {r["client"]: r["malicious"] for r in summary["per_client"]} == {
        c: c in executor.malicious for c in range(NUM_CLIENTS)
    }


def test_krum_records_its_selection_and_none_after_mixing(tmp_path):
    cfg = _config("federation.aggregation=krum", "federation.byzantine_f=1")
    federation = Federation(cfg, tmp_path / "plain", HonestExecutor())
    federation.run_round()
    rows = pd.read_csv(tmp_path / "plain" / "metrics.csv")
    assert rows["agg_selected"].sum() == 1 and rows.loc[rows["agg_selected"], "agg_weight"].tolist() == [1.0]
    assert not rows["malicious"].any()
    mixed = _config("federation.aggregation=krum", "federation.byzantine_f=0", "federation.pre_aggregation=[bucketing]")
    Federation(mixed, tmp_path / "mixed", HonestExecutor()).run_round()
    rows = pd.read_csv(tmp_path / "mixed" / "metrics.csv")
    assert rows["agg_selected"].isna().all() and rows["agg_weight"].isna().all()  # no client's own weight


def test_a_checkpoint_from_before_the_adversary_resumes_when_the_new_fields_are_at_their_defaults():
    current = config_fingerprint(_config())
    saved = {k: v for k, v in current.items() if not k.startswith("adversary.")}
    assert fingerprint_differences(saved, current) == []
    attacked = config_fingerprint(_config("adversary.fraction=0.5"))
    assert fingerprint_differences(saved, attacked) == [
        "adversary.fraction: None when the checkpoint was made, 0.5 now"
    ]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["federation.aggregation=krum", "adversary.fraction=0.5"], "krum needs n > 2f \\+ 2"),
        (
            ["federation.aggregation=multi_krum", "federation.byzantine_f=2"],
            "multi_krum needs n > 2f \\+ 2 updates \\(f = 2\\) and gets n = 6",
        ),
        (["adversary.fraction=0.05"], "rounds to 0"),
        (["adversary.behaviour=backdoor"], "adversary.behaviour"),
        (["federation.pre_aggregation=[clipping, clipping]"], "twice"),
        (["federation.pre_aggregation=[nnm]"], "sample counts"),
        (["federation.pre_aggregation=[sparsify]"], "pre_aggregation entry"),
        (["algorithm.name=local_at", "adversary.fraction=0.2"], "shares"),
        (["adversary.fraction=0.95"], "all 6 clients would be malicious"),
        (["adversary.fraction=0.5", "adversary.start_round=2"], "would never attack"),
        (
            ["federation.aggregation=krum", "federation.byzantine_f=1", "federation.pre_aggregation=[bucketing]"],
            "after bucketing",
        ),
    ],
)
def test_impossible_threats_and_rules_are_refused_before_work(overrides, named):
    with pytest.raises(ConfigError, match=named):
        _config(*overrides)


# --- a real worker: the malicious upload is its behaviour applied to what honest training gives --
def _worker(algorithm: str, behaviour: str) -> ClientWorker:
    cfg = load_config(
        "smoke",
        overrides=[
            "model.pretrained=none",  # shapes and training are what matter here, not pre-training
            f"algorithm.name={algorithm}",
            "train.local_steps=2",
            f"adversary.behaviour={behaviour}",
            "adversary.fraction=0.25",
            "adversary.flip_scale=2.0",
        ],
    )
    source = load_source(cfg.data)
    return ClientWorker(cfg, source, make_partition(source, cfg.data, 0))


@pytest.mark.parametrize(
    "algorithm", ["sylva", "fat"]
)  # the LoRA adapter, and the whole model for full-model baselines
def test_a_real_malicious_upload_is_its_behaviour_of_the_honest_update(algorithm):
    worker = _worker(algorithm, "sign_flip")
    start = worker.initial_adapter
    honest = worker.train(0, worker.initial_state(), start, 0).adapter
    attacked = worker.train(0, worker.initial_state(), start, 0, malicious=True).adapter
    assert sorted(attacked) == sorted(honest) and all(attacked[k].dtype == honest[k].dtype for k in honest)
    update = flatten_state(honest) - flatten_state(start)
    assert np.abs(update).max() > 0  # training moved something
    assert flatten_state(attacked) - flatten_state(start) == pytest.approx(-2.0 * update, abs=1e-5)


def test_a_label_flipping_client_trains_on_flipped_labels_and_keeps_its_data():
    worker = _worker("sylva", "label_flip")
    labels = worker.data(0).train.labels.copy()
    start = worker.initial_adapter
    honest = worker.train(0, worker.initial_state(), start, 0)
    flipped = worker.train(0, worker.initial_state(), start, 0, malicious=True)
    assert not np.allclose(flatten_state(flipped.adapter), flatten_state(honest.adapter))
    assert (worker.data(0).train.labels == labels).all()  # the client's own split is untouched


def test_label_flipping_is_a_data_hook_that_keeps_the_images():
    """The hook gives what the client used to build by hand: the same images, labels C - 1 - y."""
    from sylva_ray.method.data import ArrayDataset

    data = ArrayDataset(np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2), np.array([0, 3]), 4, 255.0)
    poisoned = BEHAVIOURS.get("label_flip").poison(data, AdversaryConfig(behaviour="label_flip"), CONTEXT)
    assert poisoned.images is data.images and poisoned.labels.tolist() == [3, 0]
    assert poisoned.labels.dtype == data.labels.dtype
    assert (poisoned.num_classes, poisoned.pixel_scale) == (data.num_classes, data.pixel_scale)
    with pytest.raises(ValueError, match="a data behaviour needs its poison function"):
        Behaviour("data")
    with pytest.raises(ValueError, match="kind is one of"):
        Behaviour("sideways", craft=lambda updates, cfg, context: updates)


def test_a_new_data_poisoning_behaviour_needs_no_engine_edit(monkeypatch):
    """A registered ``poison`` hook is what a malicious client trains on: here, half its split."""
    monkeypatch.setattr(BEHAVIOURS, "_items", dict(BEHAVIOURS._items))

    def first_half(data, cfg, context):
        return data.subset(np.arange(len(data) // 2))

    BEHAVIOURS.add("first_half", Behaviour("data", poison=first_half))
    worker = _worker("sylva", "first_half")
    size = len(worker.data(0).train)
    start = worker.initial_adapter
    assert worker.train(0, worker.initial_state(), start, 0).num_samples == size
    assert worker.train(0, worker.initial_state(), start, 0, malicious=True).num_samples == size // 2
