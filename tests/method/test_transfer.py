"""Transfer attacks: crafted on a source, scored on the victim (docs explanation/threat-model.md).

Unit level on small models trained here on real digits: self-transfer is the white-box attack, the
victim is never differentiated, the strongest figure is never above any one attack's, the masking
rule fires on a model built to mask gradients and not on a normal one. End to end:
``tests/e2e/test_transfer_runs.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from sylva_ray.base.config import AttackConfig, ConfigError, EvaluationConfig
from sylva_ray.engine.resolve import load_config
from sylva_ray.engine.transfer import TransferSource, decode_models, encode_models, plan_sources, transfer_rows
from sylva_ray.engine.transfer_report import victim_figures
from sylva_ray.method.data import ArrayDataset
from sylva_ray.method.evaluation import evaluate
from sylva_ray.method.sanity import transfer_warnings
from sylva_ray.method.transfer import craft_transfer, fit_linear_head, transfer_label, worst_transfer

CPU = torch.device("cpu")
ATTACK = AttackConfig(eps=0.1, eval_steps=10)
BATCH = 64
#: The protocol without the costly parts: PGD, and the transfer attacks given to ``evaluate``.
PLAIN = EvaluationConfig(autoattack=False, sanity_checks=False, transfer=["peers"])


def _digits() -> ArrayDataset:
    bunch = load_digits()
    images = (bunch.images[:, None] / 16.0).astype(np.float32)
    return ArrayDataset(images, bunch.target.astype(np.int64), 10)


def _trained_mlp(data: ArrayDataset, seed: int, steps: int = 300) -> nn.Module:
    """A small classifier of 8x8 digits, trained here in a second (seeded)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.pixels(), torch.from_numpy(data.labels)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


class _NoGradient(torch.autograd.Function):
    """Identity forward, zero backward: a model behind it masks its gradients completely."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return torch.zeros_like(grad)


class _Masked(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(_NoGradient.apply(x))


@pytest.fixture(scope="module")
def digits_models():
    data = _digits()
    train, test = data.subset(np.arange(0, 1400)), data.subset(np.arange(1400, 1797))
    return test, _trained_mlp(train, seed=0), _trained_mlp(train, seed=1)


def _crafted(source, test, attacks, seed):
    images, labels = test.pixels(), torch.from_numpy(test.labels)
    return craft_transfer(source, attacks, ATTACK, images, labels, 10, BATCH, seed, CPU)


@pytest.mark.parametrize("attack", ["pgd", "mifgsm"])
def test_transfer_from_a_model_to_itself_is_the_white_box_attack(digits_models, attack):
    test, model, _ = digits_models
    seed = 1234
    whitebox = evaluate(model, test, dataclasses.replace(ATTACK, eval_attack=attack), BATCH, seed, CPU, PLAIN)
    crafted = _crafted(model, test, [attack], seed)
    scored = evaluate(model, test, ATTACK, BATCH, seed, CPU, PLAIN, transfer={"self|" + attack: crafted[attack]})
    assert scored.transfer_acc["self|" + attack] == whitebox.robust_acc
    assert whitebox.robust_acc < whitebox.clean_acc  # the attack attacks: the equality is not trivial


def _counting_backward(model: nn.Module) -> list[int]:
    """Counts backward passes through ``model`` (an attack differentiates it with respect to its input)."""
    calls = [0]
    model.register_full_backward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_victim_is_never_differentiated_by_a_transfer_attack(digits_models):
    test, victim, source = digits_models
    victim_calls, source_calls = _counting_backward(victim), _counting_backward(source)
    crafted = _crafted(source, test, ["pgd", "mifgsm"], seed=7)
    assert victim_calls[0] == 0 and source_calls[0] > 0  # crafting sees only the source
    before = victim_calls[0]
    evaluate(victim, test, ATTACK, BATCH, 7, CPU, PLAIN)
    whitebox_only = victim_calls[0] - before
    before = victim_calls[0]
    result = evaluate(victim, test, ATTACK, BATCH, 7, CPU, PLAIN, transfer={f"s|{k}": v for k, v in crafted.items()})
    assert victim_calls[0] - before == whitebox_only  # scoring the transfer images adds no backward pass
    # and what was crafted does not depend on who is scored
    again = _crafted(source, test, ["pgd", "mifgsm"], seed=7)
    assert all(torch.equal(crafted[k], again[k]) for k in crafted)
    assert set(result.transfer_acc) == {"s|pgd", "s|mifgsm"}


def test_the_strongest_figure_is_never_above_any_single_attack(digits_models):
    test, victim, source = digits_models
    crafted = {f"s|{k}": v for k, v in _crafted(source, test, ["pgd", "mifgsm"], seed=3).items()}
    protocol = EvaluationConfig(autoattack=False, sanity_checks=True, sanity_samples=64, transfer=["peers"])
    result = evaluate(victim, test, ATTACK, BATCH, 3, CPU, protocol, transfer=crafted)
    everything = [result.robust_acc, *result.transfer_acc.values()]
    assert result.strongest_attack_acc <= min(everything)
    assert result.strongest_attack_acc <= result.strongest_whitebox_acc <= result.robust_acc
    assert result.num_strongest == len(test)
    assert "transfer_acc" not in result.as_dict()  # a table of its own, not a scalar figure


def _rows(victim_model, source_model, test, clients=4, victims=None):
    """Per-client rows and transfer rows for ``clients`` shares of the test set, as a run writes them
    (``victims``: a victim model per client, else ``victim_model`` for all)."""
    rows, transfer = [], []
    for client, share in enumerate(np.array_split(np.arange(len(test)), clients)):
        data = test.subset(share)
        victim_model = victims[client] if victims else victim_model
        crafted = _crafted(source_model, data, ["pgd", "mifgsm"], seed=client)
        result = evaluate(
            victim_model,
            data,
            ATTACK,
            BATCH,
            client,
            CPU,
            PLAIN,
            transfer={transfer_label("peer9", k): v for k, v in crafted.items()},
        )
        rows.append({"client": client, **result.as_dict()})
        transfer += transfer_rows(client, [TransferSource("peers", 9)], result, {})
    return rows, transfer


def test_the_masking_rule_fires_on_a_masked_model_and_is_silent_on_a_normal_one(digits_models, caplog):
    test, model, other = digits_models
    masked_rows, masked_transfer = _rows(_Masked(model), model, test)
    fired = transfer_warnings(masked_rows, masked_transfer, PLAIN, "masked")
    assert fired and "clients [0, 1, 2, 3]" in fired[0] and "SANITY CHECK FAILED" in caplog.text
    normal_rows, normal_transfer = _rows(model, other, test)
    assert transfer_warnings(normal_rows, normal_transfer, PLAIN, "normal") == []
    # one masked client among eight is named by itself, though the pooled figures barely move
    victims = [_Masked(model)] + [model] * 7
    rows, transfer = _rows(None, other, test, clients=8, victims=victims)
    one = transfer_warnings(rows, transfer, PLAIN, "one masked")
    assert len(one) == 2  # pgd and mifgsm: each names client 0 and nobody else
    assert all("client 0:" in w or "clients [0] most" in w for w in one)


def test_plan_sources_names_one_attacker_per_victim_and_skips_what_cannot_exist():
    sources = plan_sources(["public", "global", "peers"], victim=2, participants=[0, 1, 2, 3], has_global=True)
    assert [s.label for s in sources] == ["public", "global", "peer0", "peer1", "peer3"]
    assert sources[1].attacker == 3  # the next participant after the victim
    last = plan_sources(["global"], victim=3, participants=[0, 1, 2, 3], has_global=True)
    assert last[0].attacker == 0  # ... cyclically
    assert [s.kind for s in plan_sources(["public", "global"], 0, [0, 1], has_global=False)] == ["public"]
    assert plan_sources(["global", "peers"], 0, [0], has_global=True) == []  # no other participant


def test_final_models_round_trip_through_one_payload():
    personal = {0: {"head.weight": torch.ones(2, 3)}, 5: {"head.weight": torch.zeros(2, 3)}}
    from sylva_ray.method.wire import encode_state

    tuned = {5: encode_state({"blocks.0.weight": torch.full((2,), 3.0)})}
    models = decode_models(encode_models(personal, tuned))
    assert torch.equal(models.personal[5]["head.weight"], personal[5]["head.weight"])
    assert torch.equal(models.tuned[5]["blocks.0.weight"], torch.full((2,), 3.0)) and 0 not in models.tuned
    # full-model algorithms have no personal tensors: the participants are known all the same
    full = decode_models(encode_models({0: {}, 1: {}}))
    assert full.personal_of(1) == {} and sorted(full.personal) == [0, 1]
    with pytest.raises(KeyError, match="client 7"):
        full.personal_of(7)


def test_victim_figures_take_each_sources_stronger_attack_and_name_the_worst():
    rows = [
        {"source": "public", "kind": "public", "attack": "pgd", "accuracy": 0.8, "samples": 10},
        {"source": "public", "kind": "public", "attack": "mifgsm", "accuracy": 0.7, "samples": 10},
        {"source": "peer1", "kind": "peers", "attack": "pgd", "accuracy": 0.5, "samples": 10},
        {"source": "peer1", "kind": "peers", "attack": "mifgsm", "accuracy": 0.6, "samples": 10},
        {"source": "peer2", "kind": "peers", "attack": "pgd", "accuracy": 0.9, "samples": 10},
        {"source": "peer2", "kind": "peers", "attack": "mifgsm", "accuracy": 0.7, "samples": 10},
    ]
    figures = victim_figures(rows)
    assert figures["transfer_public_acc"] == pytest.approx(0.7)
    assert figures["transfer_peers_acc"] == pytest.approx(0.6)  # mean of peer1's 0.5 and peer2's 0.7
    assert figures["transfer_worst_peer_acc"] == pytest.approx(0.5)
    assert (figures["transfer_worst_source"], figures["transfer_worst_acc"]) == ("peer1|pgd", 0.5)
    assert worst_transfer({"a|pgd": 0.4, "b|pgd": 0.3}) == ("b|pgd", 0.3)
    assert victim_figures([]) == {}


def test_a_linear_head_fit_on_frozen_features_classifies_them(digits_models):
    test, model, _ = digits_models
    body = nn.Sequential(*list(model.children())[:-1])
    head = nn.Linear(64, 10)
    full = nn.Sequential(body, head)
    few = test.subset(np.flatnonzero(test.labels < 3))  # three classes: the others are never predicted
    state = fit_linear_head(full, head, few, BATCH, CPU)
    head.load_state_dict(state)
    with torch.no_grad():
        predicted = full(few.pixels()).argmax(1).numpy()
    assert (predicted == few.labels).mean() > 0.9 and set(predicted) <= {0, 1, 2}


@pytest.mark.parametrize(
    "override, words",
    [("evaluation.transfer=[public,outsider]", "transfer"), ("evaluation.transfer_attacks=[]", "transfer_attacks")],
)
def test_bad_transfer_settings_are_refused_with_the_field(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config("smoke", overrides=[override])
