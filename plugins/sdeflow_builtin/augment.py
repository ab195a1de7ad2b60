"""Random augmentations of an image data set's train split, named in the data section's ``augment`` list.

Each entry is a random symmetry applied to a C×H×W tensor, drawn as VDM draws it
(google-research/vdm ``dataset.py``, ``_preprocess_cifar10_augment`` and ``..._with_channel_flip``):

- ``hflip``: a left–right flip with probability ½;
- ``vflip``: an up–down flip with probability ½ (not in VDM; the remaining member of the dihedral group);
- ``rot90``: with probability ½ a rotation by k ∈ {1, 2, 3} quarter turns, k uniform (VDM's k = ⌈3u⌉);
- ``channel_permute``: with probability ½ a uniformly random permutation of the colour channels (VDM's
  ``tf.random.shuffle`` of the channels, so the identity is one of the six).

VDM's and i-DODE's (thu-ml/i-DODE, the same ``dataset.py``) "with data augmentation" CIFAR-10 numbers
(``cifar10_aug``) use ``hflip`` and ``rot90``; ``cifar10_aug_with_channel`` adds ``channel_permute``;
their ImageNet runs use none. Both condition the network on a flag "was any augmentation applied" and
evaluate at flag 0 (Jun et al. 2020's distribution augmentation), which sdeflow's networks do not: here
the model is trained on the augmented distribution itself, so a bpd trained with ``augment`` is not
the same quantity as theirs. Val, test and FID's reference are never augmented; the list is recorded
in the protocol. Draws come from torch's global generator, as torchvision's random transforms do, so
``torch.manual_seed`` (and the DataLoader's per-worker seeds derived from it) makes them reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sdeflow.plugin import did_you_mean, require


def _coin() -> bool:
    """True with probability ½, from torch's global generator."""
    return bool(torch.rand(()) < 0.5)


def hflip(x: Tensor) -> Tensor:
    return x.flip(-1) if _coin() else x


def vflip(x: Tensor) -> Tensor:
    return x.flip(-2) if _coin() else x


def rot90(x: Tensor) -> Tensor:
    if not _coin():
        return x
    return torch.rot90(x, int(torch.randint(1, 4, ())), dims=(-2, -1))


def channel_permute(x: Tensor) -> Tensor:
    if not _coin():
        return x
    return x.index_select(-3, torch.randperm(x.shape[-3]))


AUGMENTATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "hflip": hflip, "vflip": vflip, "rot90": rot90, "channel_permute": channel_permute,
}
"""Every name ``augment`` accepts, and its random transform."""


def check_augment(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or InvalidArgument("augment") naming an unknown or repeated entry."""
    choices = ", ".join(AUGMENTATIONS)
    require(not isinstance(names, str), "augment", f"expected a list of augmentations ({choices}), got {names!r}")
    for name in names:
        require(name in AUGMENTATIONS, "augment",
                f"unknown augmentation {name!r}{did_you_mean(name, AUGMENTATIONS)}; choices: {choices}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    require(not repeated, "augment", f"lists {', '.join(repeated)} more than once")
    return tuple(names)


class Augment:
    """x ↦ the named random transforms applied in order (a picklable callable for DataLoader workers)."""

    def __init__(self, names: Sequence[str]):
        self.names = check_augment(names)

    def __call__(self, x: Tensor) -> Tensor:
        for name in self.names:
            x = AUGMENTATIONS[name](x)
        return x

    def __repr__(self) -> str:
        return f"Augment({list(self.names)})"
