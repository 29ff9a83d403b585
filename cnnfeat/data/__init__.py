"""The data side: the Fashion-MNIST DataModule and the frozen-backbone feature cache. Never imports a model."""

from cnnfeat.data.fashion_mnist import CLASSES, ENV_CACHE, ENV_DATA, FashionMNISTDataModule, default_cache_dir
from cnnfeat.data.feature_cache import FrozenFeatureDataModule

__all__ = ["CLASSES", "ENV_CACHE", "ENV_DATA", "FashionMNISTDataModule", "FrozenFeatureDataModule", "default_cache_dir"]
