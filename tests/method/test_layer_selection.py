"""The layer game on a real fused model (Ray-free)."""

import dataclasses

import numpy as np
import pytest
import torch

from sylva_ray.engine.client import ClientWorker
from sylva_ray.engine.resolve import load_config
from sylva_ray.method.data import load_source, make_partition
from sylva_ray.method.layer_selection import coalition_value, player_prefixes, split_validation
from sylva_ray.method.shapley import exact_shapley, members_mask, solve


@pytest.fixture(scope="module")
def worker():
    cfg = load_config("smoke", overrides=["model.pretrained=none", "lora.target_modules=[attn.qkv, mlp.fc1]"])
    source = load_source(cfg.data)
    return ClientWorker(cfg, source, make_partition(source, cfg.data, 0))


@pytest.fixture
def game(worker):
    return worker.game(0, worker.initial_state(), worker.initial_adapter, "initial")


def test_players_are_blocks_or_adapted_modules(worker, game):
    assert game.players == [f"backbone.blocks.{i}." for i in range(4)]
    modules = player_prefixes(game.model, "modules", ["attn.qkv", "mlp.fc1"])
    assert len(modules) == 8 and all(m.endswith(("attn.qkv.", "mlp.fc1.")) for m in modules)


def test_validation_split_is_disjoint_and_seeded(worker):
    train = worker.data(0).train
    fit, val = split_validation(train, 0.25, seed=1)
    assert len(fit) + len(val) == len(train) and len(val) == round(0.25 * len(train))
    again_fit, _ = split_validation(train, 0.25, seed=1)
    assert np.array_equal(fit.labels, again_fit.labels)


def test_coalition_value_is_reproducible_and_starts_from_the_fused_weights(game):
    first = game.value(members_mask([3]))
    second = game.value(members_mask([3]))
    assert first == second  # same fused start, same seed, same adversarial start
    game.value(0)
    tuned = {k for k, v in game.model.state_dict().items() if not torch.equal(v, game.fused_state[k])}
    assert tuned and all(k.startswith("backbone.head.") for k in tuned)  # v(empty): only the head moves


def test_tailor_returns_only_the_chosen_layers_and_head(worker, game):
    tuned = game.tailor([1])
    assert all(k.startswith(("backbone.blocks.1.", "backbone.head.")) for k in tuned)
    assert any(k.startswith("backbone.blocks.1.") for k in tuned)
    assert any(not torch.equal(v, game.fused_state[k]) for k, v in tuned.items())
    result = game.evaluate_tailored(tuned, worker.data(0).test)  # the final protocol, as its own job
    assert result.num_clean == len(worker.data(0).test) and 0 <= result.robust_acc <= 1
    assert result.autoattack_acc is not None and result.strongest_attack_acc <= result.robust_acc


def test_evaluating_tailored_tensors_elsewhere_gives_the_same_figures(worker, game):
    """The protocol may run on another actor: a fresh game there reproduces the tailored model."""
    tuned = game.tailor([2])
    here = game.evaluate_tailored(tuned, worker.data(0).test)
    fresh = worker.game(0, worker.initial_state(), worker.initial_adapter, "another-key")
    assert fresh is not game
    assert fresh.evaluate_tailored(tuned, worker.data(0).test) == here


def test_selection_none_leaves_the_fused_model_untouched(game):
    tuned = game.tailor(None)
    assert tuned and all(k.startswith("backbone.head.") for k in tuned)
    assert all(torch.equal(v, game.fused_state[k]) for k, v in tuned.items())


def test_the_default_value_is_continuous_the_accuracy_value_remains(worker, game):
    scored = game.value(members_mask([0]))
    weight = game.sel.robust_weight
    assert game.sel.value == "ce"
    assert scored.value == pytest.approx(-(scored.clean_loss + weight * scored.robust_loss))
    linear = dataclasses.replace(game.sel, value="linear")
    assert coalition_value(linear, scored.as_dict(), float("nan")) == pytest.approx(
        scored.clean_acc + weight * scored.robust_acc
    )


def test_a_real_game_satisfies_efficiency(game):
    values = {}
    result = solve(exact_shapley(len(game.players)), lambda mask: values.setdefault(mask, game.value(mask).value))
    full = (1 << len(game.players)) - 1
    assert result.values.sum() == pytest.approx(values[full] - values[0])


@pytest.fixture(scope="module")
def executor():
    from sylva_ray.engine.jobs import InProcessExecutor

    cfg = load_config("smoke", overrides=["model.pretrained=none"])
    source = load_source(cfg.data)
    return InProcessExecutor(cfg, source, make_partition(source, cfg.data, 0))


def _play_with_broken_estimators(monkeypatch, executor, broken_clients, after_answers):
    """Play clients 0-2's games with the estimators of ``broken_clients`` raising: at their first
    request (``after_answers=0``) or once they have had one batch of answers."""
    from sylva_ray.engine import layer_games
    from sylva_ray.engine.progress import SilentBar
    from sylva_ray.method.wire import encode_state

    cfg, worker = executor.worker.cfg, executor.worker
    broken_seeds = {layer_games.derive_seed(cfg.runtime.seed, "shapley", c) for c in broken_clients}
    real = layer_games.make_estimator

    def estimator(*args, **kwargs):
        inner = real(*args, **kwargs)
        if args[5] not in broken_seeds:  # the sixth argument is the client's seed
            return inner

        def broken():
            if after_answers:
                yield next(inner)
            raise ValueError("injected estimator fault")

        return broken()

    monkeypatch.setattr(layer_games, "make_estimator", estimator)
    states = {c: worker.initial_state() for c in (0, 1, 2)}
    players = len(worker.player_names())
    payload = encode_state(worker.initial_adapter)
    return players, layer_games.play_games(cfg, executor, players, [0, 1, 2], states, payload, progress=SilentBar)


@pytest.mark.parametrize("after_answers", [0, 1])
def test_a_failing_estimator_ends_only_its_own_clients_game(monkeypatch, executor, after_answers):
    """One client's estimator raising (not a failed evaluation: the estimator itself), at its first
    request or later, takes that client out of Phase 2 with the reason; the others' games end with values."""
    players, (results, failed, _) = _play_with_broken_estimators(monkeypatch, executor, {1}, after_answers)
    assert set(results) == {0, 2} and set(failed) == {1}
    assert "injected estimator fault" in failed[1]
    assert all(np.isfinite(results[c].values).all() and len(results[c].values) == players for c in (0, 2))


def test_every_estimator_failing_is_an_error_not_a_quiet_phase1_run(monkeypatch, executor):
    with pytest.raises(RuntimeError, match="every client's layer-game estimator failed") as info:
        _play_with_broken_estimators(monkeypatch, executor, {0, 1, 2}, after_answers=1)
    assert "injected estimator fault" in str(info.value.__cause__)


def test_the_game_cache_counts_each_games_host_copy_too(worker, monkeypatch):
    """A game holds its fused model and, in host memory, the reference weights every coalition
    restarts from: both count against layer_selection.game_cache_mb."""
    first = worker.game(0, worker.initial_state(), worker.initial_adapter, "cache-test")
    model_bytes = sum(t.numel() * t.element_size() for t in first.model.state_dict().values())
    assert first.footprint_bytes == 2 * model_bytes  # the model and its reference copy
    # room for two models but not for two models and their copies: one game is kept, not two
    budget_mb = 3 * model_bytes / (1024 * 1024)
    monkeypatch.setattr(
        worker,
        "cfg",
        dataclasses.replace(
            worker.cfg, layer_selection=dataclasses.replace(worker.cfg.layer_selection, game_cache_mb=budget_mb)
        ),
    )
    worker._games.clear()
    worker.game(0, worker.initial_state(), worker.initial_adapter, "cache-test")
    worker.game(1, worker.initial_state(), worker.initial_adapter, "cache-test")
    assert [key[0] for key in worker._games] == [1]
