import dataclasses

import pytest
import torch

from sylva_ray.base.config import AttackConfig, ModelConfig
from sylva_ray.method.attacks import ATTACKS, build_attack, perturb
from sylva_ray.method.models import PixelSpaceModel
from sylva_ray.method.pretrained import create_backbone

EPS = 0.05


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PixelSpaceModel(create_backbone(ModelConfig(pretrained="none"), 10), (16, 16), [0.5] * 3, [0.5] * 3).eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 8, 8, generator=generator), torch.arange(6) % 10


FAST = AttackConfig(eps=EPS, train_steps=3, eval_steps=3, autoattack_steps=2, autoattack_square_queries=5)


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("role", ["train", "eval"])
def test_adversarial_images_stay_in_the_ball_and_the_box(model, batch, name, role):
    images, _ = batch
    with torch.no_grad():
        labels = model(images).argmax(1)  # all correct, so every attack must move some image
    attack = build_attack(name, model, FAST, role, 10, seed=0)
    adversarial = perturb(attack, images, labels, seed=5)
    assert (adversarial - images).abs().max() <= EPS + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert not torch.equal(adversarial, images)


def test_attack_is_reproducible_from_its_seed(model, batch):
    images, labels = batch
    attack = build_attack("pgd", model, FAST, "train", 10, seed=0)
    a, b, c = (perturb(attack, images, labels, seed=s) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attack_restores_train_mode_and_works_under_no_grad(model, batch):
    images, labels = batch
    model.train()
    attack = build_attack("pgd", model, FAST, "train", 10, seed=0)
    with torch.no_grad():
        adversarial = perturb(attack, images, labels, seed=1)
    assert model.training
    assert (adversarial - images).abs().max() > 0


def test_autoattack_is_the_reference_implementation_at_reference_strength(model):
    from pyautoattack import AutoAttack

    attack = build_attack("autoattack", model, AttackConfig(eps=EPS), "eval", 10, seed=3)
    runner = attack.runner
    assert isinstance(runner, AutoAttack) and runner.version == "standard" and attack.reference_strength
    assert runner.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert runner.apgd.n_iter == runner.apgd_targeted.n_iter == runner.fab.n_iter == 100
    assert runner.square.n_queries == 5000 and runner.apgd.n_restarts == 1
    assert runner.apgd_targeted.n_target_classes == runner.fab.n_target_classes == 9
    assert runner.seed == 3 and runner.epsilon == EPS
    few = build_attack("autoattack", model, AttackConfig(eps=EPS), "eval", 4, seed=3)
    assert few.runner.apgd_targeted.n_target_classes == 3  # no more targets than other classes


def test_step_sizes_default_to_a_quarter_of_eps():
    cfg = AttackConfig(eps=0.08)
    assert cfg.train_step() == pytest.approx(0.02) and cfg.eval_step() == pytest.approx(0.02)
    assert dataclasses.replace(cfg, eval_step_size=0.01).eval_step() == 0.01


def test_fp16_inputs_are_refused(model, batch):
    images, labels = batch
    attack = build_attack("pgd", model, FAST, "train", 10, seed=0)
    with pytest.raises(TypeError, match="fp32"):
        perturb(attack, images.half(), labels, seed=0)


# --- the evaluation protocol against the reference package, on a small trained model --------------
PROTOCOL_EPS, AA_STEPS, AA_QUERIES, AA_SAMPLES = 0.18, 10, 200, 48


@pytest.fixture(scope="module")
def trained():
    """A small MLP fitted to noisy class prototypes: clean 100%, PGD ~54% and AutoAttack ~46% at eps 0.18."""
    import numpy as np

    from sylva_ray.method.data import ArrayDataset

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 80)
    images = np.clip(rng.uniform(0, 1, (10, 3, 8, 8))[labels] + rng.normal(0, 0.15, (80, 3, 8, 8)), 0, 1)
    x, y = torch.tensor(images, dtype=torch.float32), torch.tensor(labels)
    optimiser = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(200):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimiser.step()
    return net.eval(), ArrayDataset(images.astype(np.float32), labels.astype(np.int64), 10)


def _protocol(net, data, seed=0):
    from sylva_ray.base.config import EvaluationConfig
    from sylva_ray.method.evaluation import evaluate

    cfg = AttackConfig(eps=PROTOCOL_EPS, autoattack_steps=AA_STEPS, autoattack_square_queries=AA_QUERIES)
    protocol = EvaluationConfig(autoattack_max_samples=AA_SAMPLES, sanity_samples=24, sanity_long_steps=40)
    return evaluate(net, data, cfg, 32, seed=seed, device=torch.device("cpu"), protocol=protocol)


def test_protocol_autoattack_equals_the_reference_package_on_the_same_samples_and_seed(trained):
    from pyautoattack import AutoAttack

    from sylva_ray.base.seeding import derive_seed

    net, data = trained
    result = _protocol(net, data)
    reference = AutoAttack(net, norm="Linf", eps=PROTOCOL_EPS, seed=derive_seed(0, "autoattack"), version="standard")
    for sub in (reference.apgd, reference.apgd_targeted, reference.fab):
        sub.n_iter = AA_STEPS
    reference.square.n_queries = AA_QUERIES
    x, y = data.pixels(slice(0, AA_SAMPLES)), torch.from_numpy(data.labels[:AA_SAMPLES])
    _, predicted = reference.run_standard_evaluation(x, y, batch_size=32)
    expected = float((predicted == y).float().mean())
    assert 0.0 < expected < 1.0  # the test can tell the attacks apart
    assert result.autoattack_acc == pytest.approx(expected) and result.num_autoattack == AA_SAMPLES
    assert result.autoattack_se == pytest.approx((expected * (1 - expected) / AA_SAMPLES) ** 0.5)


def test_strongest_attack_is_never_above_any_single_attack(trained):
    net, data = trained
    result = _protocol(net, data)
    assert result.num_strongest == AA_SAMPLES
    assert result.strongest_attack_acc <= result.autoattack_acc
    assert result.strongest_attack_acc <= result.pgd_on_autoattack
    # the long PGD saw the first 24 images: at most as many of them survive everything as survived it
    assert result.strongest_attack_acc * AA_SAMPLES <= result.long_pgd_acc * 24 + (AA_SAMPLES - 24)
    assert result.autoattack_acc < result.pgd_on_autoattack  # AutoAttack finds more than PGD here: a real check
