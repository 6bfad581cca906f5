"""The processes of a job on a cluster: how restarted workers find each other (``join_process_group``), and
how each watches the others (``Watchdog``).

**Restarts.** torchrun's agent (``accelerate launch --max_restarts N``) restarts every worker of the job when
one is lost. torch's ``env://`` rendezvous writes each attempt's keys under the same names of the same store
(the agent's, which outlives its workers), so a restarted worker can read a lost worker's address and fail to
connect (``Gloo connectFullMesh failed``). ``join_process_group`` counts each rank's starts in that store; a
restarted worker (its rank's start 2, 3, ...: the same on every machine, since all workers restart together)
joins a process group whose keys carry that number.

**No silent hang**: a process that stops making progress ends the whole job within
``train.collective_timeout_s`` with one line naming it.

Each process runs one daemon thread. Every ``period`` seconds it posts to the rendezvous store (the TCP store
``accelerate launch`` / torchrun already runs at ``MASTER_ADDR:MASTER_PORT``) a heartbeat (a counter) and the
training loop's progress (a counter the loop moves when it has its batch and when its step is done, and the
iteration), and reads the others'. A process is declared lost when

- its heartbeat has not changed for the timeout (less two periods, so that the others exit within it):
  the whole process is stopped (``SIGSTOP``, a frozen machine), killed or cut off; or
- its progress has stayed behind this process's for the timeout, while the heartbeat goes on: its training
  loop is stuck (a read that never returns, a deadlock), and this process waits for it in a collective.

The thread then prints ``error: rank R ...`` (the rank, what it did not do, its iteration and the last
checkpoint) and ends its own process with exit code ``WATCHDOG_EXIT``; the launcher (torchrun's agent) then
stops the other processes, or restarts them all with ``--max_restarts``. The same timeout is the process
group's (``InitProcessGroupKwargs``): a collective every process waits in (a deadlock of all) raises after it.

Heartbeats are compared with this process's own clock (a value that has not changed since it was first seen
here), so the machines' clocks need not agree.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

import torch
from accelerate import Accelerator
from torch.distributed import PrefixStore, TCPStore
from tqdm import tqdm

WATCHDOG_EXIT = 3


def _agent_store() -> TCPStore | None:
    """A client of the store torchrun's agent hosts for the job's workers, if this process is such a worker."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return None
    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=300))


@functools.cache
def start_number() -> int:
    """How many times this rank's worker has started in this job: 1, then 2, 3, ... after each restart by
    torchrun's agent (1 outside one)."""
    store = _agent_store()
    return int(store.add(f"resdet/starts/rank{os.environ['RANK']}", 1)) if store is not None else 1


def join_process_group(device: str, timeout: timedelta) -> None:
    """A restarted worker's process group (see the module docstring), before accelerate would make one with the
    lost attempt's keys; the first start leaves it to accelerate. ``device``: ``cpu`` (gloo), ``cuda`` (NCCL),
    ..., as ``torch.distributed`` maps it."""
    start = start_number()
    if start == 1 or torch.distributed.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(
        torch.distributed.Backend.default_device_backend_map.get(device, "gloo"),
        store=PrefixStore(f"resdet/start_{start}/", _agent_store()),
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


class Watchdog:
    """See the module docstring. ``mark`` is the training loop's only call (an attribute update); a run on one
    process, or with ``timeout_s`` 0, watches nothing. ``last_checkpoint`` names the checkpoint to resume
    from in the message."""

    def __init__(self, accelerator: Accelerator, timeout_s: float, last_checkpoint: Callable[[], object]):
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.timeout_s = float(timeout_s)
        self.period_s = max(0.2, min(self.timeout_s / 8, 10.0))
        self.limit_s = self.timeout_s - 2 * self.period_s  # silent this long: lost (found within the timeout)
        self.last_checkpoint = last_checkpoint
        self.progress, self.iteration = 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None

    def mark(self, iteration: int) -> None:
        """The training loop moved on (it has its batch, or its step is done) at ``iteration``."""
        self.progress += 1
        self.iteration = iteration

    def __enter__(self) -> "Watchdog":
        address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if self.world > 1 and self.timeout_s > 0 and address and port:
            client = TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=self.timeout_s),
                              wait_for_workers=False)
            self._store = PrefixStore(f"resdet/watchdog/{start_number()}/", client)
            self._post("0 0 0")
            self._thread = threading.Thread(target=self._watch, name="resdet-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._post("done")  # this process has left the loop: the others stop watching it

    def _post(self, value: str) -> None:
        try:
            self._store.set(f"rank{self.rank}", value)
        except Exception:  # noqa: BLE001 - the store gone (its machine lost): the read below reports it
            pass

    def _watch(self) -> None:
        beats: dict[int, tuple[bytes | None, float]] = {}  # rank -> (heartbeat, when this process saw it change)
        moves: dict[int, tuple[int, float]] = {}  # rank -> (progress, when this process saw it change)
        mine: tuple[int, float] = (-1, time.monotonic())
        beat = 0
        while not self._stop.wait(self.period_s):
            beat += 1
            progress, iteration = self.progress, self.iteration
            self._post(f"{beat} {progress} {iteration}")
            now = time.monotonic()
            if progress != mine[0]:
                mine = (progress, now)
            for rank in range(self.world):
                if rank != self.rank:
                    self._check(rank, beats, moves, now, mine, iteration)

    def _check(self, rank: int, beats: dict, moves: dict, now: float, mine: tuple[int, float], iteration: int) -> None:
        """One look at ``rank``'s post; ``_fail`` if it is lost (see the module docstring)."""
        key = f"rank{rank}"
        try:
            value = self._store.get(key) if self._store.check([key]) else None
        except Exception as error:  # noqa: BLE001 - the store's host is the job's first machine
            self._fail(f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                       f"does not answer ({error}): the first machine is lost", iteration)
        if value == b"done":
            return
        heartbeat, progress, their_iteration = value.split() if value else (None, -1, "?")
        progress = int(progress)
        if rank not in beats or beats[rank][0] != heartbeat:
            beats[rank] = (heartbeat, now)
        if rank not in moves or moves[rank][0] != progress:
            moves[rank] = (progress, now)
        if now - beats[rank][1] > self.limit_s:
            self._fail(f"rank {rank} has not answered for {now - beats[rank][1]:.0f} s (train.collective_timeout_s="
                       f"{self.timeout_s:g}): the process is stopped, killed or cut off; its last heartbeat was at "
                       f"its iteration {_text(their_iteration)}", iteration)
        stuck = min(now - moves[rank][1], now - mine[1])
        if 0 <= progress < mine[0] and stuck > self.limit_s:
            self._fail(f"rank {rank} has made no progress for {stuck:.0f} s (train.collective_timeout_s="
                       f"{self.timeout_s:g}) at its iteration {_text(their_iteration)} while rank {self.rank} waits "
                       f"for it: its training loop is stuck (a read that never returns, a deadlock)", iteration)

    def _fail(self, what: str, iteration: int) -> None:
        latest = self.last_checkpoint()
        tqdm.write(f"error: {what}; rank {self.rank} stops the job at iteration {iteration}; the last checkpoint "
                   f"is {latest or 'none (no checkpoint written yet)'} (resume=auto continues from it)",
                   file=sys.stderr)
        sys.stderr.flush()
        os._exit(WATCHDOG_EXIT)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
