"""The attack shape every attack follows (DESIGN.md §4).

- ``poison_train(images, labels, rate, rng) -> (images, labels, poison_index)``
- ``apply(images, labels) -> (triggered_images, backdoor_labels)``

Images are (N, C, H, W), uint8 or float in [0, 1]; the trigger works in [0, 1] pixel space and the
result comes back in the input's dtype (uint8 results are quantized like an image file).
Whatever an attack learns or draws (trigger pattern, generator weights) is returned by
``state_dict()`` and saved next to the model, so ``apply`` is reproducible from the run directory.
"""
from __future__ import annotations

import torch

from ..data.core import to_float, to_uint8
from ..errors import NFTError


class Attack:
    name = "attack"
    clean_label = False  # poison only target-class images and keep their labels
    modes = ("all2one",)
    # Settings whose defaults changed after benchmark records existed. The bench writes them into every
    # model spec (nft.grid.expand_grid), so a spec made under the new defaults never shares a cache key or a
    # cell id with an older record that left them out (that record's model was built with the old defaults).
    spec_defaults: dict = {}
    # What a manifest written before such a change meant by leaving a parameter out (its old default), so an
    # older run directory rebuilds the attack it was made with (nft.runs.attack_from_run).
    omitted_params: dict = {}

    def __init__(self, num_classes: int = 10, image_shape=(3, 32, 32), target: int = 0, mode: str = "all2one",
                 seed: int = 0, **params):
        if mode not in self.modes:
            raise NFTError(f"{self.name} supports label modes {self.modes}, not {mode!r}")
        if not 0 <= target < num_classes:
            raise NFTError(f"target class {target} is outside 0..{num_classes - 1}")
        if params:
            raise NFTError(f"{self.name} has no parameter(s) {sorted(params)}")
        self.num_classes, self.image_shape = num_classes, tuple(image_shape)
        self.target, self.mode, self.seed = target, mode, seed

    # -- what a subclass provides -------------------------------------------------------------
    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> triggered float images in [0, 1]."""
        raise NotImplementedError

    def params(self) -> dict:
        """Everything needed to rebuild this attack (goes into the manifest)."""
        return {"num_classes": self.num_classes, "image_shape": list(self.image_shape), "target": self.target,
                "mode": self.mode, "seed": self.seed}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise NFTError(f"{self.name} has no learned state, got {sorted(state)}")

    # -- labels ---------------------------------------------------------------------------------
    def backdoor_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target)

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Test images on which ASR is measured: those whose backdoor label differs from the true one."""
        return self.backdoor_labels(y) != y

    # -- the verbs --------------------------------------------------------------------------------
    def apply(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._check_and_trigger(images)
        return out, self.backdoor_labels(labels)

    def poison_index(self, labels: torch.Tensor, rate: float, rng: torch.Generator) -> torch.Tensor:
        """round(rate * N) indices: from the target class for clean-label attacks, else from the
        images whose label the backdoor changes."""
        if not 0 <= rate <= 1:
            raise NFTError(f"poison rate must be in [0, 1], got {rate}")
        k = round(rate * len(labels))
        pool = (labels == self.target) if self.clean_label else self.eligible(labels)
        pool = pool.nonzero().flatten()
        if k > len(pool):
            raise NFTError(f"{self.name}: poison rate {rate} needs {k} images but only {len(pool)} can be poisoned")
        return pool[torch.randperm(len(pool), generator=rng)[:k]].sort().values

    def poison_train(self, images: torch.Tensor, labels: torch.Tensor, rate: float, rng: torch.Generator):
        idx = self.poison_index(labels, rate, rng)
        images, labels = images.clone(), labels.clone()
        if len(idx):
            images[idx] = self._check_and_trigger(images[idx])
            if not self.clean_label:
                labels[idx] = self.backdoor_labels(labels[idx])
        return images, labels, idx

    def train_hooks(self, runtime):
        """Hooks for attacks that poison on the fly during training (None for data poisoning)."""
        return None

    def _check_and_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != self.image_shape:
            raise NFTError(f"{self.name} was built for images of shape {self.image_shape}, got {tuple(images.shape[1:])}")
        out = self.trigger(to_float(images)).clamp(0, 1)
        return to_uint8(out) if images.dtype == torch.uint8 else out


class PatternArtifact:
    """Mixin for attacks whose whole learned or drawn state is one ``pattern`` of the image shape."""

    def state_dict(self):
        return {"pattern": self.pattern}

    def load_state_dict(self, state):
        if set(state) != {"pattern"} or tuple(state["pattern"].shape) != self.image_shape:
            raise NFTError(f"{self.name} artifact must hold one 'pattern' of the image shape")
        self.pattern = state["pattern"].float()
        if hasattr(self, "fitted"):
            self.fitted = True


def pattern_generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + salt)


def fit_attack(attack, data, runtime) -> None:
    """``attack.fit(data, runtime)`` (for attacks that learn their trigger) with the global RNG
    seeded from the runtime first. A fit may build a model (a surrogate, a generator) whose
    initialisation draws from the global RNG; unseeded, the fitted trigger would depend on what the
    process ran before (a bench that trains several models in one process gave TrojanNN a different
    trigger than a fresh process, benchmarks/results/mnist10k/rerun.md)."""
    if hasattr(attack, "fit"):
        runtime.seed_everything(offset=1_009)
        attack.fit(data, runtime)
