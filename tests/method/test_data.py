import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sylva_ray.base.config import DataConfig
from sylva_ray.base.seeding import numpy_rng
from sylva_ray.method.cifar import UnsafeDataFile
from sylva_ray.method.data import (
    DATASETS,
    PARTITIONERS,
    Partition,
    PartitionError,
    client_data,
    load_source,
    make_partition,
)


def _labels(n_per_class=50, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


@pytest.mark.parametrize("name", PARTITIONERS.names())
def test_partition_is_disjoint_complete_and_seeded(name):
    labels = _labels()
    cfg = DataConfig(num_clients=8, partition=name, alpha=0.3, shards_per_client=2, min_samples_per_client=10)
    parts = PARTITIONERS.get(name)(labels, cfg, numpy_rng(1, "p"))
    flat = np.concatenate(parts)
    assert len(parts) == 8
    assert len(flat) == len(np.unique(flat)) == len(labels)  # disjoint and complete
    assert min(len(p) for p in parts) >= cfg.min_samples_per_client
    again = PARTITIONERS.get(name)(labels, cfg, numpy_rng(1, "p"))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def _mean_classes_per_client(parts, labels):
    return np.mean([len(np.unique(labels[p])) for p in parts])


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _labels(100)

    def classes(alpha):
        cfg = DataConfig(num_clients=10, alpha=alpha)
        return _mean_classes_per_client(PARTITIONERS.get("dirichlet")(labels, cfg, numpy_rng(0, "p")), labels)

    iid = _mean_classes_per_client(
        PARTITIONERS.get("iid")(labels, DataConfig(num_clients=10), numpy_rng(0, "p")), labels
    )
    assert classes(0.05) < classes(1.0) < iid + 1e-9
    assert iid == 10


def test_shards_gives_at_most_k_classes():
    labels = _labels()
    cfg = DataConfig(num_clients=10, partition="shards", shards_per_client=2)
    parts = PARTITIONERS.get("shards")(labels, cfg, numpy_rng(0, "p"))
    assert max(len(np.unique(labels[p])) for p in parts) <= 2


def test_quantity_skew_varies_sizes_not_labels():
    labels = _labels(100)
    cfg = DataConfig(num_clients=10, partition="quantity", alpha=0.2)
    sizes = [len(p) for p in PARTITIONERS.get("quantity")(labels, cfg, numpy_rng(0, "p"))]
    assert max(sizes) > 3 * min(sizes)


@pytest.mark.parametrize("name", PARTITIONERS.names())
def test_impossible_partition_is_a_clear_error(name):
    labels = _labels(2, 5)  # 10 samples
    cfg = DataConfig(num_clients=4, partition=name, min_samples_per_client=5)
    with pytest.raises(PartitionError, match="num_clients"):
        PARTITIONERS.get(name)(labels, cfg, numpy_rng(0, "p"))


def test_digits_source_public_private_split():
    source = load_source(DataConfig(public_fraction=0.3))
    assert source.private.images.shape[1:] == (3, 8, 8)
    pixels = source.private.pixels()
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert len(np.unique(pixels.numpy())) == 17  # 0..16 grey levels kept exactly
    assert len(source.public) + len(source.private) == 1797
    assert len(source.public) == pytest.approx(0.3 * 1797, abs=1)


def test_client_splits_and_partition_file_round_trip(tmp_path):
    cfg = DataConfig(num_clients=5, alpha=0.5)
    source = load_source(cfg)
    partition = make_partition(source, cfg, seed=3)
    for cid in range(5):
        train, test = partition.train[cid], partition.test[cid]
        assert len(test) >= 1 and len(train) >= 1 and not set(train) & set(test)
    everything = np.concatenate(partition.train + partition.test)
    assert sorted(everything) == list(range(len(source.private)))
    partition.save(tmp_path / "partition.json")
    loaded = Partition.load(tmp_path / "partition.json", expected_fingerprint=source.fingerprint())
    data = client_data(source, loaded, 2)
    assert np.array_equal(data.train.labels, source.private.labels[partition.train[2]])
    other = load_source(DataConfig(name="synthetic"))
    with pytest.raises(PartitionError, match="fingerprint"):
        Partition.load(tmp_path / "partition.json", expected_fingerprint=other.fingerprint())


def test_majority_class_rate():
    cfg = DataConfig(num_clients=3, partition="shards", shards_per_client=1)
    source = load_source(cfg)
    data = client_data(source, make_partition(source, cfg, 0), 0)
    majority = np.argmax(data.train.class_counts())
    assert data.majority_class_rate() == pytest.approx(np.mean(data.test.labels == majority))


def _write_cifar(root: Path, which: str, n_train: int = 20, n_test: int = 10) -> None:
    """Tiny files in torchvision's python CIFAR format (the tests write their own data)."""
    rng = np.random.default_rng(0)
    if which == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        key = "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        sizes = [n_train // 5] * 5 + [n_test]
        meta_name, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
        classes = 10
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        key = "fine_labels"
        files, sizes = ["train", "test"], [n_train, n_test]
        meta_name, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}
        classes = 100
    for name, size in zip(files, sizes):
        batch = {
            "data": rng.integers(0, 256, size=(size, 3072), dtype=np.uint8),
            key: rng.integers(0, classes, size).tolist(),
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / meta_name, "wb") as handle:
        pickle.dump(meta, handle)


@pytest.mark.parametrize("which, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loader_reads_local_files(tmp_path, which, classes):
    _write_cifar(tmp_path, which)
    source = load_source(DataConfig(name=which, root=str(tmp_path), verify_checksums=False))
    assert source.private.images.shape == (20, 3, 32, 32)
    assert source.official_test is not None and len(source.official_test) == 10
    assert source.num_classes == classes
    assert 0 <= source.private.pixels().min() and source.private.pixels().max() <= 1
    with pytest.raises(UnsafeDataFile, match="md5 differs"):  # the official md5 sums reject our tiny files
        load_source(DataConfig(name=which, root=str(tmp_path), verify_checksums=True))


def test_cifar_missing_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="othing is downloaded") as caught:
        load_source(DataConfig(name="cifar10", root=str(tmp_path)))
    assert "download=True" not in str(caught.value) and "data_batch_1" in str(caught.value)


def _write_folder(root, sizes=((20, 24), (31, 17), (12, 12))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("owl", "cat", "dog"):
        (root / cls / "nested").mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            where = root / cls / ("nested" if i == 1 else "") / f"{i}.{'jpg' if i == 2 else 'png'}"
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(where)


def test_imagefolder_loader_gives_torchvisions_pixels_as_uint8(tmp_path):
    """The same files, order, labels and pixel values as torchvision's ImageFolder + Resize +
    ToTensor (the loader this project used before), held as uint8 (a quarter of the bytes)."""
    from torchvision import datasets, transforms

    _write_folder(tmp_path)
    source = load_source(DataConfig(name="imagefolder", root=str(tmp_path), image_size=12, cache_decoded=False))
    assert source.private.images.dtype == np.uint8 and source.private.images.shape == (9, 3, 12, 12)
    tfm = transforms.Compose([transforms.Resize((12, 12)), transforms.ToTensor()])
    reference = datasets.ImageFolder(str(tmp_path), transform=tfm)
    expected = np.stack([reference[i][0].numpy() for i in range(len(reference))])
    assert np.array_equal(source.private.pixels().numpy(), expected)
    assert source.private.labels.tolist() == reference.targets and source.num_classes == 3


def test_the_decoded_folder_is_cached_and_a_changed_file_is_decoded_again(tmp_path, monkeypatch):
    from PIL import Image

    from sylva_ray.method import image_folder

    root, cache = tmp_path / "images", tmp_path / "cache"
    _write_folder(root)
    first = image_folder.load_folder(root, 12, cache, progress=False)
    assert len(list((cache / "images").glob("*.npz"))) == 1
    decoded = []
    monkeypatch.setattr(image_folder, "decode_all", lambda *a, **k: decoded.append(1) or first[0])
    again = image_folder.load_folder(root, 12, cache, progress=False)
    assert not decoded and np.array_equal(again[0], first[0]) and again[2] == first[2]  # from the cache
    monkeypatch.undo()
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(root / "dog" / "0.png")  # one file changes
    changed = image_folder.load_folder(root, 12, cache, progress=False)
    assert len(list((cache / "images").glob("*.npz"))) == 2
    position = [p.relative_to(root).as_posix() for p in image_folder.index_folder(root).files].index("dog/0.png")
    assert not changed[0][position].any() and first[0][position].any()
    with np.load(next((cache / "images").glob("*.npz")), allow_pickle=False) as stored:  # arrays only
        assert set(stored.files) == {"images", "labels", "classes"}


def test_max_samples_decodes_only_the_kept_files(tmp_path, monkeypatch):
    from sylva_ray.method import image_folder

    _write_folder(tmp_path)
    full = load_source(DataConfig(name="imagefolder", root=str(tmp_path), image_size=12, cache_decoded=False))
    decoded: list[int] = []
    real = image_folder.decode_all
    monkeypatch.setattr(
        image_folder, "decode_all", lambda index, *a, **k: decoded.append(len(index)) or real(index, *a, **k)
    )
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=12, max_samples=4, cache_decoded=False)
    kept = load_source(cfg)
    assert decoded == [4] and len(kept.private) == 4
    keep = np.sort(np.random.default_rng(cfg.public_seed).choice(9, size=4, replace=False))  # as before: subsample
    assert np.array_equal(kept.private.images, full.private.images[keep])


def test_pixels_are_the_float_values_a_float_pool_would_hold():
    """digits' levels, 8-bit pixels: the float32 tensor a batch gets is bit for bit what dividing a
    whole float32 pool gave (the figures of every run stay what they were)."""
    from sylva_ray.method.data import ArrayDataset

    rng = np.random.default_rng(0)
    for top, scale in ((16, 16.0), (255, 255.0)):
        raw = rng.integers(0, top + 1, size=(7, 3, 5, 5)).astype(np.uint8)
        data = ArrayDataset(raw, np.arange(7) % 3, 3, scale)
        whole = raw.astype(np.float32) / scale
        assert torch.equal(data.pixels(), torch.from_numpy(whole))
        assert torch.equal(data.pixels(np.array([4, 1])), torch.from_numpy(whole[[4, 1]]))
        assert torch.equal(data[3][0], torch.from_numpy(whole[3]))
        assert data.subset(np.array([2, 5])).pixel_scale == scale


def test_a_source_is_loaded_once_per_process():
    cfg = DataConfig(num_clients=5)
    assert load_source(cfg) is load_source(DataConfig(num_clients=5))
    assert load_source(DataConfig(num_clients=6)) is not load_source(cfg)


def test_every_dataset_is_registered():
    assert set(DATASETS.names()) >= {"digits", "cifar10", "cifar100", "imagefolder", "synthetic"}
    with pytest.raises(ValueError, match="already registered"):
        DATASETS.register("digits")(lambda cfg: None)


def test_array_dataset_is_a_map_style_torch_dataset():
    """Without subclassing torch's Dataset (loading data needs no torch): indexing and DataLoader work."""
    from torch.utils.data import DataLoader

    from sylva_ray.method.data import ArrayDataset

    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.uniform(0, 1, (5, 3, 4, 4)).astype(np.float32), np.arange(5) % 3, 3)
    image, label = data[2]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 4, 4) and label == 2
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    images, labels = next(iter(DataLoader(data, batch_size=5)))
    assert torch.equal(images, torch.from_numpy(data.images)) and labels.tolist() == data.labels.tolist()


# --- Hugging Face datasets on disk (save_to_disk folders, parquet files), read with pyarrow ----------
HF_CLASSES = ["circle", "cross", "square"]


def write_hf(root, layout: str, damaged_row: int | None = None) -> list[bytes]:
    """A small dataset in the layout ``datasets`` writes: the Image feature's {bytes, path} struct,
    a ClassLabel in the schema's metadata; ``save_to_disk`` (Arrow stream + state.json) or parquet."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(1)
    encoded = []
    for _ in range(12):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(14, 10, 3), dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    if damaged_row is not None:
        encoded[damaged_row] = b"not a png"
    features = {"image": {"_type": "Image"}, "label": {"names": HF_CLASSES, "_type": "ClassLabel"}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": None} for b in encoded], type=image_type),
            "label": pa.array([i % 3 for i in range(12)], type=pa.int64()),
        }
    ).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    root.mkdir(parents=True)
    if layout == "parquet":
        pq.write_table(table, root / "train-00000-of-00001.parquet")
    else:
        with (
            pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as w,
        ):
            w.write_table(table)
        (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (root / "dataset_info.json").write_text(json.dumps({"features": features}))
    return encoded


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_a_hugging_face_dataset_on_disk_loads_as_uint8(tmp_path, layout):
    import io

    from PIL import Image

    encoded = write_hf(tmp_path / "ds", layout)
    source = load_source(DataConfig(name="hf", root=str(tmp_path / "ds"), image_size=8, cache_decoded=False))
    assert source.private.images.dtype == np.uint8 and source.private.images.shape == (12, 3, 8, 8)
    assert source.num_classes == 3 and source.private.labels.tolist() == [i % 3 for i in range(12)]
    first = np.asarray(Image.open(io.BytesIO(encoded[0])).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(source.private.images[0], first.transpose(2, 0, 1))
