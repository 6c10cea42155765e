"""alexnet-train: train and evaluate AlexNet (Krizhevsky, Sutskever, Hinton, NIPS 2012) on ImageNet-style data."""

__version__ = "0.1.0"
