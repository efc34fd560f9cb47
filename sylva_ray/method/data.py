"""Datasets by name, and partitioners that split the private pool among clients.

Every image array here is float32, NCHW, in [0, 1]: attacks measure eps in this space and the
model resizes/normalises internally. Nothing is downloaded: ``digits`` ships with scikit-learn,
``cifar10``/``cifar100``/``imagefolder`` read a local folder, ``synthetic`` is generated.

Data flow: ``load_source(cfg)`` -> ``DataSource`` (public slice for pre-training, private pool,
optional official test set) -> ``make_partition(labels, cfg, seed)`` -> ``Partition`` (per-client
train/test indices into the private pool, saved as JSON in the run directory) ->
``client_data(source, partition, cid)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from sylva_ray.base.config import DataConfig
from sylva_ray.base.registry import Registry
from sylva_ray.base.seeding import numpy_rng
from sylva_ray.base.storage import atomic_write_text
from sylva_ray.method.cifar import read_split

log = logging.getLogger(__name__)

#: scikit-learn's digits are 8x8 with integer grey levels 0..16 (17 levels).
DIGITS_MAX_LEVEL = 16.0
#: uint8 images (CIFAR, ImageFolder) are scaled by this to land in [0, 1].
UINT8_MAX = 255.0
#: Synthetic images: per-class prototype plus Gaussian noise of this std, clipped to [0, 1].
SYNTHETIC_NOISE_STD = 0.15


class PartitionError(ValueError):
    """The requested split cannot be made; the message says which field to change."""


@dataclass
class ArrayDataset(Dataset):
    """Images (N, C, H, W) float32 in [0, 1] and integer labels (N,); a ``torch.utils.data.Dataset``
    too (``ds[i]`` is ``(image tensor, label)``, so ``DataLoader(ds)`` works), with the arrays kept
    as ``.images`` / ``.labels`` for the batched code paths that slice them directly."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"expected images (N,C,H,W) and labels (N,), got {self.images.shape} and {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.images[index]), int(self.labels[index])

    def subset(self, indices: np.ndarray) -> "ArrayDataset":
        return ArrayDataset(self.images[indices], self.labels[indices], self.num_classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


@dataclass
class DataSource:
    """What a dataset loader returns: the pools the experiment draws from."""

    name: str
    private: ArrayDataset
    public: Optional[ArrayDataset] = None
    official_test: Optional[ArrayDataset] = None

    @property
    def num_classes(self) -> int:
        return self.private.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.private.images.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """Identifies the private pool, so a saved partition is never applied to other data."""
        digest = hashlib.sha256()
        digest.update(self.name.encode())
        digest.update(np.ascontiguousarray(self.private.labels).tobytes())
        digest.update(str(self.private.images.shape).encode())
        return digest.hexdigest()[:16]


DatasetLoader = Callable[[DataConfig], DataSource]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def _split_public(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: DataConfig, name: str) -> DataSource:
    """Carve the seeded public slice (pre-training only) out of a dataset; the rest is private."""
    from sklearn.model_selection import train_test_split

    dataset = ArrayDataset(images.astype(np.float32), labels.astype(np.int64), num_classes)
    if cfg.public_fraction <= 0:
        return DataSource(name=name, private=dataset)
    private_idx, public_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.public_fraction, stratify=labels, random_state=cfg.public_seed
    )
    return DataSource(
        name=name, private=dataset.subset(np.sort(private_idx)), public=dataset.subset(np.sort(public_idx))
    )


@DATASETS.register("digits")
def load_digits_source(cfg: DataConfig) -> DataSource:
    """scikit-learn's 1,797 handwritten digits, kept at 8x8, grey repeated to 3 channels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = bunch.images.astype(np.float32) / DIGITS_MAX_LEVEL  # (N, 8, 8) in [0, 1]
    images = np.repeat(grey[:, None, :, :], 3, axis=1)
    return _split_public(images, bunch.target, 10, cfg, "digits")


@DATASETS.register("synthetic")
def load_synthetic_source(cfg: DataConfig) -> DataSource:
    """Class prototypes plus noise: learnable in seconds, for tests and benchmarks."""
    rng = np.random.default_rng(cfg.public_seed)
    size, classes = cfg.synthetic_image_size, cfg.synthetic_num_classes
    prototypes = rng.uniform(0.0, 1.0, size=(classes, 3, size, size)).astype(np.float32)
    labels = np.arange(cfg.synthetic_num_samples) % classes
    rng.shuffle(labels)
    noise = rng.normal(0.0, SYNTHETIC_NOISE_STD, size=(len(labels), 3, size, size)).astype(np.float32)
    images = np.clip(prototypes[labels] + noise, 0.0, 1.0)
    return _split_public(images, labels, classes, cfg, "synthetic")


def _cifar_source(cfg: DataConfig, which: str) -> DataSource:
    """CIFAR from torchvision's python format in a local folder; never downloaded.

    ``data.root`` may be the folder that holds ``cifar-10-batches-py`` or that folder itself. The
    batches are pickles: ``sylva_ray.method.cifar`` reads them with an unpickler that admits only what the
    format holds, with or without the md5 check (``verify_checksums``; the tests write small files
    in the same format and switch it off).
    """

    def to_arrays(train: bool) -> ArrayDataset:
        images, labels, classes = read_split(which, cfg.root or "", train, cfg.verify_checksums)
        return ArrayDataset(images.astype(np.float32) / UINT8_MAX, labels, classes)

    return DataSource(name=which, private=to_arrays(True), official_test=to_arrays(False))


@DATASETS.register("cifar10")
def load_cifar10_source(cfg: DataConfig) -> DataSource:
    return _cifar_source(cfg, "cifar10")


@DATASETS.register("cifar100")
def load_cifar100_source(cfg: DataConfig) -> DataSource:
    return _cifar_source(cfg, "cifar100")


@DATASETS.register("imagefolder")
def load_imagefolder_source(cfg: DataConfig) -> DataSource:
    """Any ``root/<class>/<image>`` tree, resized to ``data.image_size`` and held in memory."""
    from torchvision import datasets, transforms

    tfm = transforms.Compose([transforms.Resize((cfg.image_size, cfg.image_size)), transforms.ToTensor()])
    ds = datasets.ImageFolder(
        str(cfg.root), transform=tfm, loader=lambda p: datasets.folder.default_loader(p).convert("RGB")
    )
    if len(ds) == 0:
        raise FileNotFoundError(f"data.root={cfg.root!r}: no images found in class subfolders")
    images = np.stack([ds[i][0].numpy() for i in range(len(ds))]).astype(np.float32)
    labels = np.asarray(ds.targets, dtype=np.int64)
    return DataSource(name="imagefolder", private=ArrayDataset(images, labels, len(ds.classes)))


def load_source(cfg: DataConfig) -> DataSource:
    """Load the dataset named in the config and apply ``max_samples`` (seeded subsample)."""
    source = DATASETS.get(cfg.name)(cfg)
    if cfg.max_samples is not None and cfg.max_samples < len(source.private):
        rng = np.random.default_rng(cfg.public_seed)
        keep = np.sort(rng.choice(len(source.private), size=cfg.max_samples, replace=False))
        source.private = source.private.subset(keep)
    log.info(
        "dataset %s: %d private, %d public samples, %d classes",
        source.name,
        len(source.private),
        len(source.public) if source.public else 0,
        source.num_classes,
    )
    return source


# --- partitioners --------------------------------------------------------------------------------
Partitioner = Callable[[np.ndarray, DataConfig, np.random.Generator], list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")


def _check_enough(n: int, cfg: DataConfig) -> None:
    need = cfg.num_clients * cfg.min_samples_per_client
    if n < need:
        raise PartitionError(
            f"data.num_clients={cfg.num_clients} x data.min_samples_per_client={cfg.min_samples_per_client} = {need} "
            f"samples needed, but the private pool has {n}: lower data.num_clients or data.min_samples_per_client"
        )


def _top_up(parts: list[list[int]], minimum: int, rng: np.random.Generator) -> list[list[int]]:
    """Move samples from the largest clients to any client below ``minimum``.

    Bounded: each move raises a deficient client by one, so at most ``K * minimum`` moves happen
    (no resample-until-it-fits loop). Which sample moves is drawn from ``rng``.
    """
    for needy in range(len(parts)):
        while len(parts[needy]) < minimum:
            donor = max(range(len(parts)), key=lambda k: len(parts[k]))
            take = int(rng.integers(len(parts[donor])))
            parts[needy].append(parts[donor].pop(take))
    return parts


@PARTITIONERS.register("iid")
def partition_iid(labels: np.ndarray, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    _check_enough(len(labels), cfg)
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), cfg.num_clients)]


@PARTITIONERS.register("dirichlet")
def partition_dirichlet(labels: np.ndarray, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class is spread over clients with proportions ~ Dir(alpha * 1)."""
    _check_enough(len(labels), cfg)
    parts: list[list[int]] = [[] for _ in range(cfg.num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(cfg.num_clients, cfg.alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for k, chunk in enumerate(np.split(members, cuts)):
            parts[k].extend(chunk.tolist())
    parts = _top_up(parts, cfg.min_samples_per_client, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


@PARTITIONERS.register("shards")
def partition_shards(labels: np.ndarray, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological skew (McMahan et al. 2017): sort by label, cut into K*k shards, deal k each.

    A client sees at most ``shards_per_client`` classes (fewer if two shards share a class).
    """
    _check_enough(len(labels), cfg)
    num_shards = cfg.num_clients * cfg.shards_per_client
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards)
    parts = [
        np.sort(np.concatenate([shards[s] for s in dealt[k * cfg.shards_per_client : (k + 1) * cfg.shards_per_client]]))
        for k in range(cfg.num_clients)
    ]
    short = [k for k, p in enumerate(parts) if len(p) < cfg.min_samples_per_client]
    if short:
        raise PartitionError(
            f"data.shards_per_client={cfg.shards_per_client} leaves clients {short} below "
            f"data.min_samples_per_client={cfg.min_samples_per_client}: raise shards_per_client or lower num_clients"
        )
    return parts


@PARTITIONERS.register("quantity")
def partition_quantity(labels: np.ndarray, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew: client sizes ~ min + Dir(alpha) share of the rest; labels stay IID."""
    _check_enough(len(labels), cfg)
    spare = len(labels) - cfg.num_clients * cfg.min_samples_per_client
    extra = rng.multinomial(spare, rng.dirichlet(np.full(cfg.num_clients, cfg.alpha)))
    sizes = cfg.min_samples_per_client + extra
    return [np.sort(p) for p in np.split(rng.permutation(len(labels)), np.cumsum(sizes)[:-1])]


@dataclass
class Partition:
    """Per-client train and test indices into the private pool (the run directory keeps it)."""

    train: list[np.ndarray]
    test: list[np.ndarray]
    fingerprint: str

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def to_json(self) -> str:
        return json.dumps(
            {
                "fingerprint": self.fingerprint,
                "clients": [{"train": tr.tolist(), "test": te.tolist()} for tr, te in zip(self.train, self.test)],
            }
        )

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str | None = None) -> "Partition":
        payload = json.loads(Path(path).read_text())
        if expected_fingerprint is not None and payload["fingerprint"] != expected_fingerprint:
            raise PartitionError(f"{path}: the partition was made for other data (fingerprint mismatch)")
        return cls(
            train=[np.asarray(c["train"], dtype=np.int64) for c in payload["clients"]],
            test=[np.asarray(c["test"], dtype=np.int64) for c in payload["clients"]],
            fingerprint=payload["fingerprint"],
        )


def make_partition(source: DataSource, cfg: DataConfig, seed: int) -> Partition:
    """Split the private pool among clients, then each client's share into its train/test split."""
    if cfg.num_clients > len(source.private):
        raise PartitionError(f"data.num_clients={cfg.num_clients} exceeds the {len(source.private)} private samples")
    rng = numpy_rng(seed, "partition")
    shares = PARTITIONERS.get(cfg.partition)(source.private.labels, cfg, rng)
    train, test = [], []
    for share in shares:
        shuffled = rng.permutation(share)
        n_test = min(max(1, math.ceil(cfg.test_fraction * len(share))), len(share) - 1)
        test.append(np.sort(shuffled[:n_test]))
        train.append(np.sort(shuffled[n_test:]))
    return Partition(train=train, test=test, fingerprint=source.fingerprint())


@dataclass
class ClientData:
    """One client's own data: what never leaves the client."""

    client_id: int
    train: ArrayDataset
    test: ArrayDataset

    def majority_class_rate(self) -> float:
        """Test accuracy of predicting the client's most frequent *training* label: a sanity floor."""
        return majority_class_rate(self.train.labels, self.test.labels, self.train.num_classes)


def majority_class_rate(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> float:
    majority = int(np.argmax(np.bincount(train_labels, minlength=num_classes)))
    return float(np.mean(test_labels == majority))


def client_labels(source: DataSource, partition: Partition, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's train and test labels, without copying its images out of the pool."""
    labels = source.private.labels
    return labels[partition.train[client_id]], labels[partition.test[client_id]]


def client_data(source: DataSource, partition: Partition, client_id: int) -> ClientData:
    return ClientData(
        client_id=client_id,
        train=source.private.subset(partition.train[client_id]),
        test=source.private.subset(partition.test[client_id]),
    )


def global_test_set(source: DataSource, partition: Partition) -> ArrayDataset:
    """The FAT-paper convention's test set: the dataset's official test split when it has one
    (CIFAR), else the union of every client's test split in pool order (digits, imagefolder)."""
    if source.official_test is not None:
        return source.official_test
    indices = np.sort(np.concatenate([np.asarray(t, dtype=np.int64) for t in partition.test]))
    return source.private.subset(indices)
