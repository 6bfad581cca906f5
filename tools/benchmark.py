"""Speed and memory of a config's model, optionally side by side with torchvision's equivalent detector.

    python tools/benchmark.py CONFIG --mode data [--synthetic-coco-train [IMAGES]]
    python tools/benchmark.py CONFIG --mode train|infer|data [--compare torchvision|onnxruntime|compiled|cuda_graphs
        [--weights FILE.onnx]]
        [--device cpu|cuda] [--batch-size B] [--size HxW] [--iters N] [--warmup W] [--mixed-precision no|bf16|fp16]
        [--output FILE.json] [--cpu-allocator default|retain] [key=value ...]
    python tools/benchmark.py --mode eval [--images 5000] [--per-image 100] [--output FILE.json]
    python tools/benchmark.py CONFIG --mode syncs [--compare torchvision] [--batch-size B] [--size HxW] [--device D]

train: full training steps (forward, backward, SGD step) on synthetic images and boxes of the given size;
infer: forward in eval mode with post-processing; data: the config's training dataset (seconds to build it,
memory it adds to the process, memory a forked DataLoader worker copies of it once Python's garbage
collector has walked it) and its data loader (images per second with ``data.num_workers`` workers;
``--synthetic-coco-train`` builds it from a generated COCO-train2017-sized annotation file instead and
measures the first three only). Prints and writes images/second, seconds/iteration (median of
the timed iterations), peak memory (CUDA: what a step allocates on top of what was on the device before
it, plus the model's own parameters, buffers, gradients and optimizer state, so the other model of a
comparison is not counted; CPU: the process's peak RSS), parameters
and GFLOPs (multiply-adds x 2 of one forward in eval mode on a blank image; the heads' share depends on
how many proposals survive NMS). With ``--compare torchvision`` both models run
in the same process on the same inputs, alternating iteration by iteration, and ``time_ratio`` and
``memory_ratio`` (ours / theirs) are reported; torchvision's side is assembled to the config's layout (FPN,
C4 or DC5), depth and settings (``torchvision_detector``). ``--compare onnxruntime`` (infer) runs our model
exported to ONNX in this run (``--weights FILE.onnx``: that file instead) on ONNX Runtime, ``time_ratio`` =
ours / ONNX Runtime. ``--compare compiled`` runs the same model and weights through ``torch.compile``
(``tasks/modeling/compiling.py``; inference with inductor's ``freezing``): ``time_ratio`` = eager / compiled,
and the graphs and breaks dynamo made (compilation happens in the warm-up); ``--compare cuda_graphs`` (CUDA)
the same model with its backbone captured as CUDA graphs (``train.cuda_graphs``). Pretrained weights are not loaded: both models
start from random weights. ``--cpu-allocator retain`` makes glibc keep freed memory
for reuse, which takes page-fault time (and its dependence on the other model) out of CPU figures.

    python tools/benchmark.py --suite gpu --output DIR [--device cuda] [--size HxW] [--iters N] [--warmup W]

--suite gpu runs everything the GPU figures need and writes one report, ``DIR/report.json`` (``tools/gpu_suite.py``).

eval (no config): COCO bbox evaluation of a COCO-val-sized synthetic ground truth and results set
(``synthetic_coco_eval_set``), timed with each backend (pycocotools, faster_coco_eval) side by side:
seconds for loading the results, evaluating, accumulating and summarizing, ``time_ratio`` (faster /
pycocotools) and whether the 12 numbers agree to 1e-6.

syncs: the host-blocking points (data-dependent ops, scalar reads, blocking host-to-device copies) of one
training step and one inference call of the config's detector on a synthetic batch, by kind and call site,
with CUDA's code paths even on the CPU (``tools/syncs.py``); ``--compare torchvision``: its detector too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torchvision
from pycocotools.coco import COCO
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from backbones.errors import UserError
from heads import torchvision_roi_align
from tasks.cli import DEBUG_HELP, tool
from tasks.config import load_config
from tasks.deploy import onnx_runner
from tasks.detection.model import resolve_detector_config
from tasks.engine import TrainingStream
from tasks.evaluation.coco import coco_evaluate
from tasks.modeling.compiling import capture_cuda_graphs, compile_model
from tasks.registry import get_task, prepare_config
from tools.gpu_suite import gpu_suite
from tools.syncs import count_model_syncs, torchvision_inputs


def synthetic_batch(batch_size: int, height: int, width: int, num_classes: int, seed: int = 0, masks: bool = False):
    """uint8 images and 1-8 random boxes per image, the same for every model; with ``masks`` each box's
    instance mask (the ellipse inscribed in it)."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator) for _ in range(batch_size)]
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(1, 9, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        wh = (torch.rand(n, 2, generator=generator) * 0.3 + 0.05) * torch.tensor([width, height])
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1),
                        "labels": torch.randint(1, num_classes + 1, (n,), generator=generator)})
        if masks:
            ys, xs = torch.arange(height)[:, None] + 0.5, torch.arange(width)[None, :] + 0.5
            centre, half = xy + wh / 2, wh / 2
            targets[-1]["masks"] = torch.stack([((xs - cx) / hw) ** 2 + ((ys - cy) / hh) ** 2 <= 1
                                                for (cx, cy), (hw, hh) in zip(centre, half)]).to(torch.uint8)
    return images, targets


def torchvision_detector(config, height: int, width: int) -> torch.nn.Module:
    """torchvision's ``FasterRCNN`` assembled to the config's architecture: its layout (``fpn``: torchvision's
    ResNet-FPN backbone; ``c4``: the trunk to ``layer3`` feeds the RPN and a 14x14 RoIAlign, ``layer4`` +
    average pooling is the box head; ``dc5``: ``layer4`` dilated, one level, 7x7 RoIAlign and two fc
    layers), depth, classes and anchors, a FrozenBN ResNet with the stem and ``layer1`` frozen (torchvision's
    own COCO training setting), and the config's RPN and RoI-head sampling, thresholds and top-k. Its
    internal resize is set to the benchmark's image size, so both models see the same pixels. With
    ``model.masks``, its ``MaskRCNN`` with the config's mask head (FPN and DC5: torchvision has no C4 mask
    branch, which shares the box head's ``res5``)."""
    top = resolve_detector_config(config.model)
    layout = top["layout"]
    settings = _torchvision_settings(top["rpn"], top["roi_heads"], height, width)
    num_classes = top["num_classes"] + 1
    body = getattr(torchvision.models, f"resnet{top['backbone']['depth']}")(
        norm_layer=FrozenBatchNorm2d, replace_stride_with_dilation=[False, False, layout == "dc5"]
    )
    anchors = top["anchors"]
    sizes = tuple(tuple(level) for level in anchors["sizes"])
    ratios = tuple(tuple(level) for level in anchors["aspect_ratios"]) * (len(sizes) if len(anchors["aspect_ratios"]) == 1 else 1)
    anchor_generator = AnchorGenerator(sizes, ratios)
    if top["masks"]:
        settings = {**settings, **_torchvision_mask_settings(top, layout, body, num_classes)}
    detector = torchvision.models.detection.MaskRCNN if top["masks"] else torchvision.models.detection.FasterRCNN
    if layout == "fpn":
        predictor = settings.pop("mask_predictor", None)  # MaskRCNN takes it only without num_classes
        model = detector(_resnet_fpn_extractor(body, 3), num_classes=num_classes, rpn_anchor_generator=anchor_generator,
                         **settings)
        if predictor is not None:
            model.roi_heads.mask_predictor = predictor
        return model
    return _torchvision_single_level(body, layout, top["roi_heads"], anchor_generator, num_classes, settings, detector)


def _torchvision_mask_settings(top: dict, layout: str, body, num_classes: int) -> dict:
    """``MaskRCNN``'s mask pooler, head and predictor for the config's ``mask_head``."""
    if layout == "c4":
        raise UserError("--compare torchvision: torchvision has no C4 Mask R-CNN (its mask branch cannot share the "
                        "box head's res5); compare an fpn or dc5 layout")
    mask = top["mask_head"]
    channels = top["fpn"]["out_channels"] if layout == "fpn" else body.layer4[-1].conv1.in_channels
    names = ["0", "1", "2", "3"] if layout == "fpn" else ["0"]
    dims = [mask["conv_dim"]] * mask["num_conv"]
    return {"mask_roi_pool": MultiScaleRoIAlign(names, mask["pooler_resolution"], mask["sampling_ratio"]),
            "mask_head": MaskRCNNHeads(channels, dims, 1),
            "mask_predictor": MaskRCNNPredictor(dims[-1] if dims else channels, mask["conv_dim"], num_classes)}


def _torchvision_settings(rpn: dict, roi: dict, height: int, width: int) -> dict:
    """``FasterRCNN``'s keyword arguments for the config's RPN and RoI-head settings, resized to the image."""
    return dict(
        min_size=min(height, width), max_size=max(height, width),
        rpn_pre_nms_top_n_train=rpn["pre_nms_topk"][0], rpn_pre_nms_top_n_test=rpn["pre_nms_topk"][1],
        rpn_post_nms_top_n_train=rpn["post_nms_topk"][0], rpn_post_nms_top_n_test=rpn["post_nms_topk"][1],
        rpn_nms_thresh=rpn["nms_thresh"], rpn_fg_iou_thresh=rpn["iou_thresholds"][1],
        rpn_bg_iou_thresh=rpn["iou_thresholds"][0], rpn_batch_size_per_image=rpn["batch_size_per_image"],
        rpn_positive_fraction=rpn["positive_fraction"], box_score_thresh=roi["score_thresh"],
        box_nms_thresh=roi["nms_thresh"], box_detections_per_img=roi["detections_per_image"],
        box_fg_iou_thresh=roi["fg_iou"], box_bg_iou_thresh=roi["bg_iou"],
        box_batch_size_per_image=roi["batch_size_per_image"], box_positive_fraction=roi["positive_fraction"],
    )


def _torchvision_single_level(body, layout: str, roi: dict, anchor_generator, num_classes: int,
                              settings: dict, detector=torchvision.models.detection.FasterRCNN) -> torch.nn.Module:
    """The ``c4`` or ``dc5`` ``FasterRCNN`` on the ResNet ``body``: one feature level, the stem and
    ``layer1`` frozen; ``c4``: ``layer4`` + average pooling is the box head, ``dc5``: two fc layers."""
    for module in (body.conv1, body.layer1):
        module.requires_grad_(False)
    resolution = roi["pooler_resolution"]
    stem = [body.conv1, body.bn1, body.relu, body.maxpool, body.layer1, body.layer2, body.layer3]
    channels = {"res4": body.layer3[-1].conv1.in_channels, "res5": body.layer4[-1].conv1.in_channels}
    if layout == "c4":
        trunk, trunk_channels = torch.nn.Sequential(*stem), channels["res4"]
        box_head = torch.nn.Sequential(body.layer4, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        head_channels = channels["res5"]
    else:
        trunk, trunk_channels = torch.nn.Sequential(*stem, body.layer4), channels["res5"]
        head_channels = roi["fc_dim"]
        box_head = TwoMLPHead(trunk_channels * resolution**2, head_channels)
    trunk.out_channels = trunk_channels
    return detector(
        trunk, num_classes=None, rpn_anchor_generator=anchor_generator,
        rpn_head=RPNHead(trunk_channels, anchor_generator.num_anchors_per_location()[0]),
        box_roi_pool=MultiScaleRoIAlign(["0"], resolution, roi["sampling_ratio"]), box_head=box_head,
        box_predictor=FastRCNNPredictor(head_channels, num_classes), **settings,
    )


class Runner:
    """One model and how to run one step of it."""

    def __init__(self, name: str, model: torch.nn.Module, mode: str, device: torch.device, autocast_dtype,
                 torchvision_api: bool):
        self.name, self.model, self.mode, self.device = name, model.to(device), mode, device
        self.autocast_dtype, self.torchvision_api = autocast_dtype, torchvision_api
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=1e-4, momentum=0.9) if trainable else None  # None: ONNX Runtime
        self.times: list[float] = []
        self.peak = 0
        self.marks_steps = False  # CUDA graph trees: each step starts by marking that the last one's outputs are done

    def inputs(self, images, targets):
        if self.torchvision_api:  # torchvision takes float images in 0..1 on the model's device
            images = [i.to(self.device).float() / 255 for i in images]
            targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        return images, targets

    def step(self, images, targets) -> None:
        images, targets = self.inputs(images, targets)
        if self.marks_steps:
            torch.compiler.cudagraph_mark_step_begin()
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        if self.mode == "train":
            self.model.train()
            with autocast:
                losses = self.model(images, targets)
            loss = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        else:
            self.model.eval()
            with torch.no_grad(), autocast:
                self.model(images)

    def state_bytes(self) -> int:
        """Bytes this model keeps between steps: parameters, buffers, gradients and optimizer state."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for state in (self.optimizer.state.values() if self.optimizer else []) for t in state.values()
                    if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors if t.device.type == self.device.type)

    def timed_step(self, images, targets) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            baseline = torch.cuda.memory_allocated(self.device)
            own = self.state_bytes()
        start = time.perf_counter()
        self.step(images, targets)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # both models live on the device: count what this step allocated on top of everything that
            # was there before it, plus this model's own state (not the other model's)
            step_peak = torch.cuda.max_memory_allocated(self.device) - baseline + own
            self.peak = max(self.peak, step_peak)
        self.times.append(time.perf_counter() - start)

    def summary(self, batch_size: int, height: int, width: int) -> dict:
        median = statistics.median(self.times)
        model = self.model
        params = sum(p.numel() for p in model.parameters())
        model.eval()
        images = [torch.zeros(3, height, width, dtype=torch.uint8)]
        images, _ = self.inputs(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
        # the sparse RoIAlign would be counted as a dense product
        # a compiled model's FLOPs counted on its own code, run eagerly (no compilation for this one call)
        with (torchvision_roi_align(model), torch.no_grad(), torch.compiler.set_stance("force_eager"),
              FlopCounterMode(display=False) as counter):
            model(images)
        result = {
            "seconds_per_iteration": median,
            "images_per_second": batch_size / median,
            "times": self.times,
            "parameters": params,
            "gflops_per_image": counter.get_total_flops() / 1e9,
        }
        if self.device.type == "cuda":
            result["peak_memory_bytes"] = self.peak
        return result


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (no ``mmap`` for large blocks, no trimming)
    instead of returning it to the system: otherwise every large activation of every step is a fresh
    mapping that the kernel zero-fills page by page, which costs about a fifth of a CPU training step and
    varies with what else the process allocated (it slows whichever model runs second in a side-by-side
    run). Applies to the whole process, so to both models alike. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def twin_runner(variant: str, model: torch.nn.Module, task, config, mode: str, device: torch.device,
                autocast_dtype) -> Runner:
    """The same model and weights run another way: through ``torch.compile`` (``compiled``; inference with
    inductor's ``freezing``, the weights folded as constants), or with its backbone captured as CUDA graphs
    (``cuda_graphs``)."""
    if variant == "cuda_graphs" and device.type != "cuda":
        raise UserError(f"--compare cuda_graphs captures CUDA graphs: it needs a CUDA device, not {device}")
    twin = task.build_model(config, init_weights=False)
    twin.load_state_dict(model.state_dict())
    if variant == "compiled":
        twin = compile_model(twin, options={"freezing": True} if mode == "infer" else None)
    else:
        twin = capture_cuda_graphs(twin.to(device))
    runner = Runner(variant, twin, mode, device, autocast_dtype, False)
    runner.marks_steps = variant == "cuda_graphs"
    return runner


def benchmark_models(args, config) -> dict:
    device = torch.device(args.device)
    height, width = (int(v) for v in args.size.lower().split("x"))
    task = get_task(config.task)
    autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    # speed does not depend on the values: the initialisation weights are neither fetched nor read
    runners = [Runner("ours", task.build_model(config, init_weights=False), args.mode, device, autocast_dtype, False)]
    if args.compare == "torchvision":
        if config.task != "detection":
            raise UserError("--compare torchvision is implemented for detection configs")
        runners.append(Runner("torchvision", torchvision_detector(config, height, width), args.mode, device, autocast_dtype,
                              True))
    if args.compare in ("compiled", "cuda_graphs"):
        runners.append(twin_runner(args.compare, runners[0].model, task, config, args.mode, device, autocast_dtype))
    if args.compare == "onnxruntime":  # the same model exported (or --weights FILE.onnx), run on ONNX Runtime
        runners.append(Runner("onnxruntime", onnx_runner(runners[0].model, config, args.mode, args.weights),
                              args.mode, device, None, False))
    images, targets = synthetic_batch(args.batch_size, height, width, config.model.get("num_classes", 80),
                                      masks=bool(config.model.get("masks")))
    for runner in runners:  # warm-up, then alternate the models iteration by iteration
        for _ in range(args.warmup):
            runner.step(images, targets)
    rss: dict[str, int] = {}
    for _ in range(args.iters):
        for runner in runners:
            runner.timed_step(images, targets)
            rss[runner.name] = peak_rss_bytes()
    results = {r.name: r.summary(args.batch_size, height, width) for r in runners}
    if args.compare == "compiled":  # graphs dynamo made (a recompile makes one more), breaks in them
        stats = torch._dynamo.utils.counters
        results["compiled"]["graphs"] = stats["stats"]["unique_graphs"]
        results["compiled"]["graph_breaks"] = sum(stats["graph_break"].values())
    if device.type == "cpu":
        # process RSS only grows: the peak seen after each model's first timed step is attributed to it
        results["ours"]["peak_rss_bytes"] = rss.get("ours")
        if args.compare in results:
            results[args.compare]["peak_rss_bytes"] = rss.get(args.compare)
    if args.compare in results:
        ours, theirs = results["ours"], results[args.compare]
        results["time_ratio"] = ours["seconds_per_iteration"] / theirs["seconds_per_iteration"]
        key = "peak_memory_bytes" if device.type == "cuda" else None
        results["memory_ratio"] = ours[key] / theirs[key] if key else None
        # torchvision's mask predictor has a map for the background class too (one weight per input channel, a bias)
        model = runners[0].model
        extra = model.roi_heads.mask_head.predictor.in_channels + 1 if getattr(model, "has_masks", False) else 0
        results["same_parameters"] = (ours["parameters"] + extra == theirs["parameters"] if args.compare == "torchvision"
                                      else None)
        if results["same_parameters"] is False:  # e.g. a narrower FPN or fc head than torchvision builds
            print(f"warning: torchvision's side has {theirs['parameters']:,} parameters, ours {ours['parameters']:,}: "
                  "it does not mirror this config's architecture, the ratios compare different models", file=sys.stderr)
    return results


def benchmark_syncs(args, config) -> dict:
    """Host-blocking points of one training step and one inference call (``tools/syncs.py``), ours and, with
    ``--compare torchvision``, torchvision's detector of the same architecture, on the same batch."""
    if config.task != "detection":
        raise UserError("--mode syncs counts a detector's host syncs: give a detection config")
    if args.compare == "onnxruntime":
        raise UserError("--mode syncs compares with torchvision's detector: --compare torchvision")
    device = torch.device(args.device)
    height, width = (int(v) for v in args.size.lower().split("x"))
    images, targets = synthetic_batch(args.batch_size, height, width, config.model.get("num_classes", 80))
    ours = get_task(config.task).build_model(config, init_weights=False).to(device)
    results = {"ours": {k: r.as_dict() for k, r in count_model_syncs(ours, images, targets, device).items()}}
    if args.compare == "torchvision":
        theirs = torchvision_detector(config, height, width).to(device)
        counted = count_model_syncs(theirs, torchvision_inputs(images), targets, device, to_device=True)
        results["torchvision"] = {k: r.as_dict() for k, r in counted.items()}
    return results


def proc_bytes(table: str, key: str) -> int | None:
    """A memory figure of this process from ``/proc/self/<table>`` (``key: N kB``), in bytes; ``None`` off
    Linux."""
    try:
        for line in Path("/proc/self", table).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def private_dirty_bytes() -> int | None:
    """Memory this process has written to and so owns alone (``Private_Dirty``): in a forked worker, what
    it has copied from its parent."""
    return proc_bytes("smaps_rollup", "Private_Dirty")


def current_rss_bytes() -> int | None:
    """The process's resident memory now (``VmRSS``)."""
    return proc_bytes("status", "VmRSS")


def worker_copy_bytes() -> int | None:
    """What a forked DataLoader worker copies of its parent once Python's full garbage collection has
    walked the parent's objects (it writes to every tracked object's header, so each page holding one
    becomes the worker's own): the growth of a forked child's private memory across ``gc.collect()``.
    Measured before and after a dataset is built, the difference is the dataset's share."""
    if private_dirty_bytes() is None:
        return None

    def child(queue):
        before = private_dirty_bytes()
        gc.collect()
        queue.put(private_dirty_bytes() - before)

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    grown = queue.get(timeout=600)
    process.join()
    return grown


def synthetic_coco_train_annotations(path: Path, num_images: int = 118287, seed: int = 0) -> dict:
    """Write a COCO-train2017-sized instances file to ``path``: ``num_images`` 640x480 images, about 7
    annotations each (COCO train2017: 860k in 118k images), each a polygon of 8-40 points (a fifth split in
    two or three parts), 1% crowd regions as uncompressed RLE, 80 categories. About COCO's file size."""
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    images = [{"id": i + 1, "width": width, "height": height, "file_name": f"{i + 1:012d}.jpg"} for i in range(num_images)]
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, 81)]
    counts = rng.poisson(7, num_images)
    annotations = []
    for image_id, count in zip(range(1, num_images + 1), counts.tolist()):
        for _ in range(count):
            w, h = np.exp(rng.uniform(np.log(4), np.log(400), 2))
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            if rng.random() < 0.01:
                runs = rng.integers(1, 200, 40)
                segmentation = {"counts": [int(height * width - runs.sum())] + runs.tolist(), "size": [height, width]}
                crowd = 1
            else:
                parts = int(rng.choice([1, 2, 3], p=[0.8, 0.15, 0.05]))
                segmentation = [(np.stack([rng.uniform(x, x + w, n), rng.uniform(y, y + h, n)], 1).ravel().round(2)).tolist()
                                for n in rng.integers(8, 40, parts)]
                crowd = 0
            annotations.append({"segmentation": segmentation, "area": round(float(w * h * 0.6), 2), "iscrowd": crowd,
                                "image_id": image_id, "bbox": [round(float(v), 2) for v in (x, y, w, h)],
                                "category_id": int(rng.integers(1, 81)), "id": len(annotations) + 1})
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {"images": num_images, "annotations": len(annotations), "file_bytes": path.stat().st_size}


def benchmark_data(args, config) -> dict:
    """The config's training dataset: how long it takes to build, the memory it adds to the process and
    what each forked worker copies of it; then (unless ``--iters 0``) images/second through the training
    data loader with ``data.num_workers`` workers."""
    task = get_task(config.task)
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        if args.synthetic_coco_train:  # annotations only: no images to read
            root = Path(scratch)
            (root / "images").mkdir()
            results["synthetic_annotations"] = synthetic_coco_train_annotations(root / "instances.json",
                                                                               args.synthetic_coco_train)
            config.data.root, config.data.train.annotations, config.data.train.images = str(root), "instances.json", "images"
            args.iters = 0
        gc.collect()
        before, copied_before = current_rss_bytes(), worker_copy_bytes()
        start = time.perf_counter()
        dataset = task.train_dataset(config)
        results["build_seconds"] = time.perf_counter() - start
        gc.collect()
        after = current_rss_bytes()
        results["images"] = len(dataset)
        results["process_bytes_added"] = after - before if before is not None else None
        copied = worker_copy_bytes()
        results["worker_copy_bytes"] = copied - copied_before if copied is not None else None
    if args.iters <= 0:
        return results
    groups = getattr(dataset, "aspect_groups", lambda: None)()
    stream = TrainingStream(len(dataset), args.batch_size, config.seed, group_ids=groups)  # the training order
    loader = DataLoader(dataset, batch_sampler=stream, collate_fn=task.collate, num_workers=config.data.num_workers)
    iterator = iter(loader)
    for _ in range(args.warmup):
        next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(args.iters):
        images, _ = next(iterator)
        count += len(images)
    elapsed = time.perf_counter() - start
    workers = max(config.data.num_workers, 1)
    return {**results, "images_per_second": count / elapsed, "images_per_second_per_worker": count / elapsed / workers,
            "num_workers": config.data.num_workers}


def synthetic_coco_eval_set(num_images: int, per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A COCO-like ground truth (``num_images`` 640x480 images, 80 categories, about 7 boxes an image of
    all sizes, some crowd) and ``per_image`` detections an image: each object found with a jittered box
    and a score, the rest false positives, some of the wrong class. Deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    images = [{"id": i + 1, "width": width, "height": height, "file_name": f"{i + 1:012d}.jpg"} for i in range(num_images)]
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    annotations, results = [], []

    def boxes(n):  # x, y, w, h with sides from 4 to 400 pixels (log-uniform: small, medium and large objects)
        w, h = np.exp(rng.uniform(np.log(4), np.log(400), (2, n)))
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        return np.stack([x, y, w, h], 1)

    for image in images:
        count = rng.poisson(7)
        gt, labels = boxes(count), rng.integers(1, 81, count)
        for box, label in zip(gt, labels):
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": int(label),
                                "bbox": box.round(2).tolist(), "area": float(box[2] * box[3]),
                                "iscrowd": int(rng.random() < 0.01)})
        found = gt[: min(count, per_image)].copy()  # shifted and scaled by about 8% of the object's size
        found[:, :2] += found[:, 2:] * rng.normal(0, 0.08, (len(found), 2))
        found[:, 2:] *= np.exp(rng.normal(0, 0.08, (len(found), 2)))
        found_labels = np.where(rng.random(len(found)) < 0.9, labels[: len(found)], rng.integers(1, 81, len(found)))
        false = boxes(per_image - len(found))
        dets = np.concatenate([found, false])
        det_labels = np.concatenate([found_labels, rng.integers(1, 81, len(false))])
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(found)), rng.uniform(0.0, 0.6, len(false))])
        for box, label, score in zip(dets, det_labels, scores):
            results.append({"image_id": image["id"], "category_id": int(label), "bbox": box.round(2).tolist(),
                            "score": round(float(score), 4)})
    return {"images": images, "annotations": annotations, "categories": categories}, results


def benchmark_eval(args) -> dict:
    """Both COCO evaluation backends on the same synthetic set, one after the other."""
    dataset, results = synthetic_coco_eval_set(args.images, args.per_image)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
    timings, stats = {}, {}
    for backend in ("pycocotools", "faster_coco_eval"):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            stats[backend] = coco_evaluate(gt, results, "bbox", backend)
        timings[backend] = time.perf_counter() - start
    agree = all(abs(stats["pycocotools"][k] - stats["faster_coco_eval"][k]) <= 1e-6 for k in stats["pycocotools"])
    return {"images": args.images, "results": len(results), "annotations": len(dataset["annotations"]),
            "seconds": timings, "time_ratio": timings["faster_coco_eval"] / timings["pycocotools"],
            "same_numbers": agree, "AP": stats["pycocotools"]["AP"],
            "versions": {p: version(p) for p in ("pycocotools", "faster-coco-eval")}}


@tool
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="the config to measure (all modes but eval)")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--mode", choices=["train", "infer", "data", "eval", "syncs"], default="train")
    parser.add_argument("--suite", choices=["gpu"], help="gpu: the CUDA tests and every GPU figure, one report in "
                                                         "--output DIR (see gpu_suite)")
    parser.add_argument("--images", type=int, default=5000, help="eval: images of the synthetic set (COCO val: 5000)")
    parser.add_argument("--per-image", type=int, default=100, help="eval: detections an image")
    parser.add_argument("--synthetic-coco-train", type=int, nargs="?", const=118287, default=0, metavar="IMAGES",
                        help="data: build the training dataset from a generated COCO-train2017-sized annotation file "
                             "(118,287 images unless given) instead of the config's; build time and memory only")
    parser.add_argument("--compare", choices=["torchvision", "onnxruntime", "compiled", "cuda_graphs"])
    parser.add_argument("--weights", help="--compare onnxruntime: the exported .onnx file to run (default: ours, "
                                          "exported in this run)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda where there is one; --suite gpu: cuda)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", default="800x1088")
    parser.add_argument("--iters", type=int, help="timed iterations (default 5; --suite gpu: 20)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default 2; --suite gpu: 5)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--output")
    parser.add_argument("--cpu-allocator", choices=["default", "retain"], default="default",
                        help="retain: glibc keeps freed memory for reuse (see retain_freed_memory)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_intermixed_args(argv)
    args.device = args.device or ("cuda" if args.suite or torch.cuda.is_available() else "cpu")
    if args.suite == "gpu":
        report = gpu_suite(args)
        args.output, args.iters, args.warmup = str(Path(args.output) / "report.json"), report["iters"], report["warmup"]
        _report(args, report)
        return 0 if report["all_steps_ran"] else 1
    args.iters = 5 if args.iters is None else args.iters
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.mode == "eval":
        return _report(args, benchmark_eval(args))
    if args.config is None:
        parser.error(f"--mode {args.mode} measures a config: give its file")
    config = prepare_config(load_config(args.config, args.overrides))
    if args.cpu_allocator == "retain" and not retain_freed_memory():
        raise UserError("--cpu-allocator retain needs glibc's malloc")
    torch.manual_seed(0)
    run = {"data": benchmark_data, "syncs": benchmark_syncs}.get(args.mode, benchmark_models)
    return _report(args, run(args, config))


def _report(args, results: dict) -> int:
    """Print and write the results with what they were measured on."""
    record = {
        "config": args.config, "overrides": args.overrides, "mode": args.suite or args.mode, "device": args.device,
        "batch_size": args.batch_size, "size": args.size, "iters": args.iters, "warmup": args.warmup,
        "mixed_precision": args.mixed_precision, "cpu_allocator": args.cpu_allocator,
        "command": " ".join(["python", "tools/benchmark.py", *sys.argv[1:]]),
        "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                     "cpu_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__},
        "results": results,
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
