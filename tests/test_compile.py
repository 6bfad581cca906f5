"""torch.compile: graphs and graph breaks of every task model, counted exactly by dynamo (``explain`` traces
without compiling: seconds), under the settings ``train.compile`` uses and under dynamo's defaults."""

import pytest
import torch
import torch._dynamo
from test_detection_model import tiny_detector

from heads import torchvision_roi_align
from tasks.classification.model import build_classifier
from tasks.modeling.compiling import compile_settings
from tasks.segmentation.model import build_segmenter

BACKBONE = {"name": "resnet", "depth": 18, "norm": "BN", "freeze_at": 0}


def explained(function, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(function)(*args)


def _images(count=2, size=(128, 160)):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator) for _ in range(count)]


def _targets(count=2, masks=False, size=(128, 160)):
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 70], [80, 40, 150, 120]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[5.0, 20, 90, 100]]), "labels": torch.tensor([3])}][:count]
    for target in targets if masks else ():  # each box's instance: the box filled
        target["masks"] = torch.zeros((len(target["boxes"]), *size), dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(target["masks"], target["boxes"].int().tolist()):
            mask[y1:y2, x1:x2] = 1
    return targets


def _detector_graphs(layout: str, masks: bool = False) -> dict[str, tuple[int, int]]:
    torch.manual_seed(0)
    model = tiny_detector(layout, **({"masks": True, "mask_head": {"conv_dim": 16}} if masks else {}))
    counts = {}
    with torchvision_roi_align(model):  # the kernel CUDA takes (the sparse CPU one pools level by level)
        model.eval()
        with torch.no_grad():
            result = explained(model, _images())
        counts["infer"] = (result.graph_count, result.graph_break_count)
        model.train()
        result = explained(lambda images, targets: sum(model(images, targets).values()), _images(), _targets(masks=masks))
        counts["train"] = (result.graph_count, result.graph_break_count)
    return counts


@pytest.mark.parametrize("layout", ["fpn", "c4", "dc5"])
def test_whole_detector_is_one_graph_under_the_compile_settings(layout):
    """Fixed-size selections everywhere; NMS's output length and the per-image counts traced as symbols:
    the training step (forward and losses) and the inference call are each one graph, no break."""
    with compile_settings():
        assert _detector_graphs(layout) == {"infer": (1, 0), "train": (1, 0)}


@pytest.mark.parametrize("layout", ["fpn", "c4"])
def test_mask_rcnn_is_one_graph_under_the_compile_settings(layout):
    """The mask head (targets, loss, class maps; C4's shared res5) keeps the detector one graph, no break."""
    with compile_settings():
        assert _detector_graphs(layout, masks=True) == {"infer": (1, 0), "train": (1, 0)}


def test_detector_breaks_with_dynamos_defaults_where_the_data_decides_a_size():
    """Without the settings, dynamo ends a graph at each NMS (output length): the breaks are those, and only
    those (the detections come out at a fixed size: no count is read)."""
    torch.manual_seed(0)
    model = tiny_detector("c4")
    with torchvision_roi_align(model), torch.no_grad():
        result = explained(model.eval(), _images())
    reasons = {("nms" if "nms" in r.reason else "scalar" if "_local_scalar_dense" in r.reason else r.reason)
               for r in result.break_reasons}
    assert reasons == {"nms"} and result.graph_break_count > 0


def test_backbone_and_fpn_compile_with_fullgraph():
    model = tiny_detector("fpn").eval()
    batch, _ = model.preprocess(_images())
    result = explained(model.backbone, batch)
    assert (result.graph_count, result.graph_break_count) == (1, 0)
    compiled = torch.compile(model.backbone, fullgraph=True, backend="eager")  # raises at a break
    with torch.no_grad():
        expected, got = model.backbone(batch), compiled(batch)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_segmenter_and_classifier_are_one_graph():
    torch.manual_seed(0)
    segmenter = build_segmenter({"layout": "fcn8s", "num_classes": 3, "backbone": BACKBONE}, init_weights=False)
    masks = [{"mask": torch.randint(0, 3, (128, 160))} for _ in range(2)]
    classifier = build_classifier({"num_classes": 5, "backbone": BACKBONE}, init_weights=False)
    labels = [{"label": torch.tensor(1)}, {"label": torch.tensor(4)}]
    with compile_settings():
        for model, targets in ((segmenter, masks), (classifier, labels)):
            with torch.no_grad():
                result = explained(model.eval(), _images())
            assert (result.graph_count, result.graph_break_count) == (1, 0), type(model).__name__
            model.train()
            result = explained(lambda images, targets, m=model: sum(m(images, targets).values()), _images(), targets)
            assert (result.graph_count, result.graph_break_count) == (1, 0), type(model).__name__


def _batch(sizes, box_counts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator) for size in sizes]
    targets = []
    for (height, width), count in zip(sizes, box_counts):
        corner = torch.rand(count, 2, generator=generator) * torch.tensor([width / 2, height / 2])
        boxes = torch.cat([corner, corner + torch.tensor([width / 3, height / 3])], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 4, (count,), generator=generator)})
    return images, targets


def test_size_buckets_bound_the_graphs_a_run_compiles():
    """``data.size_buckets``: batches of varied image sizes and box counts (within one power of two) compile one
    static graph per bucket (dynamo's counter; the eager backend: the graphs, not inductor's code). Without
    buckets each new combination of shapes would be a new graph (or a symbolic one)."""
    from tasks.modeling.compiling import compile_model, compiled_graphs

    torch.manual_seed(0)
    model = tiny_detector("fpn").train()
    model.size_buckets = [(160, 192), (192, 160)]
    torch._dynamo.reset()
    compiled = compile_model(model, backend="eager", dynamic=False)
    before = compiled_graphs()
    for sizes, counts in [([(128, 160), (150, 140)], [2, 1]), ([(140, 190), (120, 170)], [5, 3]),
                          ([(190, 150), (100, 100)], [1, 8])]:  # two landscape batches, one portrait
        sum(compiled(*_batch(sizes, counts)).values()).backward()
    assert compiled_graphs() - before == 2
