import os
import socket

import pytest
import torch

from tasks.data.synthetic import generate

# Under pytest-xdist (the test command runs one worker per core) each worker computes on its share of the
# cores, so the workers do not oversubscribe them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# overrides that shrink configs/quickstart.yaml to a seconds-long run (tests of the engine and the tools)
TINY = [
    "model.backbone.depth=18", "model.fpn.out_channels=32", "model.roi_heads.fc_dim=64",
    "model.roi_heads.batch_size_per_image=32", "model.rpn.batch_size_per_image=64",
    "data.min_size_train=[64]", "data.max_size_train=96", "data.min_size_test=64", "data.max_size_test=96",
    "data.num_workers=0", "train.batch_size=2", "train.log_period=1", "train.warmup_iters=2",
    "train.schedule=step", "train.steps=[100]", "eval.num_visualize=1", "resume=auto",
]


def free_port() -> int:
    """A TCP port free on this machine now: each multi-process test's rendezvous gets its own, so tests run
    side by side (pytest-xdist) do not meet on accelerate's default port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A tiny synthetic shapes dataset (12 training, 5 validation images of 64 px)."""
    return generate(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=5, size=64, seed=3)


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


# The longest tests start first, so that under pytest-xdist the other workers share out the rest while they
# run instead of one of them being left with a long test at the end.
LONG_FIRST = ("test_segmentation_quickstart_reaches_its_bar", "test_mask_quickstart_learns_masks",
              "test_sigterm_writes_a_checkpoint",
              "test_tiny_detector_overfits_a_few_real_images", "test_two_process_training_and_evaluation")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        return next((i for i, name in enumerate(LONG_FIRST) if item.name.startswith(name)), len(LONG_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order
