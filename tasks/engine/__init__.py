"""The training engine every task shares, on accelerate: the loop (``loop``), the batch order
(``stream``), the schedule (``schedules``), checkpoints and their manifests (``checkpoints``), stop signals
(``signals``), the processes of a job on a cluster (``cluster``: restarts, the watchdog), the experiment
trackers (``trackers``) and the interface a task implements (``protocol``). It knows nothing about boxes or
masks."""

from .checkpoints import CheckpointDir, write_json
from .loop import DataLoaderFault, NonFiniteLossError, TrainResult, make_accelerator, train
from .protocol import Task
from .schedules import lr_lambda, param_groups
from .signals import StopSignals
from .stream import TrainingStream

__all__ = ["CheckpointDir", "DataLoaderFault", "NonFiniteLossError", "StopSignals", "Task", "TrainResult",
           "TrainingStream", "lr_lambda", "make_accelerator", "param_groups", "train", "write_json"]
