"""Datasets: each config in conf/dataset/ names a DataModule class with `_target_`.

mnist1d.py (generated locally), digits.py (scikit-learn's 8x8 digits), synthetic.py
(random tensors for speed runs), vision.py (torchvision's CIFAR-10/100, MNIST,
Fashion-MNIST), imagefolder.py (ImageNet and any train/ + val/ folder of class folders); for next-token
prediction, text.py (token windows, any UTF-8 file) and corpora.py (enwik8, text8, WikiText-103).
A data module tells the model what it needs (`DataModule.model_kwargs`).
"""

from .base import DataModule, EpochSampler, SeededSamples

__all__ = ["DataModule", "EpochSampler", "SeededSamples"]
