"""Datasets by name, and partitioners that split the private pool among clients.

Images are NCHW. Decoded pixels stay integers (uint8) from the loader to the client actor, a
quarter of float32's bytes in the main process, in Ray's object store and in each actor;
``ArrayDataset.pixels`` turns the rows a batch uses into float32 in [0, 1] (``pixel_scale``: 255
for 8-bit images, 16 for digits' grey levels, 1 for data that is float already). Attacks measure
eps in that [0, 1] space; the model resizes and normalises internally. Nothing is downloaded:
``digits`` ships with scikit-learn, ``cifar10``/``cifar100``/``imagefolder`` read a local folder,
``synthetic`` is generated.

A dataset is one decorated loader, ``@DATASETS.register(name, **facts)``: the facts
(``DatasetSpec``) say whether it reads ``data.root``, carves a public slice for the embedded
pre-training, its inputs when its files are elsewhere, and how to size its pool before decoding.

Data flow: ``load_source(cfg)`` -> ``DataSource`` (public slice for pre-training, private pool,
optional official test set) -> ``make_partition(labels, cfg, seed)`` -> ``Partition`` (per-client
train/test indices into the private pool, saved as JSON in the run directory) ->
``client_data(source, partition, cid)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np

from sylva_ray.base.config import DataConfig
from sylva_ray.base.registry import Registry
from sylva_ray.base.seeding import numpy_rng
from sylva_ray.base.storage import atomic_write_text, default_cache_dir
from sylva_ray.method.cifar import read_split
from sylva_ray.method.heterogeneity import feature_distances, heterogeneity
from sylva_ray.method.shift import shift_client_images, shift_record

if TYPE_CHECKING:  # tensors are made where a batch is: loading and splitting data need no torch
    import torch

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
class ArrayDataset:
    """Images (N, C, H, W) and integer labels (N,); a map-style dataset for torch (``ds[i]`` is
    ``(image tensor in [0, 1], label)``, so ``DataLoader(ds)`` works) without subclassing torch's
    ``Dataset``: the process that launches a Ray run loads and splits data without importing torch.

    ``images`` holds what was decoded: uint8 pixels (or digits' 0..16 levels) with ``pixel_scale``
    saying what divides them into [0, 1], or float32 already in [0, 1] (``pixel_scale=1``). Code
    that computes slices rows first and converts with ``pixels``: the same float32 values a float
    pool would hold, made only for the rows a batch uses.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    pixel_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"expected images (N,C,H,W) and labels (N,), got {self.images.shape} and {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pixels(index), int(self.labels[index])

    def pixels(self, index: Union[int, slice, np.ndarray, torch.Tensor] = slice(None)) -> torch.Tensor:
        """The images at ``index`` as a float32 tensor in [0, 1]."""
        return unit_pixels(self.images[index], self.pixel_scale)

    def subset(self, indices: np.ndarray) -> "ArrayDataset":
        return ArrayDataset(self.images[indices], self.labels[indices], self.num_classes, self.pixel_scale)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


def unit_pixels(images: np.ndarray, pixel_scale: float) -> torch.Tensor:
    """Stored pixels as float32 in [0, 1]: ``images / pixel_scale`` in float32, exactly what a pool
    decoded to float32 would hold (one correctly rounded division either way)."""
    import torch

    if pixel_scale == 1.0 and images.dtype == np.float32:
        return torch.from_numpy(np.ascontiguousarray(images))
    return torch.from_numpy(images.astype(np.float32) / np.float32(pixel_scale))


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


@dataclass(frozen=True)
class KnownInputs:
    """What a dataset's files would say, known without them: the memory and clock estimates use it
    on a machine that does not hold the files."""

    image_shape: tuple[int, int, int]
    num_classes: int
    #: training images (classes balanced)
    train_size: int


@dataclass(frozen=True)
class PoolSize:
    """The private pool a loader will decode: images kept and their bytes as uint8."""

    images: int
    decoded_bytes: int


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its loader and what the checks and estimates ask about it.

    ``reads_root``: it reads a local folder or file, ``data.root`` (required; nothing is downloaded).
    ``public_slice``: the loader carves the seeded public slice (``data.public_fraction``) that
    ``model.pretrained='embedded'`` pre-trains on.
    ``known``: its inputs when its files are not on this machine (None: load it to know).
    ``pool_size``: sizes the pool from an index before any image is decoded (the pre-start check
    refuses a pool that cannot fit); returns a ``PoolSize`` or a problem naming the field to change.
    """

    load: DatasetLoader
    reads_root: bool = False
    public_slice: bool = False
    known: Optional[KnownInputs] = None
    pool_size: Optional[Callable[[DataConfig], Union[PoolSize, str]]] = None


DATASETS: Registry[DatasetSpec] = Registry("dataset", DatasetSpec)


def known_inputs(name: str) -> Optional[KnownInputs]:
    """The dataset's inputs known without its files (None: an unknown name, or load it to know)."""
    spec = DATASETS.find(name)
    return spec.known if spec is not None else None


def _split_public(
    images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: DataConfig, name: str, pixel_scale: float = 1.0
) -> DataSource:
    """Carve the seeded public slice (pre-training only) out of a dataset; the rest is private."""
    from sklearn.model_selection import train_test_split

    dataset = ArrayDataset(images, labels.astype(np.int64), num_classes, pixel_scale)
    if cfg.public_fraction <= 0:
        return DataSource(name=name, private=dataset)
    private_idx, public_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.public_fraction, stratify=labels, random_state=cfg.public_seed
    )
    return DataSource(
        name=name, private=dataset.subset(np.sort(private_idx)), public=dataset.subset(np.sort(public_idx))
    )


@DATASETS.register("digits", public_slice=True)
def load_digits_source(cfg: DataConfig) -> DataSource:
    """scikit-learn's 1,797 handwritten digits, kept at 8x8, grey repeated to 3 channels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    levels = bunch.images.astype(np.uint8)  # (N, 8, 8): whole grey levels 0..16, stored as such
    images = np.repeat(levels[:, None, :, :], 3, axis=1)
    return _split_public(images, bunch.target, 10, cfg, "digits", pixel_scale=DIGITS_MAX_LEVEL)


@DATASETS.register("synthetic", public_slice=True)
def load_synthetic_source(cfg: DataConfig) -> DataSource:
    """Class prototypes plus noise: learnable in seconds, for tests and benchmarks."""
    rng = np.random.default_rng(cfg.public_seed)
    size, classes = cfg.synthetic_image_size, cfg.synthetic_num_classes
    prototypes = rng.uniform(0.0, 1.0, size=(classes, 3, size, size)).astype(np.float32)
    labels = np.arange(cfg.synthetic_num_samples) % classes
    rng.shuffle(labels)
    noise = rng.normal(0.0, SYNTHETIC_NOISE_STD, size=(len(labels), 3, size, size)).astype(np.float32)
    images = np.clip(prototypes[labels] + noise, 0.0, 1.0).astype(np.float32)  # continuous: float32 as made
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
        return ArrayDataset(images, labels, classes, UINT8_MAX)

    return DataSource(name=which, private=to_arrays(True), official_test=to_arrays(False))


@DATASETS.register("cifar10", reads_root=True, known=KnownInputs((3, 32, 32), 10, 50_000))
def load_cifar10_source(cfg: DataConfig) -> DataSource:
    return _cifar_source(cfg, "cifar10")


@DATASETS.register("cifar100", reads_root=True, known=KnownInputs((3, 32, 32), 100, 50_000))
def load_cifar100_source(cfg: DataConfig) -> DataSource:
    return _cifar_source(cfg, "cifar100")


def _imagefolder_pool(cfg: DataConfig) -> Union[PoolSize, str]:
    """An ImageFolder's pool from its index (class folders and image files)."""
    from sylva_ray.method.image_folder import index_folder

    index = index_folder(cfg.root or "")
    if len(index) == 0:
        return f"data.root = {cfg.root!r}: no images in class subfolders (expected root/<class>/<image>)"
    used = min(len(index), cfg.max_samples or len(index))
    need = cfg.num_clients * cfg.min_samples_per_client
    if used < need:
        return (
            f"data.num_clients={cfg.num_clients} x data.min_samples_per_client={cfg.min_samples_per_client} "
            f"= {need} samples needed, but {cfg.root} holds {len(index)} images"
            + (f" (data.max_samples={cfg.max_samples} kept)" if used < len(index) else "")
        )
    return PoolSize(used, index.decoded_bytes(cfg.image_size) * used // len(index))


@DATASETS.register("imagefolder", reads_root=True, pool_size=_imagefolder_pool)
def load_imagefolder_source(cfg: DataConfig) -> DataSource:
    """Any ``root/<class>/<image>`` tree, resized to ``data.image_size``, held as uint8
    (``method.image_folder``: parallel decoding, damaged files named, a cache of the arrays).
    With ``data.max_samples`` only the kept files are decoded (the same seeded choice as below)."""
    from sylva_ray.method.image_folder import load_folder

    images, labels, classes = load_folder(
        cfg.root or "",
        cfg.image_size,
        default_cache_dir() if cfg.cache_decoded else None,
        choose_rows=lambda count: max_samples_keep(count, cfg),
    )
    return DataSource(name="imagefolder", private=ArrayDataset(images, labels, len(classes), UINT8_MAX))


def _hf_pool(cfg: DataConfig) -> Union[PoolSize, str]:
    """A Hugging Face dataset's pool from its table's rows (its files and columns checked)."""
    from sylva_ray.method.hf_data import read_table
    from sylva_ray.method.image_folder import CHANNELS, DamagedImage

    try:
        rows = len(read_table(cfg.root or "", cfg.hf_split, (cfg.image_column, cfg.label_column)))
    except (FileNotFoundError, DamagedImage) as exc:
        return str(exc)
    used = min(rows, cfg.max_samples or rows)
    return PoolSize(used, used * CHANNELS * cfg.image_size * cfg.image_size)


@DATASETS.register("hf", reads_root=True, pool_size=_hf_pool)
def load_hf_source(cfg: DataConfig) -> DataSource:
    """A Hugging Face dataset saved to disk or as parquet (``method.hf_data``), held as uint8."""
    from sylva_ray.method.hf_data import load_hf

    images, labels, classes = load_hf(
        cfg.root or "",
        cfg.hf_split,
        cfg.image_column,
        cfg.label_column,
        cfg.image_size,
        default_cache_dir() if cfg.cache_decoded else None,
        choose_rows=lambda count: max_samples_keep(count, cfg),
    )
    return DataSource(name="hf", private=ArrayDataset(images, labels, len(classes), UINT8_MAX))


def max_samples_keep(pool_size: int, cfg: DataConfig) -> Optional[np.ndarray]:
    """The seeded subsample ``data.max_samples`` keeps of a pool of ``pool_size`` (None: all)."""
    if cfg.max_samples is None or cfg.max_samples >= pool_size:
        return None
    rng = np.random.default_rng(cfg.public_seed)
    return np.sort(rng.choice(pool_size, size=cfg.max_samples, replace=False))


#: The last source loaded in this process, by its config: the checks load the data the run will
#: use, and the run takes it from here instead of reading and decoding it again.
_LOADED: dict[str, DataSource] = {}


def load_source(cfg: DataConfig) -> DataSource:
    """Load the dataset named in the config and apply ``max_samples`` (seeded subsample); a second
    call with the same config in this process returns the same (read-only) source."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    if key in _LOADED:
        return _LOADED[key]
    source = DATASETS.get(cfg.name).load(cfg)
    keep = max_samples_keep(len(source.private), cfg)
    if keep is not None:
        source.private = source.private.subset(keep)
    log.info(
        "dataset %s: %d private, %d public samples, %d classes",
        source.name,
        len(source.private),
        len(source.public) if source.public else 0,
        source.num_classes,
    )
    _LOADED.clear()  # one source at a time: a long-lived process must not pile them up
    _LOADED[key] = source
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
    #: ``method.heterogeneity.heterogeneity`` of the split (None in partitions written before it was kept).
    heterogeneity: Optional[dict[str, Any]] = None
    #: ``method.shift.shift_record``: each client's feature-shift domain (None: no shift).
    shift: Optional[dict[str, Any]] = None

    @property
    def num_clients(self) -> int:
        return len(self.train)

    def to_json(self) -> str:
        return json.dumps(
            {
                "fingerprint": self.fingerprint,
                **({"heterogeneity": self.heterogeneity} if self.heterogeneity is not None else {}),
                **({"shift": self.shift} if self.shift is not None else {}),
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
            heterogeneity=payload.get("heterogeneity"),
            shift=payload.get("shift"),
        )


def make_partition(source: DataSource, cfg: DataConfig, seed: int, describe: bool = True) -> Partition:
    """Split the private pool among clients, then each client's share into its train/test split;
    with ``data.shift``, deal the clients to their feature-shift domains (``method.shift``).
    ``describe``: measure the clients' image distances under a shift (a pass over every image; the
    pre-start check, which only asks whether the split can be made, leaves it out)."""
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
    shift = shift_record(
        cfg.shift,
        cfg.shift_strength,
        cfg.shift_domains,
        cfg.shift_assignment,
        seed,
        cfg.num_clients,
        numpy_rng(seed, "shift-domains"),
    )
    partition = Partition(train=train, test=test, fingerprint=source.fingerprint(), shift=shift)
    info = heterogeneity(source.private.labels, shares, source.private.num_classes)
    if shift is not None and describe:
        features = feature_distances(
            [client_data(source, partition, c) for c in range(partition.num_clients)], source.private.num_classes
        )
        for client, distance in zip(info["clients"], features["feature_distance"]):
            client["feature_distance"] = distance
            client["domain"] = shift["client_domain"][client["client"]]
        info["mean_feature_distance"] = features["mean_feature_distance"]
    partition.heterogeneity = info
    return partition


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
    """A client's train and test splits, through its feature-shift domain when the partition has one."""
    return ClientData(
        client_id=client_id,
        train=_client_split(source, partition, client_id, "train"),
        test=_client_split(source, partition, client_id, "test"),
    )


def _client_split(source: DataSource, partition: Partition, client_id: int, split: str) -> ArrayDataset:
    indices = (partition.train if split == "train" else partition.test)[client_id]
    rows = source.private.subset(indices)
    if partition.shift is None:
        return rows
    images, scale = shift_client_images(rows.images, rows.pixel_scale, partition.shift, client_id, split)
    return ArrayDataset(images, rows.labels, rows.num_classes, scale)


def global_test_set(source: DataSource, partition: Partition) -> ArrayDataset:
    """The FAT-paper convention's test set: the dataset's official test split when it has one
    (CIFAR), else the union of every client's test split in pool order (digits, imagefolder);
    under a feature shift, each client's test images as its domain sees them, in the same pool
    order, so that the first samples (the attacked subsets) mix every client as they do without a
    shift (an official test split belongs to no domain and stays as it is)."""
    if source.official_test is not None:
        return source.official_test
    indices = np.concatenate([np.asarray(t, dtype=np.int64) for t in partition.test])
    if partition.shift is None:
        return source.private.subset(np.sort(indices))
    by_client = concatenate([client_data(source, partition, c).test for c in range(partition.num_clients)])
    return by_client.subset(np.argsort(indices, kind="stable"))


def concatenate(parts: list[ArrayDataset]) -> ArrayDataset:
    """One dataset of several (a pooled training set, a global test set): float32 in [0, 1] unless
    every part shares one stored scale and dtype."""
    scales = {p.pixel_scale for p in parts}
    dtypes = {p.images.dtype for p in parts}
    if len(scales) == 1 and len(dtypes) == 1:
        images, scale = np.concatenate([p.images for p in parts]), parts[0].pixel_scale
    else:
        images = np.concatenate([p.images.astype(np.float32) / np.float32(p.pixel_scale) for p in parts])
        scale = 1.0
    return ArrayDataset(images, np.concatenate([p.labels for p in parts]), parts[0].num_classes, scale)
