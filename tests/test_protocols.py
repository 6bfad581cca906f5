"""The protocol configs (configs/protocols/) run end to end on the CPU for a few iterations on generated data:
the mechanics of each protocol (its layout, norms, masks, evaluation), not the papers' numbers."""

from pathlib import Path

import pytest
import torch

from tasks.config import load_config
from tasks.engine import train
from tasks.registry import get_task

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.backbone.depth=18", "model.backbone.weights=null", "model.num_classes=3", "model.mask_head.conv_dim=16",
         "model.roi_heads.batch_size_per_image=32", "model.rpn.batch_size_per_image=64", "data.min_size_train=[64]",
         "data.max_size_train=96", "data.min_size_test=64", "data.max_size_test=96", "data.num_workers=0",
         "train.batch_size=2", "train.max_iters=2", "train.warmup_iters=1", "train.log_period=1", "eval.num_visualize=0",
         "train.log_with=[]"]


@pytest.mark.parametrize("name", ["coco_mask_rcnn_r50_c4_1x_moco"])
def test_a_protocol_runs_end_to_end(shapes, tmp_path, name):
    config = load_config(ROOT / "configs" / "protocols" / f"{name}.yaml",
                         [*SMALL, f"data.root={shapes}", f"output_dir={tmp_path / 'run'}"])
    task = get_task(config.task)
    result = train(task, config)
    assert result.iterations == 2 and "segm/AP" in result.metrics and "bbox/AP" in result.metrics
    model = task.build_model(config, init_weights=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert norms and all(p.requires_grad for m in norms for p in m.parameters())  # SyncBN everywhere, all training
