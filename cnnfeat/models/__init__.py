"""LightningModules: the shared classifier base and the networks built on it (the lecture's CNN, any torchvision
classification network, your own nn.Module, and the original frozen-AlexNet transfer classifier, whose recipe
experiment=transfer now runs through TorchvisionClassifier), and the frozen parts that the transfer classifiers and
the feature cache's config share."""

from cnnfeat.models.alexnet import FrozenAlexNet, TransferClassifier
from cnnfeat.models.classifier import ImageClassifier, NetClassifier
from cnnfeat.models.custom import CustomClassifier
from cnnfeat.models.small_cnn import SmallCNN
from cnnfeat.models.torchvision_net import FrozenTorchvision, TorchvisionClassifier

__all__ = [
    "CustomClassifier",
    "FrozenAlexNet",
    "FrozenTorchvision",
    "ImageClassifier",
    "NetClassifier",
    "SmallCNN",
    "TorchvisionClassifier",
    "TransferClassifier",
]
