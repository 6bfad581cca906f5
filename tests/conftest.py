import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Random affine parameters and running statistics in every norm layer, so that equivalence tests
    exercise them (fresh BatchNorms are identities up to eps)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return module


def randomize_frozen_(module: torch.nn.Module) -> torch.nn.Module:
    """``randomize_`` for torchvision's FrozenBatchNorm2d (buffers only)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return module
