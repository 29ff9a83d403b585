"""cnnfeat: see what a convolutional network learns, with PyTorch Lightning, Hydra and TensorBoard."""

from cnnfeat.data.fashion_mnist import CLASSES, FashionMNISTDataModule
from cnnfeat.models import ImageClassifier, SmallCNN

__all__ = ["CLASSES", "FashionMNISTDataModule", "ImageClassifier", "SmallCNN"]
__version__ = "0.1.0"
