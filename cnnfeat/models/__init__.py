"""LightningModules: the shared classifier base and the networks built on it."""

from cnnfeat.models.alexnet import TransferClassifier
from cnnfeat.models.classifier import ImageClassifier
from cnnfeat.models.small_cnn import SmallCNN

__all__ = ["ImageClassifier", "SmallCNN", "TransferClassifier"]
