"""``python -m alexnet_train`` is ``alexnet-train`` (handy under torchrun: ``torchrun ... -m alexnet_train``)."""
from .cli import train_main

if __name__ == "__main__":
    train_main()
