import pytest
import torch

from nft.runtime import Runtime


@pytest.fixture
def rt():
    return Runtime(device="cpu", seed=0, progress=False)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
