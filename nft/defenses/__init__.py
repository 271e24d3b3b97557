"""Defense registry: one file per defense, all through the one verb in base.py."""
from ..registry import DEFENSES
from . import anp, awm, clp, fp, fst, ft, ftsam, ibau, nad, nft, rnp  # noqa: F401  (registration)
from .base import DefenseResult, config_with


def get_defense(name: str):
    return DEFENSES.get(name)


def list_defenses() -> list[str]:
    return DEFENSES.names()


__all__ = ["DefenseResult", "config_with", "get_defense", "list_defenses"]
