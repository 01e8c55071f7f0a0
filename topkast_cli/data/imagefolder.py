"""A folder of images: `root/train/<class>/*.jpg` and `root/val/<class>/*.jpg` (ImageNet's
layout once its validation images are sorted into class folders).

Standard ImageNet transforms: RandomResizedCrop + horizontal flip for training; resize to
image_size / crop_fraction, then a centre crop of image_size, for evaluation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from ..errors import UserError
from .base import DataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderData(DataModule):
    """Classes are the sub-folder names of train/ (sorted); val/ must have the same ones.
    `num_classes`, when set, is checked against the folder (null: take what is there)."""

    def __init__(
        self,
        root: str,
        num_classes: int | None = None,
        image_size: int = 224,
        crop_fraction: float = 0.875,
        augment: bool = True,
        mean: tuple = IMAGENET_MEAN,
        std: tuple = IMAGENET_STD,
        train_dir: str = "train",
        val_dir: str = "val",
        **loader,
    ):
        super().__init__(**loader)
        if not isinstance(root, str) or not root:
            raise UserError(f"dataset.root={root!r} must be a directory path")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
            raise UserError(f"dataset.num_classes={num_classes!r} must be an integer >= 2 (or null: from the folder)")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise UserError(f"dataset.image_size={image_size!r} must be an integer >= 8")
        if isinstance(crop_fraction, bool) or not isinstance(crop_fraction, (int, float)) or not 0 < crop_fraction <= 1:
            raise UserError(f"dataset.crop_fraction={crop_fraction!r} must be a number in (0, 1]")
        if not isinstance(augment, bool):
            raise UserError(f"dataset.augment={augment!r} must be true or false")
        if len(mean) != 3 or len(std) != 3:
            raise UserError("dataset.mean and dataset.std must have 3 values (RGB)")
        self.root, self.expected_classes, self.image_size = root, num_classes, image_size
        self.crop_fraction, self.augment, self.mean, self.std = crop_fraction, augment, tuple(mean), tuple(std)
        self.train_dir, self.val_dir = train_dir, val_dir
        self.random_train_transform = augment
        self.input_shape = (3, image_size, image_size)
        self.num_classes = num_classes

    def transforms(self, train: bool) -> v2.Compose:
        if train and self.augment:
            ops = [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            ops = [v2.Resize(round(self.image_size / self.crop_fraction), antialias=True), v2.CenterCrop(self.image_size)]
        return v2.Compose([*ops, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def _layout_error(self, problem: str) -> UserError:
        return UserError(
            f"dataset.root={self.root}: {problem}; expected {self.train_dir}/ and {self.val_dir}/ "
            "sub-folders with one folder of images per class"
        )

    def _load(self, root: Path, split: str, train: bool) -> ImageFolder:
        path = root / split
        if not path.is_dir():
            raise self._layout_error(f"no folder {path}")
        try:
            return ImageFolder(str(path), transform=self.transforms(train))
        except (FileNotFoundError, OSError) as e:  # no class folders, or no images in them
            first = str(e).strip().splitlines()[0]
            raise self._layout_error(f"{path}: {first}") from None

    def setup(self) -> "ImageFolderData":
        if self.train_set is not None:
            return self
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise self._layout_error(f"no such directory {root}")
        train, val = self._load(root, self.train_dir, True), self._load(root, self.val_dir, False)
        if train.classes != val.classes:
            only = sorted(set(train.classes) ^ set(val.classes))[:5]
            raise self._layout_error(f"{self.train_dir}/ and {self.val_dir}/ have different class folders (e.g. {', '.join(only)})")
        if self.expected_classes is not None and len(train.classes) != self.expected_classes:
            raise UserError(
                f"dataset.num_classes={self.expected_classes} but {root / self.train_dir} has {len(train.classes)} "
                "class folders; set dataset.num_classes=null to use the folder's classes"
            )
        self.train_set, self.val_set, self.num_classes = train, val, len(train.classes)
        return self
