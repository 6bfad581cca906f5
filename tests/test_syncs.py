"""The host-sync counter (tools/syncs.py) on hand-made cases, and the detector's counts it gives, held exactly."""

import pytest
import torch
import torchvision

from heads.boxes import batched_nms
from tasks.config import load_config
from tasks.registry import get_task, prepare_config
from tools.benchmark import synthetic_batch, torchvision_detector
from tools.syncs import HostSyncs, count_model_syncs, cuda_code_paths, torchvision_inputs

CPU = torch.device("cpu")


def counted(function, host=()):
    with HostSyncs(list(host), CPU) as counter:
        function()
    return dict(counter.report.by_kind)


def test_each_kind_of_host_sync_is_counted_once():
    host = torch.arange(6.0)  # as the data pipeline gives it
    computed = host * 2  # ... and what the model computes from it after moving it: on the device
    device_tensor = torch.rand(6)
    assert counted(lambda: device_tensor[device_tensor > 0.5]) == {"boolean-mask index": 1}
    assert counted(lambda: torch.where(device_tensor > 0.5)) == {"nonzero": 1}
    assert counted(lambda: device_tensor.sum().item()) == {"scalar read": 1}
    assert counted(lambda: bool(device_tensor.sum() > 0)) == {"scalar read": 1}
    assert counted(lambda: device_tensor.tolist()) == {"device-to-host tolist": 1}
    assert counted(lambda: torch.tensor([1.0, 2.0], device=CPU)) == {"tensor from Python data on the device": 1}
    assert counted(lambda: host.to(CPU), [host]) == {"blocking host-to-device copy": 1}
    assert counted(lambda: host.to(CPU, non_blocking=True), [host]) == {}
    assert counted(lambda: host.float().to(CPU), [host]) == {"blocking host-to-device copy": 1}  # still on the host
    assert counted(lambda: host.tolist(), [host]) == {}  # the host reading its own data
    assert counted(lambda: host.to(torch.float64), [host]) == {}  # a dtype change is no copy to the device
    assert counted(lambda: torch.zeros(3).to(CPU)) == {"blocking host-to-device copy": 1}  # made on the host
    assert counted(lambda: torch.zeros(3, device=CPU) + computed[:3]) == {}
    masked = device_tensor.clone()
    assert counted(lambda: masked.__setitem__(masked > 0.5, 0.0)) == {"boolean-mask index_put": 1}
    assert counted(lambda: masked.masked_fill(masked > 0.5, 0.0)) == {}  # the sync-free form
    assert counted(lambda: torch.unique(torch.tensor([1, 1, 2]))) == {"unique": 1}
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    assert counted(lambda: torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)) == {"nms": 1}


@pytest.mark.parametrize("num_boxes, cuda_kinds", [(2000, {"blocking host-to-device copy": 1, "nms": 1}),
                                                   (6000, {"unique": 1, "nonzero": 4, "nms": 3})])
def test_batched_nms_follows_cudas_rule_on_the_cpu(num_boxes, cuda_kinds):
    """torchvision's batched_nms loops over the classes (unique, a nonzero and an NMS each, a last nonzero)
    above 4 000 box numbers on the CPU, above 20 000 on CUDA (below: one NMS, after a copy of its
    ``torch.tensor(1)``); the counter takes CUDA's choice. Ours is one NMS on CUDA however many boxes, with
    torchvision's result."""
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(num_boxes, 2, generator=generator) * 500
    boxes = torch.cat([xy, xy + 20], dim=1)
    scores, classes = torch.rand(num_boxes, generator=generator), torch.arange(num_boxes) % 3
    assert counted(lambda: torchvision.ops.batched_nms(boxes, scores, classes, 0.5)) == {
        "unique": 1, "nonzero": 4, "nms": 3}  # the CPU's path, outside cuda_code_paths
    with cuda_code_paths(torch.nn.Module()):
        assert counted(lambda: torchvision.ops.batched_nms(boxes, scores, classes, 0.5)) == cuda_kinds
        assert counted(lambda: batched_nms(boxes, scores, classes, 0.5)) == {"nms": 1}
        one_call = batched_nms(boxes, scores, classes, 0.5)
    expected = torchvision.ops.batched_nms(boxes, scores, classes, 0.5)
    assert torch.equal(batched_nms(boxes, scores, classes, 0.5), expected) and torch.equal(one_call, expected)


def test_batched_nms_keeps_groups_apart_at_float32_precision():
    """One NMS over a thousand groups of boxes that span a 1000-px image: shifted by their groups' offsets in
    float32 the coordinates would round by 1/16 px and a pair at IoU 0.4995 would be suppressed or not by
    chance (here 1387 and 1259 boxes stay instead of 2001 and 1001); shifted in float64 each group decides
    on its own boxes."""
    pair = torch.tensor([[1000.0, 1000.0, 1010.0, 1010.0], [1000.0, 1000.0, 1010.0, 1020.02]])  # IoU 100 / 200.2
    boxes = torch.cat([pair.repeat(1000, 1), torch.tensor([[0.0, 0.0, 1.0, 1.0]])])  # one more group, far away
    scores = torch.cat([torch.tensor([0.9, 0.8]).repeat(1000), torch.tensor([0.5])])
    groups = torch.arange(1001).repeat_interleave(2)[:2001]
    with cuda_code_paths(torch.nn.Module()):
        assert len(batched_nms(boxes, scores, groups, 0.4996)) == 2001  # IoU below the threshold: all stay
        keep = batched_nms(boxes, scores, groups, 0.4994)
    assert len(keep) == 1001 and (keep % 2 == 0).all()  # above it: every partner goes


def detector_and_batch(layout: str, masks: bool = False):
    """Our detector of the layout (ResNet-18 FPN and C4, ResNet-50 DC5: torchvision's basic blocks cannot be
    dilated), a Mask R-CNN with ``masks``, its config and a batch of two small images with their targets."""
    depth, (height, width) = (50 if layout == "dc5" else 18), (128, 160)
    config = prepare_config(load_config("configs/frcnn_r50.yaml", [
        f"model.layout={layout}", f"model.backbone.depth={depth}", "model.backbone.weights=null", "model.num_classes=3",
        "model.roi_heads.batch_size_per_image=64", "model.rpn.post_nms_topk=[200,100]",  # fewer RoIs: faster, same syncs
        f"model.masks={str(masks).lower()}", "model.mask_head.conv_dim=64"]))
    torch.manual_seed(0)
    images, targets = synthetic_batch(2, height, width, 3, masks=masks)
    return get_task("detection").build_model(config, init_weights=False), config, images, targets


def _detector_counts(layout: str, masks: bool = False):
    """Ours and torchvision's of the same architecture and settings, on the same batch."""
    ours, config, images, targets = detector_and_batch(layout, masks)
    height, width = images[0].shape[-2:]
    theirs = torchvision_detector(config, height, width)
    return (count_model_syncs(ours, images, targets, CPU),
            count_model_syncs(theirs, torchvision_inputs(images), targets, CPU, to_device=True))


# (training step, inference call) host-blocking points of a batch of two images
OURS = {"fpn": (1, 2), "c4": (1, 2), "dc5": (1, 2)}


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
def test_detector_host_syncs_are_held_exactly_and_fewer_than_torchvisions(layout):
    ours, theirs = _detector_counts(layout)
    assert (ours["train"].total, ours["infer"].total) == OURS[layout], (ours["train"].as_dict(), ours["infer"].as_dict())
    assert ours["train"].total < theirs["train"].total and ours["infer"].total < theirs["infer"].total


def test_mask_head_adds_no_host_sync():
    """Mask R-CNN (FPN) counts as Faster R-CNN does: the mask targets, loss and class maps are fixed-size;
    torchvision's Mask R-CNN of the same architecture waits more often than its Faster R-CNN. C4's shared
    res5 mask branch adds none either."""
    ours, theirs = _detector_counts("fpn", masks=True)
    assert (ours["train"].total, ours["infer"].total) == OURS["fpn"], (ours["train"].as_dict(), ours["infer"].as_dict())
    assert ours["train"].total < theirs["train"].total and ours["infer"].total < theirs["infer"].total
    model, _, images, targets = detector_and_batch("c4", masks=True)
    c4 = count_model_syncs(model, images, targets, CPU)
    assert (c4["train"].total, c4["infer"].total) == OURS["c4"]
