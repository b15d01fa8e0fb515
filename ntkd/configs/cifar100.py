"""CIFAR-100 study: as CIFAR-10 (ResNet-56 teacher, ResNet-20 / LeNet-5x8
students) on ``cifar-100-python`` (fine labels).

Command:   ntkd reproduce --dataset cifar100 --data-dir /data --out results/cifar100
Runtime:   roughly 3-4 hours on one modern GPU.
"""

from ntkd.configs import cifar10


def get_config(quick: bool = False):
    return cifar10.get_config(quick=quick, num_classes=100)
