"""Reproductions of the papers' headline results, one command each."""
from reslab.reproduce.he2016 import reproduce_he2016_cifar

__all__ = ["reproduce_he2016_cifar"]
