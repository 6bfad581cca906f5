"""Anchors, box coding, matching and sampling on hand-made cases (and against torchvision's own)."""

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from heads import AnchorGenerator, BoxCoder, Detections, Matcher, sample_balanced


def test_base_anchors_by_hand():
    # size 32: ratio 0.5 -> w = 32 * sqrt(2) = 45.25, h = 22.63 (halved and rounded: 23, 11)
    base = AnchorGenerator.base_anchors([32], [0.5, 1.0, 2.0])
    assert base.tolist() == [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]


def test_anchor_grid_by_hand():
    generator = AnchorGenerator([[32]], [[1.0]], strides=[16])
    (anchors,) = generator([(2, 3)], (32, 48))
    assert anchors.shape == (6, 4)
    assert anchors[0].tolist() == [-16, -16, 16, 16]
    assert anchors[1].tolist() == [0, -16, 32, 16]  # next cell to the right
    assert anchors[3].tolist() == [-16, 0, 16, 32]  # next row


@pytest.mark.parametrize("image_size", [(480, 640), (800, 1088)])
def test_anchors_equal_torchvision(image_size):
    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    strides = [4, 8, 16, 32, 64]
    feature_sizes = [(-(-image_size[0] // s), -(-image_size[1] // s)) for s in strides]
    ours = torch.cat(AnchorGenerator(sizes, ratios, strides, grid_stride="padded_image")(feature_sizes, image_size))
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    features = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
    (reference,) = TorchvisionAnchorGenerator(sizes, ratios)(images, features)
    assert torch.equal(ours, reference)
    declared = torch.cat(AnchorGenerator(sizes, ratios, strides)(feature_sizes, image_size))
    assert torch.equal(declared[: -feature_sizes[-1][0] * feature_sizes[-1][1] * 3], reference[: len(declared) - feature_sizes[-1][0] * feature_sizes[-1][1] * 3])


def test_box_coding_by_hand_and_round_trip():
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = torch.tensor([[5.0, 5.0, 15.0, 25.0]])
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    deltas = coder.encode(box, reference)
    expected = torch.tensor([[10 * 0.5, 10 * 1.0, 5 * 0.0, 5 * torch.log(torch.tensor(2.0)).item()]])
    assert torch.allclose(deltas, expected)
    assert torch.allclose(coder.decode(deltas, reference), box)
    boxes = torch.rand(50, 4) * 100
    boxes[:, 2:] += boxes[:, :2] + 1
    refs = torch.rand(50, 4) * 100
    refs[:, 2:] += refs[:, :2] + 1
    assert torch.allclose(coder.decode(coder.encode(boxes, refs), refs), boxes, atol=1e-3)
    tv = tv_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    assert torch.allclose(coder.encode(boxes, refs), tv.encode_single(boxes, refs), atol=1e-6)
    multi = torch.randn(50, 3 * 4)
    assert torch.equal(coder.decode(multi, refs), tv.decode_single(multi, refs))


def test_decode_in_half_precision_keeps_the_reference_boxes_exact():
    """Under bf16 autocast the head's deltas come in bf16; decoding rounds nothing else: boxes near 1300 px
    equal the float32 decoding of the same deltas (bf16 steps there are 8 px)."""
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=generator) * 1200
    reference = torch.cat([xy, xy + 16 + torch.rand(500, 2, generator=generator) * 100], 1)
    deltas = (torch.randn(500, 4, generator=generator) * 0.2).to(torch.bfloat16)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = coder.decode(deltas, reference)
    assert decoded.dtype == torch.float32
    assert (decoded - coder.decode(deltas.float(), reference)).abs().max() <= 1e-3


def test_decode_clamps_huge_scales():
    decoded = BoxCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    assert decoded[0, 2] - decoded[0, 0] == pytest.approx(1000.0, rel=1e-4)


def test_matcher_by_hand():
    iou = torch.tensor([[0.9, 0.5, 0.1, 0.2, 0.0], [0.1, 0.65, 0.25, 0.0, 0.0]])
    matched, labels = Matcher(0.7, 0.3).match(iou)
    assert labels.tolist() == [1, -1, 0, 0, 0]
    assert matched[:2].tolist() == [0, 1]
    matched, labels = Matcher(0.7, 0.3, allow_low_quality_matches=True).match(iou)
    assert labels.tolist() == [1, 1, 0, 0, 0]  # prediction 1 is ground truth 1's best
    assert matched[1] == 1
    matched, labels = Matcher(0.7, 0.3).match(torch.zeros(0, 4))
    assert labels.tolist() == [0, 0, 0, 0]


def test_matcher_agrees_with_torchvision():
    iou = torch.rand(7, 300)
    ours_matched, ours_labels = Matcher(0.7, 0.3, True).match(iou)
    reference = tv_utils.Matcher(0.7, 0.3, True)(iou)
    assert torch.equal(ours_labels == 1, reference >= 0)
    assert torch.equal(ours_matched[ours_labels == 1], reference[reference >= 0])
    assert torch.equal(ours_labels == -1, reference == -2)


def test_sampler_balances_and_caps():
    labels = torch.full((3, 200), -1)
    labels[0, :10], labels[0, 10:110] = 1, 0  # plenty of both
    labels[1, :2], labels[1, 2:102] = 1, 0  # few positives: negatives fill up
    labels[2, :50], labels[2, 50:55] = 1, 0  # few negatives
    positive, negative = sample_balanced(labels, 16, 0.25)
    assert positive.sum(1).tolist() == [4, 2, 4]
    assert negative.sum(1).tolist() == [12, 14, 5]
    assert (labels[positive] == 1).all() and (labels[negative] == 0).all()
    assert not (positive & negative).any()
    again, _ = sample_balanced(labels, 16, 0.25)
    assert not torch.equal(again[0], positive[0]) or not torch.equal(again[2], positive[2])  # random draws


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_roi_align_equals_torchvision(aligned, channels_last):
    from torchvision.ops import roi_align

    from heads.roi_align import sparse_roi_align

    torch.manual_seed(0)
    features = torch.randn(2, 8, 25, 34)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_(True)
    xy = torch.rand(40, 2) * torch.tensor([130.0, 100.0])
    rois = torch.cat([torch.randint(0, 2, (40, 1)).float(), xy, xy + torch.rand(40, 2) * 60], dim=1)
    rois[0, 1:] = torch.tensor([-20.0, -20.0, 200.0, 150.0])  # beyond the map on every side
    rois[1, 1:] = torch.tensor([10.0, 10.0, 10.5, 10.2])  # smaller than a pixel
    expected = roi_align(features, rois, 7, 0.25, 2, aligned)
    got = sparse_roi_align(features, rois, 7, 0.25, 2, aligned)
    assert (got - expected).abs().max() <= 1e-5
    grad = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, features, grad)
    (got_grad,) = torch.autograd.grad(got, features, grad)
    assert (got_grad - expected_grad).abs().max() <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_rpn_losses_from_sampled_anchors_equal_the_full_head(channels_last):
    """The RPN computes its head for the loss only at the sampled anchors (RPNHead.at): the same losses and
    the same gradients (features and every head parameter) as the head run over whole maps and read at
    those anchors, in float64 so that only a wrong formula could tell them apart."""
    import torch.nn.functional as F

    from backbones import ShapeSpec
    from heads import RPN
    from heads.rpn import flatten_levels

    torch.manual_seed(0)
    shapes = {"p2": ShapeSpec(8, 4), "p3": ShapeSpec(8, 8), "p4": ShapeSpec(8, 16)}
    rpn = RPN(shapes, ["p2", "p3", "p4"], anchor_sizes=((16,), (32,), (64,)), batch_size_per_image=64).double()
    for p in rpn.head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    maps = [torch.randn(2, 8, 128 // s, 160 // s, dtype=torch.float64).contiguous(memory_format=memory_format)
            for s in (4, 8, 16)]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 30.0, 24.0], [60.0, 40.0, 124.0, 100.0]], dtype=torch.float64),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[100.0, 90.0, 160.0, 128.0]], dtype=torch.float64), "labels": torch.tensor([1])}]

    def grads(losses, inputs):
        total = losses["loss_rpn_objectness"] + losses["loss_rpn_box"]
        return torch.autograd.grad(total, inputs)

    features = [m.detach().requires_grad_() for m in maps]
    torch.manual_seed(1)
    _, losses = rpn.train()(dict(zip(["p2", "p3", "p4"], features)), torch.tensor([[128.0, 160.0]] * 2), targets)
    got = grads(losses, features + list(rpn.head.parameters()))

    # reference: the head over whole maps, then the anchors read out of its flattened outputs
    features = [m.detach().requires_grad_() for m in maps]
    logits, deltas = flatten_levels(*rpn.head(features))
    anchors = torch.cat(rpn.anchor_generator([tuple(m.shape[-2:]) for m in maps], (128, 160)))
    labels, matched = rpn.label_anchors(anchors, targets)
    torch.manual_seed(1)
    positive, negative = sample_balanced(labels, 64, 0.5)
    sampled = positive | negative
    assert positive.sum() >= 3 and sampled.sum() > 100
    num = sampled.sum()
    expected_losses = {
        "loss_rpn_box": F.smooth_l1_loss(deltas[positive], rpn.box_coder.encode(matched[positive], anchors.expand_as(deltas)[positive]),
                                         beta=1 / 9, reduction="sum") / num,
        "loss_rpn_objectness": F.binary_cross_entropy_with_logits(logits[sampled], positive[sampled].double(), reduction="sum") / num,
    }
    expected = grads(expected_losses, features + list(rpn.head.parameters()))
    for key in expected_losses:
        torch.testing.assert_close(losses[key], expected_losses[key], rtol=1e-12, atol=0)
    assert all(g.abs().sum() > 0 for g in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def _two_images() -> Detections:
    boxes = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    scores, labels = torch.tensor([[0.9, 0.5, 0.0], [0.7, 0.0, 0.0]]), torch.tensor([[3, 1, 0], [2, 0, 0]])
    return Detections({"boxes": boxes, "scores": scores, "labels": labels}, scores > 0)


def test_detections_are_cut_per_image_at_their_counts():
    detections = _two_images()
    assert len(detections) == 2
    first, second = detections
    assert torch.equal(first["boxes"], torch.arange(8.0).view(2, 4)) and first["labels"].tolist() == [3, 1]
    assert second["scores"].tolist() == [pytest.approx(0.7)] and second["boxes"].tolist() == [[12.0, 13.0, 14.0, 15.0]]
    assert detections[-1]["labels"].tolist() == [2]
    moved = detections.replace(boxes=detections.fields["boxes"] * 2)
    assert moved[0]["boxes"][1].tolist() == [8.0, 10.0, 12.0, 14.0] and detections[0]["boxes"][1, 0] == 4.0


def test_detections_cut_by_their_mask_inside_a_trace():
    """Traced (an ONNX export), the counts are not constants of the graph: the per-image cut follows the mask
    of the images the traced function is called with."""
    traced = torch.jit.trace(lambda scores: tuple(Detections({"scores": scores}, scores > 0)[0].values()),
                             torch.tensor([[0.9, 0.5, 0.0]]))
    assert traced(torch.tensor([[0.8, 0.0, 0.0]]))[0].tolist() == [pytest.approx(0.8)]


def test_detections_padded_from_per_image_lists_give_them_back():
    images = list(_two_images())
    padded = Detections.from_images(images)
    assert padded.fields["boxes"].shape == (2, 2, 4) and padded.valid.tolist() == [[True, True], [True, False]]
    for back, image in zip(padded, images):
        assert all(torch.equal(back[name], image[name]) for name in image)
    assert len(Detections.from_images([])) == 0
