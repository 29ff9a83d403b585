"""The data side: Fashion-MNIST, the benchmark sets from their official files, your own image folders, and the
frozen-backbone feature cache. Never imports a model.

Every image DataModule exposes what a model needs to adapt itself: ``in_channels``, ``image_size`` (square side),
``num_classes`` and ``classes``; its config carries the first three, so that model configs can read
``${data.in_channels}``, ``${data.image_size}`` and ``${data.num_classes}``.
"""

from cnnfeat.data.common import ImageDataModule, StandardizedImageDataModule
from cnnfeat.data.fashion_mnist import CLASSES, ENV_CACHE, ENV_DATA, FashionMNISTDataModule, default_cache_dir
from cnnfeat.data.feature_cache import FrozenFeatureDataModule
from cnnfeat.data.image_folder import ImageFolderDataModule
from cnnfeat.data.official import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    KMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
)

__all__ = [
    "CLASSES",
    "ENV_CACHE",
    "ENV_DATA",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "FashionMNISTDataModule",
    "FrozenFeatureDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "KMNISTDataModule",
    "MNISTDataModule",
    "SVHNDataModule",
    "StandardizedImageDataModule",
    "default_cache_dir",
]
