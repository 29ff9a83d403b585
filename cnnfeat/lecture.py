"""What the lecture shows, as data: its printed 15-epoch log and the test images it looks at."""

from __future__ import annotations

#: the Fashion-MNIST test images whose feature maps the lecture shows (IDs in the official test set)
LECTURE_IMAGE_IDS: tuple[int, ...] = (22, 193, 36, 312, 1087, 74)
#: Fashion-MNIST's classes, in label order (as torchvision names them)
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def default_image_ids(
    class_names: tuple[str, ...] | list[str], held: set[int], first_of_class: list[int], split: str
) -> list[int]:
    """The lecture's six images on Fashion-MNIST's test split (when the probe holds them), else the first image of
    each class. The lecture's IDs are test-set indices: on another split (a DataModule that builds its test set only
    in ``setup("test")`` gives the validation split) the same numbers are other images."""
    if split == "test" and tuple(class_names) == FASHION_MNIST_CLASSES and set(LECTURE_IMAGE_IDS) <= held:
        return list(LECTURE_IMAGE_IDS)
    return list(first_of_class)


#: The lecture's printed log for its 15-epoch run: (train accuracy %, train avgLoss, valid accuracy %) per epoch.
#: Its "valid" column is the official 10k test set.
LECTURE_LOG: tuple[tuple[float, float, float], ...] = (
    (51.77, 1.2684, 79.38),
    (83.00, 0.4497, 83.78),
    (87.29, 0.3438, 86.31),
    (88.06, 0.3190, 87.02),
    (88.74, 0.3009, 87.21),
    (89.88, 0.2700, 88.87),
    (90.16, 0.2609, 88.85),
    (90.49, 0.2507, 89.60),
    (91.26, 0.2361, 89.53),
    (91.39, 0.2317, 89.70),
    (91.48, 0.2283, 89.59),
    (91.86, 0.2188, 90.00),
    (91.97, 0.2167, 90.13),
    (92.05, 0.2143, 90.28),
    (92.17, 0.2093, 90.39),
)
