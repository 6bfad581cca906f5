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

# what ``compile_model`` sets (for the whole process: dynamo reads them when a call first compiles)
DYNAMO_SETTINGS = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """``DYNAMO_SETTINGS`` for the duration of a block (an export; ``torch._dynamo.explain`` in tests)."""
    with torch._dynamo.config.patch(**DYNAMO_SETTINGS):
        yield


def compile_model(model: nn.Module, **options) -> nn.Module:
    """``torch.compile(model, **options)`` under ``DYNAMO_SETTINGS``. The result's parameters are the model's;
    its state dict's keys have the prefix ``_orig_mod.``: save ``model`` itself (or accelerate's
    ``unwrap_model(..., keep_torch_compile=False)``). The settings are set process-wide: dynamo reads them
    when the compiled model is first called, not when ``torch.compile`` wraps it."""
    for key, value in DYNAMO_SETTINGS.items():
        setattr(torch._dynamo.config, key, value)
    return torch.compile(model, **options)
