"""Attack registry: one file per attack; ``build_attack(name, ...)``."""
from ..registry import ATTACKS
from . import (badnets, blend, bpp, cba, clb, fba, inputaware, issba, lf, lira, sig, trojan,  # noqa: F401
               trojannn, wanet)
from .base import Attack


def build_attack(name: str, **kwargs) -> Attack:
    return ATTACKS.get(name)(**kwargs)


def list_attacks() -> list[str]:
    return ATTACKS.names()


__all__ = ["Attack", "build_attack", "list_attacks"]
