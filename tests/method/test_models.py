import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sylva_ray.base.config import DataConfig, LoRAConfig, ModelConfig
from sylva_ray.method.data import load_source
from sylva_ray.method.models import (
    Role,
    add_lora,
    count_parameters,
    full_model_nbytes,
    load_adapter_state,
    parameter_roles,
    personal_state,
    shared_state,
)
from sylva_ray.method.pretrained import ModelSourceError, build_pretrained_model, create_backbone, embedded_weights
from sylva_ray.method.wire import decode_state, encode_state, serialized_nbytes

DIGITS = DataConfig(num_clients=2)


@pytest.fixture
def digits_source():
    return load_source(DIGITS)


@pytest.fixture
def lora_model(blank_model_cfg, lora_cfg, digits_source):
    torch.manual_seed(0)
    return add_lora(build_pretrained_model(blank_model_cfg, DIGITS, digits_source), lora_cfg)


def test_only_lora_and_head_are_trainable(lora_model):
    roles = parameter_roles(lora_model)
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, r in roles.items() if r is not Role.FROZEN}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any(".lora_" in n for n in trainable) and any("head" in n for n in trainable)


def test_roles_are_disjoint_and_complete(lora_model):
    roles = parameter_roles(lora_model)
    names = [n for n, _ in lora_model.named_parameters()]
    assert sorted(roles) == sorted(names)
    groups = {r: {n for n, v in roles.items() if v is r} for r in Role}
    assert sum(len(g) for g in groups.values()) == len(names)
    counts = count_parameters(lora_model)
    # rank 4 on qkv of 4 blocks of width 96: A is 4x96, B is 288x4
    assert counts["shared"] == 4 * (4 * 96 + 288 * 4)


def test_shared_and_personal_states_split_the_adapter(lora_model):
    shared, personal = shared_state(lora_model), personal_state(lora_model)
    assert shared and personal and not set(shared) & set(personal)
    assert all(".lora_" in k for k in shared) and all("head" in k for k in personal)


def test_loading_adapter_state_changes_the_function(lora_model):
    x = torch.rand(4, 3, 8, 8)
    before = lora_model(x)
    bumped = {k: v + 0.5 for k, v in shared_state(lora_model).items()}
    load_adapter_state(lora_model, bumped)
    assert not torch.allclose(before, lora_model(x))
    assert all(torch.equal(v, bumped[k]) for k, v in shared_state(lora_model).items())
    with pytest.raises(KeyError, match="keys the model does not"):
        load_adapter_state(lora_model, {"base_model.model.nowhere.lora_A.weight": torch.zeros(1)})


def test_normalisation_and_resize_live_inside_the_model(blank_model_cfg, digits_source):
    model = build_pretrained_model(blank_model_cfg, DIGITS, digits_source)
    x = torch.rand(2, 3, 8, 8)
    expected = model.backbone((F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) - 0.5) / 0.5)
    assert model.input_size == (16, 16)
    assert torch.allclose(model(x), expected)


@pytest.mark.parametrize("targets", [["attn.qkv"], ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]])
def test_lora_targets_only_linear_layers(blank_model_cfg, digits_source, targets):
    model = add_lora(build_pretrained_model(blank_model_cfg, DIGITS, digits_source), LoRAConfig(target_modules=targets))
    adapted = {n.rsplit(".lora_", 1)[0] for n in shared_state(model)}
    assert len(adapted) == 4 * len(targets)
    assert not any("patch_embed" in n for n in adapted)


def test_bare_proj_would_hit_the_patch_embedding(blank_model_cfg, digits_source):
    model = build_pretrained_model(blank_model_cfg, DIGITS, digits_source)
    with pytest.raises(ValueError, match="patch_embed.proj"):
        add_lora(model, LoRAConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match="matches no module"):
        add_lora(model, LoRAConfig(target_modules=["attn.nothing"]))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_source(tmp_path, blank_model_cfg, digits_source, suffix):
    donor = create_backbone(blank_model_cfg, 10)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    cfg = dataclasses.replace(blank_model_cfg, pretrained="checkpoint", checkpoint=str(path))
    model = build_pretrained_model(cfg, DIGITS, digits_source)
    assert all(torch.equal(v, state[k]) for k, v in model.backbone.state_dict().items())


def test_checkpoint_of_another_architecture_is_refused(tmp_path, blank_model_cfg, digits_source):
    other = create_backbone(dataclasses.replace(blank_model_cfg, kwargs={"depth": 2}), 10)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    cfg = dataclasses.replace(blank_model_cfg, pretrained="checkpoint", checkpoint=str(path))
    with pytest.raises(ModelSourceError, match="do not fit"):
        build_pretrained_model(cfg, DIGITS, digits_source)


def test_checkpoint_with_another_head_size_keeps_the_body(tmp_path, blank_model_cfg, digits_source):
    donor = create_backbone(blank_model_cfg, 1000)
    path = tmp_path / "imagenet_head.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    cfg = dataclasses.replace(blank_model_cfg, pretrained="checkpoint", checkpoint=str(path))
    model = build_pretrained_model(cfg, DIGITS, digits_source)
    assert model.backbone.get_classifier().out_features == 10
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, donor.blocks[0].attn.qkv.weight)


def test_timm_hub_offline_fails_with_a_way_out(monkeypatch, blank_model_cfg):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = ModelConfig(name="resnet18", pretrained="timm")
    with pytest.raises(ModelSourceError, match="model.pretrained=checkpoint"):
        create_backbone(cfg, 10)


def test_embedded_weights_are_cached_by_what_determines_them(tmp_path, monkeypatch, digits_source):
    import sylva_ray.method.pretrained as pretrained

    cfg = ModelConfig(cache_dir=str(tmp_path), pretrain_epochs=1)
    first = embedded_weights(cfg, DIGITS, digits_source)
    files = list((tmp_path / "pretrained").glob("*.safetensors"))
    assert len(files) == 1

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached backbone was pre-trained again")

    monkeypatch.setattr(pretrained, "pretrain_on_public", must_not_train)
    again = embedded_weights(cfg, DIGITS, digits_source)
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(AssertionError, match="pre-trained again"):  # another recipe -> another key
        embedded_weights(dataclasses.replace(cfg, pretrain_lr=0.01), DIGITS, digits_source)


def test_serialized_bytes_are_the_payload(lora_model):
    shared = shared_state(lora_model)
    payload = encode_state(shared)
    raw = sum(v.numel() * v.element_size() for v in shared.values())
    assert len(payload) == serialized_nbytes(shared)
    assert raw < len(payload) < raw + 4096  # tensors plus a JSON header
    decoded = decode_state(payload)
    assert all(torch.equal(decoded[k], v) for k, v in shared.items())
    assert full_model_nbytes(lora_model) > 30 * len(payload)


def test_embedded_pretraining_does_not_depend_on_the_process_rng(tmp_path, digits_source):
    """Fresh processes start torch's generator differently; the weights must not care."""
    states = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        cfg = ModelConfig(cache_dir=str(tmp_path / str(global_seed)), pretrain_epochs=1)
        states.append(embedded_weights(cfg, DIGITS, digits_source))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(3)
    a = create_backbone(ModelConfig(pretrained="none"), 10)
    torch.manual_seed(4)
    b = create_backbone(ModelConfig(pretrained="none"), 10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
