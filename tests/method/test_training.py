import dataclasses

import numpy as np
import pytest
import torch

from sylva_ray.base.config import (
    AttackConfig,
    DataConfig,
    ExperimentConfig,
    LoRAConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
)
from sylva_ray.method.data import load_source
from sylva_ray.method.evaluation import evaluate
from sylva_ray.method.models import Role, add_lora, parameter_roles, personal_state, shared_state
from sylva_ray.method.objectives import SylvaObjective
from sylva_ray.method.pretrained import build_pretrained_model
from sylva_ray.method.training import adversarial_round, benign_finetune

CPU = torch.device("cpu")
ATTACK = AttackConfig(eps=0.05, train_steps=2, eval_steps=3)
TRAIN = TrainConfig(batch_size=8, local_steps=3)


def objective(loss, data):
    """Sylva's objective (the one loop's loss + the configured attack) for these tests' attack settings."""
    return SylvaObjective(ExperimentConfig(loss=loss, attack=ATTACK), data)


@pytest.fixture
def model():
    source = load_source(DataConfig())
    torch.manual_seed(0)
    return add_lora(build_pretrained_model(ModelConfig(pretrained="none"), DataConfig(), source), LoRAConfig(rank=4))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_adversarial_round_moves_only_lora_and_head(model, tiny_dataset):
    before = _snapshot(model)
    metrics = adversarial_round(
        model,
        tiny_dataset,
        objective(LossConfig(), tiny_dataset),
        TRAIN,
        seed=1,
        device=CPU,
        global_shared=shared_state(model),
    )
    roles = parameter_roles(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(roles[n] is not Role.FROZEN for n in changed)
    assert any(roles[n] is Role.SHARED for n in changed) and any(roles[n] is Role.PERSONAL for n in changed)
    assert metrics.steps == 3 and metrics.samples == 24
    assert np.isfinite([metrics.loss, metrics.adversarial, metrics.benign, metrics.similarity]).all()
    assert not model.training


def test_adversarial_round_is_deterministic_given_its_seed(model, tiny_dataset):
    start = {**shared_state(model), **personal_state(model)}
    from sylva_ray.method.models import load_adapter_state

    results = []
    for seed in (5, 5, 6):
        load_adapter_state(model, start)
        adversarial_round(model, tiny_dataset, objective(LossConfig(), tiny_dataset), TRAIN, seed=seed, device=CPU)
        results.append(shared_state(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not torch.equal(results[0][k], results[2][k]) for k in results[0])


def test_max_grad_norm_bounds_each_step(model, tiny_dataset):
    # one SGD step (momentum buffer = the gradient) moves the trainable tensors by lr * ||clipped grad||
    start = {**shared_state(model), **personal_state(model)}
    from sylva_ray.method.models import load_adapter_state

    def step_norm(max_norm):
        load_adapter_state(model, start)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        cfg = dataclasses.replace(TRAIN, local_steps=1, max_grad_norm=max_norm)
        adversarial_round(model, tiny_dataset, objective(LossConfig(), tiny_dataset), cfg, seed=1, device=CPU)
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        return float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before))))

    tiny_norm = 1e-4
    assert step_norm(tiny_norm) == pytest.approx(TRAIN.lr * tiny_norm, rel=1e-3)
    assert step_norm(None) > 10 * TRAIN.lr * tiny_norm


def test_proximal_term_pulls_towards_the_global_adapter(model, tiny_dataset):
    from sylva_ray.method.models import load_adapter_state

    anchor = shared_state(model)
    start = {**anchor, **personal_state(model)}
    distances = {}
    for mu in (0.0, 10.0):
        load_adapter_state(model, start)
        loss = dataclasses.replace(LossConfig(), proximal_mu=mu)
        adversarial_round(
            model,
            tiny_dataset,
            objective(loss, tiny_dataset),
            dataclasses.replace(TRAIN, local_steps=20, lr=0.05, momentum=0.0),
            seed=2,
            device=CPU,
            global_shared=anchor,
        )
        distances[mu] = sum(float((v - anchor[k]).pow(2).sum()) for k, v in shared_state(model).items())
    assert distances[10.0] < 0.6 * distances[0.0]  # mu ignored would give a ratio of 1


def test_benign_finetune_trains_only_the_chosen_layers_and_head(model, tiny_dataset):
    merged = model.merge_and_unload()
    flags = {n: p.requires_grad for n, p in merged.named_parameters()}
    before = _snapshot(merged)
    benign_finetune(merged, tiny_dataset, ["backbone.blocks.3."], TRAIN, lr=0.05, steps=3, seed=0, device=CPU)
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("backbone.blocks.3.", "backbone.head.")) for n in changed)
    assert any(n.startswith("backbone.head.") for n in changed) and any(
        n.startswith("backbone.blocks.3.") for n in changed
    )
    assert {n: p.requires_grad for n, p in merged.named_parameters()} == flags
    with pytest.raises(KeyError, match="no parameters"):
        benign_finetune(merged, tiny_dataset, ["backbone.blocks.99."], TRAIN, lr=0.05, steps=1, seed=0, device=CPU)


def test_evaluate_robust_below_clean_and_subset(model, tiny_dataset):
    # train the head a little so that clean accuracy is above chance
    benign_finetune(model, tiny_dataset, [], TrainConfig(batch_size=8), lr=0.5, steps=30, seed=0, device=CPU)
    result = evaluate(model, tiny_dataset, dataclasses.replace(ATTACK, eval_max_samples=10), 16, seed=0, device=CPU)
    assert result.num_clean == len(tiny_dataset) and result.num_robust == 10
    assert 0 <= result.robust_acc <= 1 and result.clean_acc > 0.25
    strong = evaluate(model, tiny_dataset, dataclasses.replace(ATTACK, eps=0.5, eval_steps=10), 16, seed=0, device=CPU)
    assert strong.robust_acc <= strong.clean_acc
    assert strong.robust_acc < 0.25  # eps 0.5 on random images must break a tiny model (no masking)


def test_uint8_pixels_train_and_evaluate_exactly_as_float_pixels():
    """The same pool as uint8 (as loaded now) and as float32 (as it was held before): a client's
    round and its evaluation give bit-identical adapters and figures."""
    import dataclasses

    import numpy as np

    from sylva_ray.engine.client import ClientWorker
    from sylva_ray.engine.resolve import load_config
    from sylva_ray.method.data import ArrayDataset, load_source, make_partition

    cfg = load_config("smoke", overrides=["model.pretrained=none"])
    compact = load_source(cfg.data)
    assert compact.private.images.dtype == np.uint8  # digits' grey levels, as integers
    wide = dataclasses.replace(
        compact,
        private=ArrayDataset(compact.private.pixels().numpy(), compact.private.labels, compact.num_classes),
        public=ArrayDataset(compact.public.pixels().numpy(), compact.public.labels, compact.num_classes),
    )
    partition = make_partition(compact, cfg.data, cfg.runtime.seed)
    results = []
    for source in (compact, wide):
        worker = ClientWorker(cfg, source, partition)
        update = worker.train(0, worker.initial_state(), worker.initial_adapter, 0)
        figures = worker.evaluate(0, update.state, update.adapter, protocol=False)
        results.append((update.adapter, figures.as_dict()))
    assert all(torch.equal(results[0][0][k], results[1][0][k]) for k in results[0][0])
    assert results[0][1] == results[1][1]
