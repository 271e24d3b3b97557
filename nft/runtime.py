"""Runtime: device, precision, seed, threads and distributed rank, decided once.

No code in nft calls ``.cuda()``: tensors follow ``runtime.device``.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Runtime:
    device: str = "auto"  # "auto" picks cuda when present, else cpu
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on cuda only)
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", 0)))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", 1)))
    progress: bool = True  # tqdm bars

    def __post_init__(self):
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and self.world_size > 1 and ":" not in self.device:
            self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, not {self.precision!r}")
        if self.threads:
            torch.set_num_threads(self.threads)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def seed_everything(self, offset: int = 0) -> None:
        s = self.seed + offset
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def generator(self, offset: int = 0, device: str | None = None) -> torch.Generator:
        """A torch.Generator seeded from the runtime seed (plus an offset per use)."""
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(self.seed * 1_000_003 + offset)
        return g

    def autocast(self):
        """nullcontext on CPU or fp32; torch.autocast otherwise."""
        if self.precision == "fp32" or not self.device.startswith("cuda"):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
