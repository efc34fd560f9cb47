"""Typed experiment configuration: one dataclass per concern, YAML in/out, CLI overrides.

Why pydantic dataclasses: they *are* dataclasses (``dataclasses.asdict`` works, code receives plain
typed objects), and pydantic turns a wrong YAML value into an error that names the field, the bad
value and what is allowed -- before any work starts. Library code receives the narrow section it
needs (``DataConfig``, ``AttackConfig``, ...), never the whole tree.

Resolution order, later wins: built-in defaults -> named preset -> ``--config FILE`` -> ``--set k=v``.
The defaults are the *embedded default* (scikit-learn digits); why each is what it is: docs
explanation/method.md, 'The local objective and why the defaults are what they are'.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

#: Unknown keys are errors; so are inf/nan in any float field (they crash an actor a minute later).
_STRICT = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
#: An experiment name becomes a folder name: letters, digits, '.', '_', '-', not starting with a dot.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"

#: L-inf radius used for CIFAR in CalFAT / SFAT: 8 grey levels out of 255.
CIFAR_EPS = 8 / 255
#: The key of a field's schema extra that names the registry its value is looked up in.
REGISTRY_KEY = "registry"


def registry_name(kind: str, description: str) -> Any:
    """A field whose value names an entry of the ``kind`` registry (``base.registry.Registry.kind``).
    The registered names are not written here: whatever describes or checks the field lists them
    from the registry (the configuration reference, ``engine.resolve``'s checks)."""
    return Field(description=description, json_schema_extra={REGISTRY_KEY: kind})


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending field and the fix."""


@dataclass(config=_STRICT)
class DataConfig:
    """Which data, and how it is split among clients."""

    name: Annotated[str, registry_name("dataset", "the dataset, by its registered name")] = "digits"
    root: Annotated[
        Optional[str],
        Field(
            description="local folder (or parquet file, hf) for cifar10/cifar100/imagefolder/hf; nothing is downloaded"
        ),
    ] = None
    num_clients: Annotated[int, Field(ge=1, description="number of clients the private data is split among")] = 10
    partition: Annotated[
        str, registry_name("partitioner", "how the private pool is split among clients, by the partitioner's name")
    ] = "dirichlet"
    alpha: Annotated[
        float,
        Field(
            gt=0,
            description="Dirichlet concentration for dirichlet (label skew) and quantity (size skew); 0.1 extreme, "
            "1.0 mild",
        ),
    ] = 0.1
    shards_per_client: Annotated[int, Field(ge=1, description="classes per client for the shards partitioner")] = 2
    min_samples_per_client: Annotated[
        int, Field(ge=2, description="every client gets at least this many samples (train + test)")
    ] = 10
    test_fraction: Annotated[
        float, Field(gt=0, lt=1, description="fraction of each client's samples held out as its own test split")
    ] = 0.2
    public_fraction: Annotated[
        float, Field(ge=0, lt=1, description="digits/synthetic: seeded slice used only to pre-train the backbone")
    ] = 0.3
    public_seed: Annotated[
        int,
        Field(
            ge=0,
            description="seed of the public/private split; fixed apart from runtime.seed so seeds share one "
            "pre-trained backbone",
        ),
    ] = 0
    max_samples: Annotated[
        Optional[int],
        Field(ge=1, description="cap on the private pool (seeded subsample) for quick runs on large datasets"),
    ] = None
    image_size: Annotated[
        int, Field(ge=1, description="imagefolder: images are resized to this square size at load time")
    ] = 32
    verify_checksums: Annotated[bool, Field(description="cifar: check torchvision's md5 of the official files")] = True
    hf_split: Annotated[
        str, Field(description="hf: the split to read (a DatasetDict's folder, or the parquet files named after it)")
    ] = "train"
    image_column: Annotated[str, Field(description="hf: the column holding the encoded images")] = "image"
    label_column: Annotated[str, Field(description="hf: the column holding the integer class labels")] = "label"
    cache_decoded: Annotated[
        bool,
        Field(
            description="imagefolder/hf: keep the decoded uint8 arrays in $SYLVA_RAY_CACHE/images (keyed by the "
            "files, their sizes and times, and image_size) so the next run on the same data starts at once"
        ),
    ] = True
    shift: Annotated[
        Literal["none", "rotation", "stroke", "invert", "contrast", "noise", "blur", "mixed"],
        Field(
            description="feature shift: each client's images go through its domain's transform (rotation, stroke "
            "width, contrast inversion, contrast, noise, blur, or mixed: one kind per domain); none: off; the public "
            "slice is never shifted (docs explanation/benchmark.md)"
        ),
    ] = "none"
    shift_strength: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description="the strongest domain's level; rotation: 1 = 270 degrees, so 4 domains are the quarter turns",
        ),
    ] = 1.0
    shift_domains: Annotated[
        int,
        Field(
            ge=1,
            description="number of domains; levels evenly spaced from untouched (stroke: -strength) up to the "
            "strength (one domain: the strength); mixed repeats its 7 kinds beyond 7 domains",
        ),
    ] = 4
    shift_assignment: Annotated[
        Literal["round_robin", "random"],
        Field(description="how clients are dealt to domains: client c to domain c mod D, or a seeded shuffle"),
    ] = "round_robin"
    synthetic_num_samples: Annotated[int, Field(ge=1, description="synthetic: total samples")] = 800
    synthetic_num_classes: Annotated[int, Field(ge=2, description="synthetic: number of classes")] = 10
    synthetic_image_size: Annotated[int, Field(ge=2, description="synthetic: square image size")] = 8


@dataclass(config=_STRICT)
class ModelConfig:
    """The timm backbone and where its pre-trained weights come from."""

    name: Annotated[str, Field(description="timm model name; vit_pico_patch4_16 is this package's CPU-sized ViT")] = (
        "vit_pico_patch4_16"
    )
    kwargs: Annotated[dict[str, Any], Field(description="extra keyword arguments for timm.create_model")] = field(
        default_factory=dict
    )
    pretrained: Annotated[
        Literal["embedded", "timm", "checkpoint", "none"],
        Field(
            description="embedded: pre-train on the public slice once and cache; timm: hub weights; checkpoint: local "
            "file"
        ),
    ] = "embedded"
    checkpoint: Annotated[
        Optional[str],
        Field(description="path of a .safetensors (or .pt/.pth, loaded weights_only) file for pretrained=checkpoint"),
    ] = None
    cache_dir: Annotated[
        Optional[str],
        Field(description="where embedded pre-training is cached; default $SYLVA_RAY_CACHE or ~/.cache/sylva_ray"),
    ] = None
    mean: Annotated[
        Optional[list[float]],
        Field(description="normalisation mean inside the model; default from the timm pretrained config"),
    ] = None
    std: Annotated[
        Optional[list[float]],
        Field(description="normalisation std inside the model; default from the timm pretrained config"),
    ] = None
    pretrain_epochs: Annotated[int, Field(ge=1, description="embedded pre-training epochs on the public slice")] = 100
    pretrain_lr: Annotated[float, Field(gt=0, description="embedded pre-training AdamW learning rate")] = 1e-3
    pretrain_weight_decay: Annotated[float, Field(ge=0, description="embedded pre-training AdamW weight decay")] = 0.05
    pretrain_batch_size: Annotated[int, Field(ge=1, description="embedded pre-training batch size")] = 64


@dataclass(config=_STRICT)
class LoRAConfig:
    """peft LoRA adapters: the only tensors that travel in Sylva's Phase 1."""

    rank: Annotated[int, Field(ge=1, description="LoRA rank r")] = 8
    alpha: Annotated[
        Optional[float],
        Field(
            gt=0,
            description="LoRA alpha; scaling is alpha / r. None: alpha = r (scale 1), so a rank sweep keeps the step "
            "size",
        ),
    ] = None
    dropout: Annotated[float, Field(ge=0, lt=1, description="LoRA dropout")] = 0.0
    target_modules: Annotated[
        list[str],
        Field(
            min_length=1,
            description="module-name suffixes to adapt: attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (a bare 'proj' would "
            "also hit patch_embed.proj)",
        ),
    ] = field(default_factory=lambda: ["attn.qkv"])


@dataclass(config=_STRICT)
class AttackConfig:
    """L-inf attacks in the data's own [0, 1] pixel space (normalisation lives inside the model)."""

    eps: Annotated[
        float, Field(gt=0, le=1, description="L-inf radius in [0,1] pixel space; 0.05 for 8x8 digits, 8/255 for CIFAR")
    ] = 0.05
    train_attack: Annotated[
        str, registry_name("attack", "the attack that makes the training examples, by its registered name")
    ] = "pgd"
    train_steps: Annotated[int, Field(ge=1, description="attack iterations during training")] = 5
    train_step_size: Annotated[Optional[float], Field(gt=0, description="training step; default eps/4")] = None
    random_start: Annotated[bool, Field(description="PGD random start inside the eps ball")] = True
    eval_attack: Annotated[str, registry_name("attack", "the attack of the evaluation, by its registered name")] = "pgd"
    eval_steps: Annotated[int, Field(ge=1, description="PGD iterations at evaluation (PGD-20 convention)")] = 20
    eval_step_size: Annotated[
        Optional[float], Field(gt=0, description="evaluation step; default eps/4 (2/255 at eps 8/255)")
    ] = None
    eval_max_samples: Annotated[
        Optional[int],
        Field(
            ge=1, description="attack at most this many test samples per client (fixed subset); clean accuracy uses all"
        ),
    ] = None
    autoattack_steps: Annotated[
        int, Field(ge=1, description="APGD/APGD-T/FAB iterations in AutoAttack (reference strength: 100)")
    ] = 100
    autoattack_square_queries: Annotated[
        int, Field(ge=1, description="Square queries in AutoAttack (reference: 5000)")
    ] = 5000

    def train_step(self) -> float:
        return self.train_step_size if self.train_step_size is not None else self.eps / 4

    def eval_step(self) -> float:
        return self.eval_step_size if self.eval_step_size is not None else self.eps / 4


@dataclass(config=_STRICT)
class TrainConfig:
    """The optimiser and budget of one client's local round."""

    optimizer: Annotated[Literal["sgd", "adamw"], Field(description="local optimiser")] = "sgd"
    lr: Annotated[float, Field(gt=0, description="local learning rate")] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1, description="SGD momentum")] = 0.9
    weight_decay: Annotated[float, Field(ge=0, description="weight decay on trainable tensors")] = 0.0
    local_epochs: Annotated[int, Field(ge=1, description="passes over the client's train split per round")] = 1
    local_steps: Annotated[
        Optional[int], Field(ge=1, description="cap on optimiser steps per round (None: full epochs)")
    ] = None
    max_grad_norm: Annotated[
        Optional[float],
        Field(
            gt=0,
            description="clip the gradient's global L2 norm to this before each step "
            "(torch.nn.utils.clip_grad_norm_); None: no clipping",
        ),
    ] = None
    batch_size: Annotated[int, Field(ge=1, description="local batch size")] = 32
    eval_batch_size: Annotated[int, Field(ge=1, description="batch size for evaluation and attacks at evaluation")] = (
        256
    )


@dataclass(config=_STRICT)
class LossConfig:
    """Sylva's local objective; every term has a weight so baselines are the same loop.

    total = w_adv * CE_w(f(x_adv), y) + w_ben * CE(f(x), y) + w_sim * KL(f(x) || f(x_adv))
            + mu/2 * ||LoRA - LoRA_global||^2
    Defaults are the *softened* form measured as stable (docs explanation/method.md): effective-number class weights
    clipped at 10x, a benign CE anchor, a smaller similarity weight with a detached benign target.
    """

    adversarial_weight: Annotated[
        float, Field(ge=0, description="weight of the class-balanced adversarial CE (L_A)")
    ] = 1.0
    benign_weight: Annotated[
        float, Field(ge=0, description="weight of a benign CE anchor (not in the paper's figure; it prevents collapse)")
    ] = 1.0
    similarity_weight: Annotated[
        float, Field(ge=0, description="weight of KL(benign || adversarial) logits (L_S, TRADES-style)")
    ] = 0.5
    similarity_target: Annotated[
        Literal["detached", "both"],
        Field(description="detached: benign logits are a fixed target; both: gradients through both branches (TRADES)"),
    ] = "detached"
    proximal_mu: Annotated[
        float, Field(ge=0, description="mu of mu/2 ||LoRA - global LoRA||^2 (L_R); 0 turns it off")
    ] = 0.01
    class_weighting: Annotated[
        Literal["effective_number", "inverse_frequency", "none"],
        Field(
            description="class-balanced weights from the client's own label counts (Cui et al. 2019 effective number "
            "by default)"
        ),
    ] = "effective_number"
    class_weight_beta: Annotated[
        float, Field(ge=0, lt=1, description="beta of the effective number (1 - beta^n) / (1 - beta)")
    ] = 0.999
    class_weight_max_ratio: Annotated[
        float, Field(ge=1, description="largest class weight is at most this many times the smallest")
    ] = 10.0


@dataclass(config=_STRICT)
class FederationConfig:
    """Rounds, participation and aggregation of Phase 1."""

    rounds: Annotated[int, Field(ge=1, description="communication rounds of Phase 1")] = 10
    participation: Annotated[float, Field(gt=0, le=1, description="fraction of clients sampled per round (seeded)")] = (
        1.0
    )
    aggregation: Annotated[
        str,
        registry_name(
            "aggregator",
            "the aggregation rule, by its registered name: balltree is Sylva's, fedavg sample-weighted FedAvg, "
            "the others ByzFL's Byzantine-robust rules",
        ),
    ] = "balltree"
    balltree_k: Annotated[int, Field(ge=1, description="neighbours per client in the ball-tree density weighting")] = 3
    pre_aggregation: Annotated[
        list[str],
        Field(
            description="ByzFL pre-aggregation steps on the updates, in order, before any aggregation rule: clipping "
            "(norm clipping at clip_radius), nnm (nearest-neighbour mixing, byzantine_f), bucketing (bucket_size)"
        ),
    ] = field(default_factory=list)
    byzantine_f: Annotated[
        Optional[int],
        Field(
            ge=0,
            description="the number of Byzantine clients krum, multi_krum and nnm are built to tolerate; None: the "
            "adversary's own count (adversary.fraction x data.num_clients)",
        ),
    ] = None
    trim_fraction: Annotated[
        float, Field(ge=0, lt=0.5, description="trimmed_mean drops floor(trim_fraction x n) updates at each end")
    ] = 0.2
    clip_radius: Annotated[
        Optional[float],
        Field(gt=0, description="L2 radius of the clipping pre-step; None: the median norm of the round's updates"),
    ] = None
    cc_radius: Annotated[
        Optional[float],
        Field(gt=0, description="centered_clipping's radius tau; None: the median norm of the round's updates"),
    ] = None
    cc_iterations: Annotated[int, Field(ge=1, description="centered_clipping's iterations L")] = 1
    geomed_nu: Annotated[
        float, Field(gt=0, description="geometric_median's smoothing: distances below nu count as nu")
    ] = 1e-6
    geomed_iterations: Annotated[int, Field(ge=1, description="geometric_median's Weiszfeld iterations T")] = 8
    bucket_size: Annotated[int, Field(ge=1, description="updates averaged per bucket by the bucketing pre-step")] = 2
    eval_every: Annotated[int, Field(ge=1, description="evaluate every k rounds (the last round always)")] = 1
    round_timeout_s: Annotated[
        Optional[float],
        Field(
            gt=0,
            description="round deadline in seconds: clients not done by then are dropped for the round (None: wait "
            "forever)",
        ),
    ] = 3600.0
    deadline_s: Annotated[
        Optional[float],
        Field(
            gt=0,
            description="simulated round deadline (system.* clock): a client whose simulated download + compute + "
            "upload exceeds it is a straggler, its update not aggregated (None: every client is waited for)",
        ),
    ] = None


@dataclass(config=_STRICT)
class AdversaryConfig:
    """Byzantine clients: a seeded, fixed set of malicious participants and what they do.

    Behaviours act on the *update* (uploaded tensors minus the global ones received), after the
    client's own local training; ``label_flip`` poisons the training labels instead. Before
    ``start_round`` the malicious clients behave honestly.
    """

    fraction: Annotated[
        float,
        Field(
            ge=0,
            lt=1,
            description="share of the clients that are malicious: fraction x clients rounded half up, a seeded "
            "fixed set",
        ),
    ] = 0.0
    behaviour: Annotated[
        str,
        registry_name("behaviour", "what a malicious client does, by the behaviour's registered name"),
    ] = "sign_flip"
    start_round: Annotated[
        int, Field(ge=0, description="first round (0-based, as in metrics.csv) in which the malicious clients attack")
    ] = 0
    flip_scale: Annotated[float, Field(gt=0, description="sign_flip uploads -flip_scale x its own update")] = 1.0
    boost: Annotated[
        Optional[float],
        Field(
            gt=0,
            description="scale uploads boost x its own update; None: data.num_clients (model replacement under an "
            "equal-weight mean)",
        ),
    ] = None
    noise_mean: Annotated[float, Field(description="gaussian: mean of the N(mu, sigma^2) uploaded update")] = 0.0
    noise_std: Annotated[float, Field(ge=0, description="gaussian: sigma of the uploaded noise vector")] = 1.0
    alie_tau: Annotated[
        Optional[float],
        Field(
            description="alie: honest mean + tau x honest std per coordinate; None: the paper's z_max for these n and f"
        ),
    ] = None
    ipm_tau: Annotated[float, Field(gt=0, description="ipm: uploads -tau x the honest mean update")] = 2.0


@dataclass(config=_STRICT)
class LayerSelectionConfig:
    """Phase 2: merge the global LoRA, score layers by Shapley values, fine-tune the chosen ones on benign data."""

    enabled: Annotated[bool, Field(description="run Phase 2 after Phase 1")] = True
    players: Annotated[
        Literal["blocks", "modules"],
        Field(description="players of the game: transformer blocks, or the LoRA-adapted modules"),
    ] = "blocks"
    value: Annotated[
        Literal["ce", "linear", "tolerance"],
        Field(
            description="ce: v = -(benign CE + robust_weight * adversarial CE) on the validation share "
            "(continuous; docs explanation/method.md); linear: v = clean + robust_weight * robust accuracy; "
            "tolerance: v = clean - robust_penalty * max(0, robust drop - robust_tolerance)"
        ),
    ] = "ce"
    robust_weight: Annotated[float, Field(ge=0, description="lambda of the linear value")] = 1.0
    robust_tolerance: Annotated[
        float,
        Field(ge=0, le=1, description="tolerance value: robust-accuracy drop (vs the fused model) allowed for free"),
    ] = 0.02
    robust_penalty: Annotated[
        float, Field(ge=0, description="tolerance value: penalty per point of robust drop beyond the tolerance")
    ] = 2.0
    validation_fraction: Annotated[
        float, Field(gt=0, lt=1, description="share of each client's train split held out to score coalitions (seeded)")
    ] = 0.25
    coalition_steps: Annotated[int, Field(ge=1, description="benign fine-tuning steps when scoring one coalition")] = 10
    exact_max_players: Annotated[
        int,
        Field(ge=1, le=16, description="exact Shapley up to this many players (2^L evaluations), Monte Carlo beyond"),
    ] = 10
    estimator: Annotated[
        Literal["antithetic", "permutation", "kernelshap", "unbiased_kernelshap", "svarm", "stratified", "owen"],
        Field(
            description="approximator beyond exact_max_players: antithetic (ours: antithetic, truncated permutation "
            "sampling with standard errors) or one of shapiq's (docs explanation/method.md, estimator table)"
        ),
    ] = "antithetic"
    max_evaluations: Annotated[
        int, Field(ge=2, description="approximation budget: distinct coalitions evaluated per client")
    ] = 128
    stderr_tolerance: Annotated[
        float, Field(gt=0, description="approximation stops early once every layer's standard error is below this")
    ] = 0.01
    truncation_tolerance: Annotated[
        float,
        Field(ge=0, description="antithetic: stop a permutation once |v(N) - v(prefix)| is below this (0: off)"),
    ] = 0.005
    permutations_per_batch: Annotated[
        int, Field(ge=1, description="antithetic: permutation pairs walked in parallel per batch")
    ] = 4
    replicates: Annotated[
        int,
        Field(
            ge=1,
            description="shapiq approximators: independent runs sharing the budget; with 2 or more their spread gives "
            "each layer's stderr (1: no stderr)",
        ),
    ] = 1
    selection: Annotated[
        Literal["top_k", "threshold", "positive", "random", "all", "last", "head", "none"],
        Field(
            description="which layers to fine-tune: by Shapley value (top_k, threshold, positive), or without a game "
            "(random: top_k at random; all; last: the last top_k; head: the head alone; none: no tuning, the fused "
            "Phase-1 model)"
        ),
    ] = "top_k"
    top_k: Annotated[int, Field(ge=0, description="layers kept by the top_k rule")] = 2
    threshold: Annotated[float, Field(description="Shapley value a layer must exceed under the threshold rule")] = 0.0
    finetune_lr: Annotated[float, Field(gt=0, description="benign fine-tuning learning rate (SGD) of Phase 2")] = 0.001
    finetune_steps: Annotated[int, Field(ge=1, description="benign fine-tuning steps of the final tailored model")] = 30
    game_cache_mb: Annotated[
        float,
        Field(
            gt=0,
            description="memory an actor may keep for the layer games it is playing (each game's fused model on the "
            "device and its reference weights in host memory); the oldest game is dropped beyond it",
        ),
    ] = 2048.0


@dataclass(config=_STRICT)
class AlgorithmConfig:
    """Which method trains the clients (``sylva_ray.method.algorithms``); baselines share the engine.

    The algorithm fixes the fields it defines (e.g. ``fat`` sets ``federation.aggregation=fedavg``
    and plain PGD-AT loss weights); the run's config.yaml records the resolved values.
    """

    name: Annotated[
        str,
        registry_name("algorithm", "Sylva or a baseline, by the algorithm's registered name"),
    ] = "sylva"
    ablations: Annotated[
        list[str],
        Field(
            description="parts of the algorithm to switch off; each algorithm accepts its own (docs howto/compare.md)"
        ),
    ] = field(default_factory=list)
    trades_beta: Annotated[
        float, Field(ge=0, description="fedtrades: beta of TRADES' KL term (Zhang et al. 2019: 6)")
    ] = 6.0
    mart_beta: Annotated[
        float, Field(ge=0, description="fedmart: beta of MART's misclassification-aware KL term (Wang et al. 2020: 6)")
    ] = 6.0
    calfat_tau: Annotated[
        float, Field(ge=0, description="calfat: tau of the calibrated logits z + tau * log(prior)")
    ] = 0.1
    calfat_scale: Annotated[
        float,
        Field(ge=0, description="calfat: weight of the calibrated KL(benign || adversarial) term in the outer loss"),
    ] = 10.0
    full_model_lr: Annotated[
        float, Field(gt=0, description="train.lr of the full-model algorithms (fat, fedtrades, fedmart, calfat)")
    ] = 0.003
    full_model_max_grad_norm: Annotated[
        Optional[float], Field(gt=0, description="train.max_grad_norm of the full-model algorithms; None: no clipping")
    ] = 1.0


@dataclass(config=_STRICT)
class EvaluationConfig:
    """The evaluation protocol of final models (the same for every algorithm; docs explanation/evaluation.md).

    Every evaluation reports clean accuracy and PGD (``attack.eval_*``: PGD-20 by default). The
    *final* evaluation (Phase 2's models for Sylva, Phase 1's otherwise) also runs AutoAttack and
    the gradient-masking checks, on fixed per-client subsets (the first samples of each test split).
    """

    autoattack: Annotated[
        bool,
        Field(description="run AutoAttack (attack.autoattack_*: APGD-CE, APGD-T, FAB-T, Square) on the final models"),
    ] = True
    autoattack_max_samples: Annotated[
        int, Field(ge=1, description="AutoAttack subset per client (and of the global test set): its first N samples")
    ] = 100
    global_test: Annotated[
        bool,
        Field(
            description="also score models that have a global form (full-model FedAvg) on the global test set "
            "(FAT-paper convention)"
        ),
    ] = True
    sanity_checks: Annotated[
        bool,
        Field(
            description="run the gradient-masking checks (robust <= clean, PGD-long <= PGD, ~0 accuracy at a large "
            "eps) with the final evaluation"
        ),
    ] = True
    sanity_samples: Annotated[
        int, Field(ge=1, description="subset per client for the PGD-long and large-eps checks")
    ] = 32
    sanity_long_steps: Annotated[
        int, Field(ge=1, description="iterations of the long PGD that must not beat PGD (PGD-100 convention)")
    ] = 100
    sanity_large_eps: Annotated[
        float, Field(gt=0, le=1, description="the 'large' L-inf radius at which accuracy must be near 0 (pixel space)")
    ] = 0.5
    sanity_large_eps_max_acc: Annotated[
        float, Field(ge=0, le=1, description="accuracy at sanity_large_eps above this is flagged")
    ] = 0.1
    sanity_tolerance: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="accuracy slack for the ordering checks (seeded attacks still differ by a sample or two)",
        ),
    ] = 0.02
    transfer: Annotated[
        list[Literal["public", "global", "peers"]],
        Field(
            description="transfer attacks on the final models, crafted on: public (the pre-trained backbone with a "
            "head fit on public data), global (the final global adapter with another participant's head), peers "
            "(every other client's final model); [] = off (docs explanation/threat-model.md)"
        ),
    ] = field(default_factory=list)
    transfer_attacks: Annotated[
        list[Literal["pgd", "mifgsm"]],
        Field(
            min_length=1,
            description="attacks crafted on each transfer source at attack.eps: pgd (attack.eval_steps iterations), "
            "mifgsm (momentum iterative FGSM, made for transfer)",
        ),
    ] = field(default_factory=lambda: ["pgd", "mifgsm"])


#: The edge mix every preset starts from (docs howto/clock.md).
DEFAULT_DEVICE_MIX = {"jetson_orin_nano@wifi": 0.4, "phone_midrange@4g": 0.4, "raspberry_pi5@broadband": 0.2}


@dataclass(config=_STRICT)
class SystemConfig:
    """The clients' devices and links, and the simulated clock that turns FLOPs and bytes into seconds.

    Profiles are ``"<device>@<network>"`` names of ``sylva_ray.method.devices``' classes (or the
    ones added here); the clock never reads a wall clock, so it is the same on any machine.
    """

    clock: Annotated[
        bool, Field(description="run the simulated clock (one FLOP count per run); false: no sim_* columns")
    ] = True
    devices: Annotated[
        dict[str, float] | list[str],
        Field(
            description="profile name -> proportion of the clients (seeded assignment), or one profile name per "
            "client in client order"
        ),
    ] = field(default_factory=lambda: dict(DEFAULT_DEVICE_MIX))
    efficiency: Annotated[
        Optional[float],
        Field(gt=0, le=1, description="sustained share of peak FLOP/s for every device (None: each class's own)"),
    ] = None
    availability: Annotated[
        bool,
        Field(description="draw each sampled client online with its device class's availability (seeded per round)"),
    ] = False
    device_classes: Annotated[
        dict[str, dict[str, Any]],
        Field(
            description="extra device classes: name -> {flops_per_s (number, or {precision: number} with fp32), "
            "memory_gb, efficiency (default 0.25), availability (default 1)}"
        ),
    ] = field(default_factory=dict)
    network_classes: Annotated[
        dict[str, dict[str, Any]],
        Field(description="extra network classes: name -> {downlink_mbps, uplink_mbps, latency_s}"),
    ] = field(default_factory=dict)


@dataclass(config=_STRICT)
class RuntimeConfig:
    """Where and how the simulation runs."""

    seed: Annotated[
        int, Field(ge=0, description="global seed; every other seed is derived from (seed, round, client, ...)")
    ] = 0
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto picks cuda when present")] = "auto"
    torch_threads: Annotated[
        Optional[int], Field(ge=1, description="torch intra-op threads per process (None: torch's default)")
    ] = None
    engine: Annotated[
        Literal["ray", "inprocess"],
        Field(description="ray: client actors + driver actor; inprocess: one process, no Ray (debugging)"),
    ] = "ray"
    address: Annotated[
        Optional[str],
        Field(description="Ray cluster to join: host:port, ray://host:port or auto (None: start a local cluster)"),
    ] = None
    dashboard: Annotated[
        bool,
        Field(
            description="start Ray's dashboard with a local cluster this run starts (~200 MB and a second of CPU "
            "at start-up; a cluster you join keeps its own)"
        ),
    ] = False
    client_resources: Annotated[
        dict[str, float],
        Field(
            description="Ray resources per client actor, e.g. {num_cpus: 1, num_gpus: 0.25}; waited for on a cluster "
            "that can grow; a GPU request is dropped on a local cluster without GPUs"
        ),
    ] = field(default_factory=lambda: {"num_cpus": 1.0})
    num_actors: Annotated[
        Optional[int],
        Field(
            ge=1,
            description="client actors to start (None: one per client, capped by what the cluster can place); extra "
            "clients become virtual clients",
        ),
    ] = None
    max_actor_restarts: Annotated[
        int,
        Field(ge=0, description="times Ray restarts a dead client actor (its clients' state lives with the driver)"),
    ] = 3
    client_retries: Annotated[
        int, Field(ge=0, description="retries of a failed client job in a round before it is recorded as dropped")
    ] = 1
    resource_timeout_s: Annotated[
        float,
        Field(
            ge=0,
            description="on a cluster that can grow: seconds to wait for the autoscaler to supply the client actors' "
            "resources before failing (0: no wait)",
        ),
    ] = 900.0
    resource_settle_s: Annotated[
        float,
        Field(
            ge=0,
            description="once some client actors fit: start with them after this many seconds without new capacity (a "
            "fixed cluster, or nodes that never come)",
        ),
    ] = 60.0
    actor_restart_timeout_s: Annotated[
        float,
        Field(
            gt=0,
            description="seconds a dead client actor may take to come back (Ray restarts it) before it leaves the "
            "pool and its clients move to the others",
        ),
    ] = 120.0
    precision: Annotated[
        Literal["fp32", "tf32", "bf16"],
        Field(
            description="training arithmetic on a GPU: fp32, tf32 matmuls, or bf16 autocast; evaluation attacks "
            "always run in fp32"
        ),
    ] = "fp32"
    deterministic: Annotated[
        bool,
        Field(
            description="deterministic torch algorithms (and cuBLAS workspace) so a GPU run repeats bit for bit on "
            "the same hardware and software"
        ),
    ] = False
    plugins: Annotated[
        list[str],
        Field(
            description="modules or .py files to import in every process before names are looked up: your own "
            "algorithms, aggregation rules and adversary behaviours (docs 'Extending sylva_ray')"
        ),
    ] = field(default_factory=list)


@dataclass(config=_STRICT)
class OutputConfig:
    """Run directory and what is written into it."""

    root: Annotated[str, Field(description="parent folder of timestamped run directories")] = "runs"
    save_models: Annotated[bool, Field(description="save each client's final personalised adapter + head")] = True


@dataclass(config=_STRICT)
class TrackingConfig:
    """Live metrics while a run runs: TensorBoard event files in the run directory, MLflow on request."""

    tensorboard: Annotated[
        bool, Field(description="write TensorBoard event files into RUN/tb/ (tensorboard --logdir runs/)")
    ] = True
    mlflow_uri: Annotated[
        str,
        Field(
            description="MLflow tracking URI (e.g. file:///path/mlruns or http://host:5000); empty: no MLflow. "
            "MLflow is not a dependency: pip install mlflow"
        ),
    ] = ""
    mlflow_experiment: Annotated[str, Field(description="MLflow experiment name (empty: the experiment's name)")] = ""


@dataclass(config=_STRICT)
class ExperimentConfig:
    """The root: one experiment = one run directory."""

    name: Annotated[
        str,
        Field(
            pattern=NAME_PATTERN,
            description="experiment name, used in the run directory name: letters, digits, '.', '_', '-' (no path)",
        ),
    ] = "sylva"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    layer_selection: LayerSelectionConfig = field(default_factory=LayerSelectionConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- presets -------------------------------------------------------------------------------------
#: Named starting points; ``--config`` and ``--set`` apply on top. Values are overrides of the
#: defaults above, so each preset reads as "what differs from the embedded default".
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded-default main job, with the transfer attacks in its final protocol (what they
    # cost: `sylva-ray bench transfer`, docs results/transfer.md).
    "default": {"evaluation": {"transfer": ["public", "global", "peers"]}},
    # A complete run in seconds: few clients, milder skew, short pre-training, weak attacks.
    "smoke": {
        "name": "smoke",
        "data": {"num_clients": 4, "alpha": 0.5},
        "model": {"pretrain_epochs": 40},
        "attack": {
            "train_steps": 2,
            "eval_steps": 5,
            "eval_max_samples": 64,
            "autoattack_steps": 5,
            "autoattack_square_queries": 50,
        },
        "train": {"local_steps": 4},
        "federation": {"rounds": 2},
        "layer_selection": {"finetune_steps": 5, "coalition_steps": 3},
        "evaluation": {"autoattack_max_samples": 16, "sanity_samples": 16, "sanity_long_steps": 20},
    },
    # Clients that need each other (docs explanation/benchmark.md): 20 clients of ~63 digits each,
    # IID labels, each client's strokes thinned or thickened by its domain (Morpho-MNIST's
    # perturbations at 4 levels from -0.75 to +0.75): the setting `sylva-ray room` chose.
    "shift": {
        "name": "shift",
        "data": {
            "num_clients": 20,
            "partition": "iid",
            "shift": "stroke",
            "shift_strength": 0.75,
            "shift_domains": 4,
        },
    },
    # The paper's scale: CIFAR-10 from a local folder, ImageNet ViT-B/16 from timm, CalFAT/SFAT attack.
    "paper": {
        "name": "paper",
        "data": {"name": "cifar10", "root": "data/cifar10", "num_clients": 10, "alpha": 0.1},
        "model": {"name": "vit_base_patch16_224", "pretrained": "timm"},
        "lora": {"rank": 8, "target_modules": ["attn.qkv"]},
        "attack": {"eps": CIFAR_EPS, "train_steps": 10, "eval_steps": 20, "eval_max_samples": 1000},
        # Sized for cluster/aws.yaml's g5.xlarge (1 x A10G, 24 GB, ~22 GB usable; 4 vCPUs), as measured
        # by `sylva-ray bench memory` (activations 78 MB per 32x32 image through ViT-B/16 in fp32):
        #   batch 64 + PGD-10, Sylva's two forwards: 0.32 GB weights + 2 x 64 x 78 MB = 10.1 GB;
        #   PGD-20 evaluation at batch 256: 0.32 + 256 x 78 MB = 19.9 GB -> neither fits a quarter card.
        #   batch 32: 0.32 + 2 x 32 x 78 MB = 5.2 GB; evaluation at 64: 5.2 GB; /0.8 headroom = 6.5 GB
        #   -> half a card (11 GB) per client actor, two actors per g5.xlarge with 2 vCPUs each.
        "train": {"lr": 0.01, "batch_size": 32, "eval_batch_size": 64},
        "federation": {"rounds": 50},
        "runtime": {"client_resources": {"num_cpus": 2.0, "num_gpus": 0.5}},
    },
}


def merge_layers(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in _OPAQUE_DICTS:
            merged[key] = merge_layers(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# dict-valued *fields* are replaced whole by an override, not merged key by key.
_OPAQUE_DICTS = {"kwargs", "client_resources", "devices", "device_classes", "network_classes"}


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"lora.rank=16"`` -> ``(["lora", "rank"], 16)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set federation.rounds=5")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key; e.g. --set lora.rank=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return path, value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    nested: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        nested = {part: nested}
    return nested


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "unexpected_keyword_argument":
            parent = ".".join(str(p) for p in error["loc"][:-1]) or "<root>"
            lines.append(
                f"{where}: unknown field under {parent}; check the spelling (see docs reference/configuration.md)"
            )
        else:
            lines.append(f"{where} = {error.get('input')!r}: {error['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """``--set`` items (``["lora.rank=16"]``) or ``{"lora.rank": 16}`` applied onto a config dict."""
    pairs = (
        [parse_override(item) for item in overrides]
        if isinstance(overrides, list)
        else [(key.split("."), value) for key, value in overrides.items()]
    )
    for path, value in pairs:
        raw = merge_layers(raw, _nest(path, value))
    return raw


def validate_schema(raw: dict[str, Any]) -> ExperimentConfig:
    """Types, ranges and unknown keys only: ``ConfigError`` naming every offending field.
    Checks that need the registries are ``sylva_ray.engine.resolve``'s."""
    try:
        return TypeAdapter(ExperimentConfig).validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def registry_kind(info: Any) -> Optional[str]:
    """The registry a field's value names (a pydantic ``FieldInfo`` made by ``registry_name``), or None."""
    extra = info.json_schema_extra
    return extra.get(REGISTRY_KEY) if isinstance(extra, dict) else None


def registry_fields() -> list[tuple[str, str]]:
    """(dotted name, registry kind) of every field that names a registered entry, in schema order."""
    found = []
    defaults = ExperimentConfig()
    for section in dataclasses.fields(ExperimentConfig):
        sub = getattr(defaults, section.name)
        for name, info in (type(sub).__pydantic_fields__ if dataclasses.is_dataclass(sub) else {}).items():
            kind = registry_kind(info)
            if kind is not None:
                found.append((f"{section.name}.{name}", kind))
    return found


def config_field_docs() -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, description) for every field (the docs' reference reads the same schema)."""
    rows: list[tuple[str, str, Any, str]] = []
    defaults = ExperimentConfig()
    for section in dataclasses.fields(ExperimentConfig):
        sub = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(sub):
            info = ExperimentConfig.__pydantic_fields__[section.name]
            rows.append((section.name, str(info.annotation), sub, info.description or ""))
            continue
        for name, info in type(sub).__pydantic_fields__.items():
            annotation = str(info.annotation).replace("typing.", "")
            rows.append((f"{section.name}.{name}", annotation, getattr(sub, name), info.description or ""))
    return rows
