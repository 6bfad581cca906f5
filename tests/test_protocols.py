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
         "model.fpn.out_channels=32", "model.roi_heads.fc_dim=64",
         "model.roi_heads.batch_size_per_image=32", "model.rpn.batch_size_per_image=64", "data.min_size_train=[64]",
         "data.max_size_train=96", "data.min_size_test=64", "data.max_size_test=96", "data.num_workers=0",
         "train.batch_size=2", "train.max_iters=2", "train.warmup_iters=1", "train.log_period=1", "eval.num_visualize=0",
         "train.log_with=[]"]


# where each protocol has its SyncBN (the prefixes of the modules that hold one): C4's res5 box head is the
# backbone's res5, with one more after it (box_head.norm); MoCo's R50-FPN has it in the backbone and the FPN,
# its heads have none (issue #34)
C4_SYNCBN = {"backbone.stem", "backbone.res2", "backbone.res3", "backbone.res4", "roi_heads.box_head.res5",
             "roi_heads.box_head.norm"}
SYNCBN_IN = {"coco_mask_rcnn_r50_c4_1x_moco": C4_SYNCBN,
             "voc_faster_rcnn_r50_c4_24k_moco": C4_SYNCBN,
             "coco_mask_rcnn_r50_fpn_1x_moco": {"backbone.bottom_up.stem", "backbone.bottom_up.res2",
                                                "backbone.bottom_up.res3", "backbone.bottom_up.res4",
                                                "backbone.bottom_up.res5", "backbone.lateral_convs",
                                                "backbone.output_convs"}}


@pytest.mark.parametrize("name", list(SYNCBN_IN))
def test_a_protocol_runs_end_to_end(request, tmp_path, name):
    """Two iterations and an evaluation of each protocol (a ResNet-18, tiny heads, generated shapes; VOC's in
    a VOCdevkit layout), then: SyncBN exactly where the protocol puts it, every one of them training."""
    voc = name.startswith("voc_")
    data = [f"data.root={request.getfixturevalue('voc_shapes')}", "model.num_classes=20"] if voc else \
        [f"data.root={request.getfixturevalue('shapes')}"]
    config = load_config(ROOT / "configs" / "protocols" / f"{name}.yaml", [*SMALL, *data, f"output_dir={tmp_path / 'run'}"])
    task = get_task(config.task)
    result = train(task, config)
    expected = {"bbox/mAP", "bbox/AP", "bbox/AP50", "bbox/AP75"} if voc else {"segm/AP", "bbox/AP"}
    assert result.iterations == 2 and expected <= set(result.metrics)
    model = task.build_model(config, init_weights=False)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)}
    places = SYNCBN_IN[name]
    inside = lambda n, place: n == place or n.startswith(f"{place}.")  # noqa: E731
    assert all(any(inside(n, place) for place in places) for n in norms)
    assert all(any(inside(n, place) for n in norms) for place in places)
    assert all(p.requires_grad for m in norms.values() for p in m.parameters())  # nothing frozen
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and not isinstance(m, torch.nn.SyncBatchNorm)
                   for m in model.modules())  # no other batch norm (a frozen one would be FrozenBatchNorm2d)


def test_compare_trains_two_backbones_and_writes_the_table_and_the_pictures(shapes, tmp_path, capsys):
    """tools/compare.py over two ResNet-18 files (a torchvision one and one in MoCo's layout), 3 iterations
    each through accelerate launch: the table (Markdown, CSV), the bar chart and the curves; run again,
    both runs are skipped as finished; the runs collected by folder give the same table."""
    import torchvision
    from conftest import TINY

    from tools.compare import main as compare

    plain = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    moco = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}}, moco)
    out = tmp_path / "comparison"
    args = [str(ROOT / "configs" / "quickstart.yaml"), *TINY, f"data.root={shapes}", "train.max_iters=3",
            "train.log_with=[]", "--backbones", f"supervised={plain}", f"mocov2={moco}", "--output", str(out),
            "--launch", "--num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"]
    assert compare(args) == 0
    printed = capsys.readouterr().out
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| backbone | seeds | bbox/AP | bbox/AP50 | bbox/AP75 |")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| mocov2", "| supervised"]
    assert all(" ± 0.00" in row and row.split(" | ")[1] == "1" for row in table[2:])
    csv = (out / "comparison.csv").read_text().splitlines()
    assert csv[0].startswith("backbone,seeds,bbox/AP,bbox/AP std,") and len(csv) == 3
    assert (out / "comparison.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    for name in ("supervised", "mocov2"):
        assert (out / name / "seed_0" / "metrics.json").is_file()
    assert "\n".join(table) in printed

    assert compare(args) == 0  # finished runs are not trained again
    assert capsys.readouterr().out.count("finished in") == 2
    again = tmp_path / "collected"
    assert compare([str(out / "supervised" / "seed_0"), str(out / "mocov2" / "seed_0"), "--output", str(again)]) == 0
    rows = (again / "comparison.md").read_text().splitlines()[2:]
    assert sorted(rows) == sorted(table[2:])  # each seed_0 folder named after its backbone's folder
