"""LightningModules: the shared classifier base and the networks built on it (and the frozen AlexNet part that the
transfer classifier and the feature cache's config share)."""

from cnnfeat.models.alexnet import FrozenAlexNet, TransferClassifier
from cnnfeat.models.classifier import ImageClassifier
from cnnfeat.models.small_cnn import SmallCNN

__all__ = ["FrozenAlexNet", "ImageClassifier", "SmallCNN", "TransferClassifier"]
