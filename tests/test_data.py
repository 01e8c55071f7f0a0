"""Dataset registry: every config instantiates without touching the disk and builds on local
data (files in torchvision's formats and image folders written here; nothing downloaded);
clear errors for missing data and wrong layouts; synthetic/digits determinism; exact
mid-epoch resume of the train loader; short training runs."""

import os
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import make_config, run_topkast
from PIL import Image

import topkast_cli
from topkast_cli.config import instantiate
from topkast_cli.data import DataModule
from topkast_cli.errors import UserError
from topkast_cli.commands.train import train

DATASET_DIR = Path(topkast_cli.__file__).parent / "conf" / "dataset"
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # one colour per class in the image folders


# ------------------------------------------------------------------ local data writers
def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=(4, 2)) -> Path:
    """root/{train,val}/<class>/*.png; class i's images are COLORS[i] plus a little noise,
    in varied sizes (RGB and grey-scale files alike)."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = 40 + 3 * i, 50 - 2 * i
                pixels = np.clip(np.array(COLORS[c]) + rng.integers(-8, 8, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (MNIST's format): magic 0x08 (uint8) + ndim, big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, n_train=64, n_test=32) -> dict:
    rng = np.random.default_rng(1)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        data[prefix] = (images, labels)
    return data


def write_cifar(root: Path, cls, n_per_file=8) -> dict:
    """CIFAR's python pickles, as torchvision reads them (checksums aside)."""
    rng = np.random.default_rng(2)
    classes = 10 if cls is torchvision.datasets.CIFAR10 else 100
    label_key = "labels" if classes == 10 else "fine_labels"
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    data = {}
    for name, _ in cls.train_list + cls.test_list:
        images, labels = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8), rng.integers(0, classes, n_per_file)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images, label_key: labels.tolist()}, f)
        data[name] = (images, labels)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"c{i}" for i in range(classes)]}, f)
    return data


@pytest.fixture
def no_cifar_checksums(monkeypatch):
    """The fake pickles cannot match CIFAR's md5 sums: check presence only."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def prepare(name: str, root: Path) -> list[str]:
    """Write local data for dataset `name` under root; the overrides that point at it."""
    small = ["dataset.num_workers=0", "dataset.batch_size=4"]
    if name in ("mnist", "fashion_mnist"):
        write_mnist(root, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name])
    elif name in ("cifar10", "cifar100"):
        write_cifar(root, {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name])
    elif name in ("imagefolder", "imagenet"):
        write_image_folder(root)
        small += ["dataset.image_size=32", "dataset.num_classes=3"]
    elif name == "mnist1d":
        return ["dataset.num_samples=1000", *small]  # generated into the session's cache
    elif name in ("synthetic", "digits"):
        return small
    return [f"dataset.root={root}", *small]


def dataset(overrides) -> DataModule:
    return instantiate(make_config(overrides).dataset, "dataset")


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


# ------------------------------------------------------------------------ registry
ALL = ["cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "imagenet", "mnist", "mnist1d", "synthetic"]


TEXT = ["enwik8", "text8", "textfile", "wikitext103"]  # next-token data: tests/test_language_model.py


def test_every_dataset_config_is_covered():
    assert sorted(p.stem for p in DATASET_DIR.glob("*.yaml")) == sorted(ALL + TEXT)


@pytest.mark.parametrize("name", ALL)
def test_config_instantiates_without_touching_the_disk(name, tmp_path):
    absent = tmp_path / "absent"
    extra = [f"dataset.root={absent}"] if name not in ("synthetic", "digits") else []
    data = dataset([f"dataset={name}", *extra])
    assert isinstance(data, DataModule) and data.train_set is None
    assert len(data.input_shape) in (2, 3)
    assert not absent.exists()


@pytest.mark.parametrize("name", ALL)
def test_dataset_builds_on_local_data(name, tmp_path, no_cifar_checksums):
    data = dataset([f"dataset={name}", *prepare(name, tmp_path)]).setup()
    for loader in (data.train_loader(0, seed=0), data.eval_loader("val")):
        x, y = next(iter(loader))
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == tuple(data.input_shape)
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < data.num_classes
    assert data.steps_per_epoch == len(data.train_set) // 4


# ------------------------------------------------------------- torchvision's formats
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_files_are_read_and_normalised(name, folder, tmp_path):
    raw = write_mnist(tmp_path, folder)
    data = dataset([f"dataset={name}", f"dataset.root={tmp_path}"]).setup()
    assert (len(data.train_set), len(data.val_set)) == (64, 32)
    images, labels = raw["t10k"]
    x, y = data.val_set[5]
    expected = (torch.tensor(images[5], dtype=torch.float32) / 255 - data.mean[0]) / data.std[0]
    assert torch.allclose(x[0], expected, atol=1e-5) and y == labels[5]


def test_cifar_augments_train_only(tmp_path, no_cifar_checksums):
    raw = write_cifar(tmp_path, torchvision.datasets.CIFAR10)
    data = dataset(["dataset=cifar10", f"dataset.root={tmp_path}"]).setup()
    assert (len(data.train_set), len(data.val_set)) == (40, 8)
    images, labels = raw["test_batch"]
    mean, std = torch.tensor(data.mean)[:, None, None], torch.tensor(data.std)[:, None, None]
    expected = (torch.tensor(images[3]).view(3, 32, 32).float() / 255 - mean) / std
    x, y = data.val_set[3]
    assert torch.allclose(x, expected, atol=1e-5) and y == labels[3]
    torch.manual_seed(0)
    views = [data.train_set[0][0] for _ in range(8)]  # random crops/flips of one image
    assert any(not torch.equal(views[0], v) for v in views[1:])
    plain = dataset(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.augment=false"]).setup()
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])


@pytest.mark.parametrize("name, what, where", [
    ("cifar10", "CIFAR-10", "cifar-10-batches-py"),
    ("cifar100", "CIFAR-100", "cifar-100-python"),
    ("mnist", "MNIST", "MNIST/raw"),
    ("fashion_mnist", "Fashion-MNIST", "FashionMNIST/raw"),
])
def test_missing_data_names_root_path_and_fix(name, what, where, tmp_path):
    data = dataset([f"dataset={name}", f"dataset.root={tmp_path}"])
    with pytest.raises(UserError) as e:
        data.setup()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"dataset.root={tmp_path}: {what} not found")
    assert str(tmp_path / where) in message and "dataset.download=true" in message


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    data = dataset(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=true"])
    with pytest.raises(UserError, match="could not download CIFAR-10 to .*network is unreachable"):
        data.setup()


# -------------------------------------------------------------------- image folders
def test_image_folder_classes_labels_and_transforms(tmp_path):
    root = write_image_folder(tmp_path / "images")
    data = dataset(["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=24", "dataset.num_workers=0"]).setup()
    assert data.num_classes == 3 and data.input_shape == (3, 24, 24)
    assert (len(data.train_set), len(data.val_set)) == (12, 6)
    mean = torch.tensor(data.mean)[:, None, None]
    std = torch.tensor(data.std)[:, None, None]
    for x, y in data.val_set:  # label = the class whose colour the image has
        colour = (x * std + mean).mean((1, 2)) * 255
        assert int(torch.argmax(colour)) == int(torch.argmax(torch.tensor(COLORS[y])))
    assert torch.equal(data.val_set[0][0], data.val_set[0][0])  # eval: deterministic
    torch.manual_seed(0)
    assert any(not torch.equal(data.train_set[0][0], data.train_set[0][0]) for _ in range(8))  # train: random crops


def test_imagenet_checks_its_class_count(tmp_path):
    root = write_image_folder(tmp_path / "imagenet")
    with pytest.raises(UserError, match=r"dataset.num_classes=1000 but .* has 3 class folders; set dataset.num_classes=null"):
        dataset(["dataset=imagenet", f"dataset.root={root}"]).setup()
    data = dataset(["dataset=imagenet", f"dataset.root={root}", "dataset.num_classes=null"]).setup()
    assert data.num_classes == 3 and data.input_shape == (3, 224, 224)


def flatten(folder: Path) -> None:
    """Images straight in `folder`, no class sub-folders."""
    for image in list(folder.glob("*/*.png")):
        image.rename(folder / f"{image.parent.name}-{image.name}")
    for sub in folder.iterdir():
        if sub.is_dir():
            sub.rmdir()


@pytest.mark.parametrize("damage, problem", [
    (lambda root: root.rename(root.with_name("moved")), "no such directory"),
    (lambda root: (root / "val").rename(root / "valid"), "no folder .*val"),
    (lambda root: [p.unlink() for p in (root / "train").rglob("*.png")], "train: Found no valid file"),
    (lambda root: (root / "val" / "fox").rename(root / "val" / "wolf"), "different class folders \\(e.g. fox, wolf\\)"),
    (lambda root: flatten(root / "train"), "Couldn't find any class folder"),
])
def test_wrong_image_folder_layout_is_one_line(tmp_path, damage, problem):
    root = write_image_folder(tmp_path / "images")
    damage(root)
    with pytest.raises(UserError, match=f"^dataset.root={root}: .*{problem}") as e:
        dataset(["dataset=imagefolder", f"dataset.root={root}"]).setup()
    assert "\n" not in str(e.value) and "one folder of images per class" in str(e.value)


def test_imagefolder_needs_a_root():
    with pytest.raises(UserError, match="root"):
        dataset(["dataset=imagefolder"])


# ----------------------------------------------------------------- synthetic, digits
def test_synthetic_is_deterministic_per_seed():
    a = dataset(["dataset=synthetic", "dataset.input_shape=[2,5,5]", "dataset.num_classes=4"]).setup()
    b = dataset(["dataset=synthetic", "dataset.input_shape=[2,5,5]", "dataset.num_classes=4"]).setup()
    c = dataset(["dataset=synthetic", "dataset.input_shape=[2,5,5]", "dataset.num_classes=4", "dataset.seed=1"]).setup()
    assert a.input_shape == (2, 5, 5) and a.num_classes == 4
    for i in (0, 7, 255):
        assert torch.equal(a.train_set[i][0], b.train_set[i][0]) and a.train_set[i][1] == b.train_set[i][1]
        assert not torch.equal(a.train_set[i][0], c.train_set[i][0])
        assert a.train_set[i][0].shape == (2, 5, 5)
    assert not torch.equal(a.train_set[0][0], a.val_set[0][0])
    labels = a.train_set.labels
    assert labels.min() >= 0 and labels.max() == 3 and not torch.equal(labels, c.train_set.labels)


@pytest.mark.parametrize("override, key", [
    ("dataset.input_shape=[3,0,4]", "dataset.input_shape"),
    ("dataset.num_classes=1", "dataset.num_classes"),
    ("dataset.train_size=0", "dataset.train_size"),
])
def test_synthetic_checks_its_options(override, key):
    with pytest.raises(UserError, match=f"^{key}="):
        dataset(["dataset=synthetic", override])


def test_digits_split_is_stratified_and_deterministic():
    a = dataset(["dataset=digits"]).setup()
    b = dataset(["dataset=digits"]).setup()
    c = dataset(["dataset=digits", "dataset.seed=1"]).setup()
    assert (len(a.train_set), len(a.val_set)) == (1437, 360)
    x, y = a.train_set.tensors
    assert x.shape[1:] == (1, 8, 8) and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(x, b.train_set.tensors[0]) and not torch.equal(x, c.train_set.tensors[0])
    assert torch.bincount(a.val_set.tensors[1], minlength=10).min() >= 35  # every class ~36 times


# ------------------------------------------------------------------ resumable epochs
@pytest.mark.parametrize("name", ["synthetic", "digits", "cifar10"])
def test_train_loader_resumes_mid_epoch_exactly(name, tmp_path, no_cifar_checksums):
    """Also with random augmentation (CIFAR): it is seeded per sample, not by the global RNG."""
    overrides = prepare(name, tmp_path) + ["dataset.batch_size=8"]
    if name == "synthetic":
        overrides.append("dataset.train_size=40")
    data = dataset([f"dataset={name}", *overrides]).setup()
    rng = torch.get_rng_state()
    full = batches(data.train_loader(epoch=2, seed=5))
    assert torch.equal(torch.get_rng_state(), rng)  # loading leaves the global RNG alone
    assert len(full) == data.steps_per_epoch
    for start in (1, len(full) // 2, len(full) - 1):
        torch.manual_seed(start)  # whatever the global RNG state at resume
        rest = batches(data.train_loader(epoch=2, seed=5, start_batch=start))
        assert len(rest) == len(full) - start
        for (x, y), (x2, y2) in zip(full[start:], rest):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    other_epoch = batches(data.train_loader(epoch=3, seed=5))
    assert not torch.equal(full[0][1], other_epoch[0][1])


def test_augmentation_does_not_depend_on_workers(tmp_path, no_cifar_checksums):
    write_cifar(tmp_path, torchvision.datasets.CIFAR10)
    data = dataset(["dataset=cifar10", f"dataset.root={tmp_path}", "dataset.batch_size=8", "dataset.num_workers=0"]).setup()
    alone = batches(data.train_loader(epoch=0, seed=1, start_batch=1))
    data.num_workers = 2
    with_workers = batches(data.train_loader(epoch=0, seed=1, start_batch=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(alone, with_workers)) and len(alone) == len(with_workers) == 4


# ------------------------------------------------------------------------ training
FAST = ["trainer.progress=false", "trainer.eval_every=null", "trainer.checkpoint_every=null", "trainer.log_every=50"]


def test_mlp_learns_digits(tmp_path):
    cfg = make_config(["model=mlp", "dataset=digits", "sparsity=dense", "optimizer.lr=3e-3", "trainer.max_steps=150", *FAST])
    summary = train(cfg, tmp_path)
    assert summary["final"]["acc1"] > 90


def test_resnet18_trains_on_an_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "images")
    cfg = make_config([
        "model=resnet18", "dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=32",
        "dataset.batch_size=4", "dataset.num_workers=0", "trainer.max_steps=2", *FAST,
    ])
    (tmp_path / "run").mkdir()
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["step"] == 2
    assert summary["density"]["sparse_density"] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.slow
def test_resnet50_synthetic_speed_run_from_the_command_line(tmp_path):
    result = run_topkast(["train", "model=resnet50", "dataset=synthetic", "trainer.max_steps=2"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = tmp_path.glob("runs/train/*/summary.json")
    assert '"status": "completed"' in summary.read_text()
