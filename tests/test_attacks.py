import dataclasses

import pytest
import torch

from sylva_ray.base.config import AttackConfig, ModelConfig
from sylva_ray.method.attacks import ATTACKS, build_attack, perturb
from sylva_ray.method.models import PixelSpaceModel, create_backbone

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


def test_autoattack_is_composed_at_reference_strength(model):
    attack = build_attack("autoattack", model, AttackConfig(eps=EPS), "eval", 10, seed=3)
    subs = {type(a).__name__: a for a in attack.attacks}
    assert set(subs) == {"APGD", "APGDT", "FAB", "Square"}
    assert subs["APGD"].steps == subs["APGDT"].steps == subs["FAB"].steps == 100
    assert subs["Square"].n_queries == 5000
    assert subs["FAB"].multi_targeted and subs["APGDT"].n_target_classes == 9
    assert all(a.seed == 3 for a in attack.attacks)


def test_step_sizes_default_to_a_quarter_of_eps():
    cfg = AttackConfig(eps=0.08)
    assert cfg.train_step() == pytest.approx(0.02) and cfg.eval_step() == pytest.approx(0.02)
    assert dataclasses.replace(cfg, eval_step_size=0.01).eval_step() == 0.01


def test_fp16_inputs_are_refused(model, batch):
    images, labels = batch
    attack = build_attack("pgd", model, FAST, "train", 10, seed=0)
    with pytest.raises(TypeError, match="fp32"):
        perturb(attack, images.half(), labels, seed=0)
