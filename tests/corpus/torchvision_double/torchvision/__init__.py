"""A test double of the few torchvision names Lightning 0.9.0's ``pl_examples`` import.

torchvision has no build for the CPU-only torch this project tests on (its wheel fails at import
with ``torchvision::nms does not exist``), so the corpus tests put this folder on the path of
the example scripts they run, and only when the real torchvision does not import. It serves
exactly what the scripts call: ``datasets.MNIST`` over idx files already on disk (the tests
write a tiny generated MNIST; nothing is downloaded), ``transforms.ToTensor`` / ``Normalize`` /
``Compose`` and ``utils.make_grid``. It is ours, written from torchvision's documented
behaviour, not a copy of it.
"""

from torchvision import datasets, transforms, utils

__all__ = ["datasets", "transforms", "utils"]
