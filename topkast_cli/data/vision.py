"""torchvision's small image datasets: CIFAR-10/100, MNIST, Fashion-MNIST.

Nothing is downloaded unless the user asks (`download: true`); data missing under `root`
is a one-line UserError that says where it was looked for and how to fix it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torchvision.transforms import v2

from ..errors import UserError
from .base import DataModule


class TorchvisionImages(DataModule):
    """A torchvision dataset class with `train`/`download` arguments, normalised, with the
    usual light augmentation on the train split when `augment` is on."""

    dataset_class: type
    name: str  # for messages
    folder: str  # what torchvision looks for under root
    mean: tuple
    std: tuple
    crop_padding = 4
    flip = True

    def __init__(self, root: str = "~/.cache/topkast", download: bool = False, augment: bool = True, **loader):
        super().__init__(**loader)
        for key, value in (("download", download), ("augment", augment)):
            if not isinstance(value, bool):
                raise UserError(f"dataset.{key}={value!r} must be true or false")
        if not isinstance(root, str) or not root:
            raise UserError(f"dataset.root={root!r} must be a directory path")
        self.root, self.download, self.augment = root, download, augment
        self.random_train_transform = augment

    def transforms(self, train: bool) -> v2.Compose:
        ops = [v2.ToImage()]
        if train and self.augment:
            ops.append(v2.RandomCrop(self.input_shape[-1], padding=self.crop_padding))
            if self.flip:
                ops.append(v2.RandomHorizontalFlip())
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(ops)

    def _load(self, root: Path, train: bool):
        try:
            return self.dataset_class(str(root), train=train, transform=self.transforms(train), download=self.download)
        except (OSError, RuntimeError) as e:  # torchvision: missing/corrupt files, failed download
            where = root / self.folder
            if self.download:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"dataset.root={self.root}: could not download {self.name} to {where}: {reason}") from None
            raise UserError(
                f"dataset.root={self.root}: {self.name} not found (or incomplete) at {where}; "
                f"point dataset.root at the folder that holds {self.folder}/, or set dataset.download=true"
            ) from None

    def setup(self) -> "TorchvisionImages":
        if self.train_set is None:
            root = Path(self.root).expanduser()
            self.train_set, self.val_set = self._load(root, True), self._load(root, False)
        return self


class CIFAR10(TorchvisionImages):
    """50k train / 10k test 32x32 colour images, 10 classes."""

    dataset_class = torchvision.datasets.CIFAR10
    name, folder = "CIFAR-10", "cifar-10-batches-py"
    num_classes, input_shape = 10, (3, 32, 32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100(TorchvisionImages):
    """50k train / 10k test 32x32 colour images, 100 classes."""

    dataset_class = torchvision.datasets.CIFAR100
    name, folder = "CIFAR-100", "cifar-100-python"
    num_classes, input_shape = 100, (3, 32, 32)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class MNIST(TorchvisionImages):
    """60k train / 10k test 28x28 grey digits. Augmentation (off by default): random crop
    with 2-pixel padding, no flip (digits are not mirror-symmetric)."""

    dataset_class = torchvision.datasets.MNIST
    name, folder = "MNIST", "MNIST/raw"
    num_classes, input_shape = 10, (1, 28, 28)
    mean, std = (0.1307,), (0.3081,)
    crop_padding, flip = 2, False


class FashionMNIST(TorchvisionImages):
    """60k train / 10k test 28x28 grey clothing images. Augmentation (off by default):
    random crop with 2-pixel padding and horizontal flip."""

    dataset_class = torchvision.datasets.FashionMNIST
    name, folder = "Fashion-MNIST", "FashionMNIST/raw"
    num_classes, input_shape = 10, (1, 28, 28)
    mean, std = (0.2860,), (0.3530,)
    crop_padding, flip = 2, True
