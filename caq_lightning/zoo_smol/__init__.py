"""Old path of :mod:`caq_lightning.zoo.smol`, kept so ``caq_lightning.zoo_smol`` and its command line keep working."""

from caq_lightning.zoo import smol


def __getattr__(name: str):  # every name of caq_lightning.zoo.smol, public or not
    return getattr(smol, name)
