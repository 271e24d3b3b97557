"""The 'nft' defense: a thin wrapper over nft.purify. ``cfg`` is an NFTConfig (``recipe`` picks the base)."""
from ..purify import NFTConfig, purify, recipe
from ..registry import DEFENSES
from .base import DefenseResult


@DEFENSES.register("nft")
def defend_nft(model, clean, cfg: NFTConfig | dict | None = None, runtime=None, monitor=None) -> DefenseResult:
    if cfg is None or isinstance(cfg, dict):
        cfg = dict(cfg or {})
        cfg = recipe(cfg.pop("recipe", "default"), **cfg)
    purified, _, history, extras = purify(model, clean, cfg, runtime, monitor)
    return DefenseResult(purified, history, extras)
