"""``torch.compile`` of a task model: the dynamo settings under which a whole detector is one graph.

A detector has one kind of operation whose result only the data decides: NMS, whose output length is the
number of boxes kept. With dynamo's defaults each NMS ends a graph (and the code after it starts another);
``capture_dynamic_output_shape_ops`` traces it instead (its length becomes a symbol of the graph), so that
the whole detector, training step or inference call, is one graph: ``tests/test_compile.py`` holds the
graph and break counts of every layout. Everything else in the heads has sizes known before the data
(fixed-size selections, the detections themselves at a fixed size), which is what makes this possible.
``capture_scalar_outputs`` traces the reads of a tensor as a number (the classifier's labels, read from the
host's targets) instead of ending the graph there.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch._dynamo
from torch import nn

# what ``compile_model`` sets (for the whole process: dynamo reads them when a call first compiles). The
# recompile limit: a run's graphs are one per batch shape (data.size_buckets), target count (a power of two)
# and mode, which can be more than dynamo's 8 (past it dynamo would run the rest eagerly)
DYNAMO_SETTINGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True, "recompile_limit": 64}


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """``DYNAMO_SETTINGS`` for the duration of a block (an export; ``torch._dynamo.explain`` in tests)."""
    with torch._dynamo.config.patch(**DYNAMO_SETTINGS):
        yield


def _set_process_wide() -> None:
    """``DYNAMO_SETTINGS`` for the rest of the process (a compiled call reads them when it first runs)."""
    for key, value in DYNAMO_SETTINGS.items():
        setattr(torch._dynamo.config, key, value)


def compile_model(model: nn.Module, **options) -> nn.Module:
    """``torch.compile`` under ``DYNAMO_SETTINGS``, of what the model runs on the device: its ``network``
    method where it has one (the detector: from the padded batch on, so that neither the images' own sizes
    nor the host's bookkeeping enter a graph; the model is returned, its state dict unchanged), else the whole
    model (the result's state dict has the prefix ``_orig_mod.``: save ``model`` itself, or accelerate's
    ``unwrap_model(..., keep_torch_compile=False)``). A DDP-wrapped model's own module is compiled. The
    settings are set process-wide: dynamo reads them when a compiled call first runs."""
    _set_process_wide()
    inner = getattr(model, "module", model)  # DistributedDataParallel's
    if callable(getattr(inner, "network", None)):
        inner.network = torch.compile(inner.network, **options)
        return model
    return torch.compile(model, **options)


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (a recompile makes one more)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def capture_cuda_graphs(model: nn.Module) -> nn.Module:
    """The model's backbone (with its FPN) run as CUDA graphs, in place (the state dict unchanged): compiled
    whole (``fullgraph``) with static shapes in inductor's ``reduce-overhead`` mode, whose CUDA graph trees
    record one graph per input shape and replay it with one launch, the hundreds of kernel launches of a
    ResNet gone from the host's work. Few shapes is what makes this pay: ``data.size_buckets``. The captured
    outputs' memory is reused by the next replay, so a training loop marks each step's start
    (``torch.compiler.cudagraph_mark_step_begin``, as the engine does). A DDP-wrapped model's own module."""
    _set_process_wide()
    getattr(model, "module", model).backbone.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)
    return model
