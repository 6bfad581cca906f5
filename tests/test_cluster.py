"""Runs that survive the cluster, each fault injected for real: checkpoints damaged on disk (truncated, a
flipped byte) and saves that fail (a full disk, a read-only folder); a process stopped (SIGSTOP) or killed
(kill -9) in a two-process run; a stalled read; two machines joined by a network (two network namespaces).
The tests that mount file systems or create namespaces need root and skip, saying so, without it."""

import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY, free_port

from tasks.config import load_config
from tasks.engine import train
from tasks.engine.checkpoints import CheckpointDir, CheckpointWriteError, verify
from tasks.registry import get_task

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def run(shapes, out, *overrides, task=None):
    config = load_config(QUICKSTART, [*TINY, f"data.root={shapes}", f"output_dir={out}", *overrides])
    return train(task or get_task(config.task), config)


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows if "loss" in r}


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one flipped bit in the middle of the file: the size is right, the bytes are not
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_latest_checkpoint_is_found_and_the_run_resumes_from_the_one_before(shapes, tmp_path, how, caplog):
    reference = run(shapes, tmp_path / "reference", "train.max_iters=6")
    run(shapes, tmp_path / "run", "train.max_iters=4", "train.checkpoint_period=2")  # iter_2, iter_4 (final)
    checkpoints = CheckpointDir(tmp_path / "run", keep=2)
    latest = checkpoints.latest()
    assert latest.name == "iter_0000004" and verify(latest) is None
    manifest = json.loads((latest / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(manifest)
    damage(latest / "model.safetensors", how)
    problem = verify(latest)
    assert problem.startswith("model.safetensors ") and ("truncated" if how == "truncated" else "SHA-256") in problem

    with open(tmp_path / "run" / "metrics.jsonl", "a") as log:  # and the log's last line cut short by a crash
        log.write('{"iteration": 5, "loss_rpn_c')
    resumed = run(shapes, tmp_path / "run", "train.max_iters=6")  # resume=auto skips iter_4, takes iter_2
    assert f"checkpoint {latest} is damaged (model.safetensors" in caplog.text
    assert "falling back to the one before it" in caplog.text
    expected, got = losses(tmp_path / "reference"), losses(tmp_path / "run")
    for iteration in (3, 4, 5, 6):  # iterations 3 and 4 trained again, from iter_2: the same losses
        assert got[iteration] == pytest.approx(expected[iteration], rel=1e-5), iteration
    assert resumed.metrics == pytest.approx(reference.metrics, abs=1e-6)


def test_resume_from_a_named_damaged_checkpoint_is_an_error(shapes, tmp_path):
    from backbones.errors import UserError

    run(shapes, tmp_path / "run", "train.max_iters=2")
    folder = tmp_path / "run" / "checkpoints" / "iter_0000002"
    damage(folder / "optimizer.bin", "truncated")
    with pytest.raises(UserError, match=r"the checkpoint is damaged \(optimizer.bin is \d+ bytes, the manifest says"):
        run(shapes, tmp_path / "run", "train.max_iters=4", f"resume={folder}")


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mount {' '.join(args)} failed (needs root): {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 MB tmpfs: a disk of its own, filled or made read-only by the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk))
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` bytes free."""
    free = shutil.disk_usage(disk).free - leave
    with open(disk / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(free, 0))


@pytest.mark.parametrize("fault", ["ENOSPC", "EROFS"])
def test_a_save_that_fails_is_one_line_the_previous_checkpoint_intact(shapes, tmp_path, small_disk, fault):
    """The second checkpoint's save fails mid-write (the disk full with 100 kB left, or the folder made
    read-only): a one-line error naming the fault; the first checkpoint intact and still the latest; no
    temporary folder left; the run resumes from it elsewhere."""
    from test_engine import with_training_hook

    out = small_disk / "run"

    def fault_at_call_4(n, losses):
        if n == 4:
            if fault == "ENOSPC":
                _fill(small_disk, leave=100_000)
            else:
                _mount("--bind", str(out / "checkpoints"), str(out / "checkpoints"))
                _mount("-o", "remount,bind,ro", str(out / "checkpoints"))

    try:
        with pytest.raises(CheckpointWriteError) as failed:
            run(shapes, out, "train.max_iters=6", "train.checkpoint_period=2", task=with_training_hook(fault_at_call_4))
    finally:
        if fault == "EROFS":
            subprocess.run(["umount", str(out / "checkpoints")], check=False)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write checkpoint {out / 'checkpoints' / 'iter_0000004'}: ")
    assert ("No space left on device" if fault == "ENOSPC" else "Read-only file system") in message
    assert f"the previous checkpoint {out / 'checkpoints' / 'iter_0000002'} is intact" in message
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["iter_0000002", "latest"]  # no temporary folder left behind
    assert verify(out / "checkpoints" / "iter_0000002") is None
    (small_disk / "filler").unlink(missing_ok=True)
    resumed = run(shapes, out, "train.max_iters=6")
    assert resumed.iterations == 6 and 3 in losses(out)


# --- several processes: the fault tests launch real jobs with accelerate ----------------------------------

JOB = ["train.max_iters=12", "train.checkpoint_period=4", "train.log_period=1"]


def _job_args(shapes, out, *overrides) -> list[str]:
    return ["tools/train.py", str(QUICKSTART), *TINY, f"data.root={shapes}", f"output_dir={out}", *JOB, *overrides]


def _launch(*args: str, machines: int = 1, rank: int = 0, ip: str = "127.0.0.1", port: int | None = None,
            prefix: tuple[str, ...] = (), env: dict | None = None) -> subprocess.Popen:
    """``accelerate launch`` of 2 processes over ``machines`` machines (``prefix``: e.g. ``ip netns exec``)."""
    command = [*prefix, sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", ip,
               "--main_process_port", str(port or free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr.replace("\r", "\n"))


def _finish_all(jobs: list[subprocess.Popen], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Wait for every job of a several-machine run. One that fails ends the others (they would wait for it in
    the rendezvous until its timeout); on the deadline all are killed. Each job's output is returned."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(job.poll() is None for job in jobs):
        if any(job.poll() not in (None, 0) for job in jobs):
            time.sleep(5)  # the others' own errors first, if they have any
            break
        time.sleep(0.2)
    for job in jobs:
        if job.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it may have ended since
                os.killpg(job.pid, signal.SIGKILL)  # the launcher and its workers (each job is its own session)
    return [_finish(job, timeout=60) for job in jobs]


def _worker(launcher: subprocess.Popen, local_rank: int) -> int:
    """The pid of the launcher's worker of ``local_rank`` (its child whose environment says so)."""
    for _ in range(600):
        for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == launcher.pid and f"LOCAL_RANK={local_rank}".encode() in environ:
                return pid
        time.sleep(0.1)
    raise AssertionError("no such worker")


def _error_line(job: subprocess.Popen, start: str, limit: float) -> list[str]:
    """The job's stderr read until a line holding ``start`` (returned from there, in a list), or its end; the
    job is killed if neither comes within ``limit`` seconds."""
    timer = threading.Timer(limit, job.kill)
    timer.start()
    try:
        for line in job.stderr:
            if start in line:
                return [line[line.index(start):].rstrip()]
        return []
    finally:
        timer.cancel()


def _wait_logged(out: Path, iteration: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").is_file() and max(losses(out), default=0) >= iteration:
            return
        time.sleep(0.05)
    raise AssertionError(f"iteration {iteration} was never logged: {_finish(process).stderr[-3000:]}")


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory):
    """The two-process job run through once: what the interrupted and the two-machine jobs must equal."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = _finish(_launch(*_job_args(shapes, out)))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _assert_same_run(got: Path, expected: Path, from_iteration: int = 1) -> None:
    want, have = losses(expected), losses(got)
    assert sorted(have) == sorted(want) == list(range(1, 13))
    for iteration in range(from_iteration, 13):
        assert have[iteration] == pytest.approx(want[iteration], rel=1e-5, abs=1e-7), iteration
    metrics = json.loads((got / "metrics.json").read_text())
    assert metrics == pytest.approx(json.loads((expected / "metrics.json").read_text()), abs=1e-6)


def test_a_killed_worker_restarts_the_job_which_ends_as_an_uninterrupted_run(shapes, tmp_path, uninterrupted):
    """kill -9 of one of two workers after the checkpoint of iteration 4: torchrun's agent (--max_restarts 1)
    restarts both, they resume from iter_4 by themselves, and the run ends with the uninterrupted run's
    losses from iteration 5 and its final metrics."""
    out = tmp_path / "run"
    job = _launch("--max_restarts", "1", *_job_args(shapes, out, "train.collective_timeout_s=30"))
    _wait_logged(out, 6, job)
    os.kill(_worker(job, 1), signal.SIGKILL)
    done = _finish(job)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "iter_0000004 at iteration 4" in done.stderr
    assert "Gloo connectFullMesh failed" not in done.stderr  # the restarted workers' process group is their own
    _assert_same_run(out, uninterrupted, from_iteration=5)


def test_a_stopped_process_ends_the_job_within_the_timeout_naming_its_rank(shapes, tmp_path):
    """SIGSTOP of one of two workers: the other ends the job with one line naming rank 1 and the last checkpoint
    within train.collective_timeout_s (the launcher then gives the stopped worker its 30 s of grace, which this
    test does not wait for)."""
    timeout = 10
    out = tmp_path / "run"
    job = _launch(*_job_args(shapes, out, f"train.collective_timeout_s={timeout}", "train.max_iters=100000"))
    _wait_logged(out, 6, job)
    stopped = _worker(job, 1)
    os.kill(stopped, signal.SIGSTOP)
    start = time.monotonic()
    try:
        lines = _error_line(job, "error: rank 1 has not answered", limit=timeout + 120)
        noticed = time.monotonic() - start
    finally:  # torchrun's agent would give the stopped worker 30 s to end before killing it: no need to wait
        subprocess.run(["kill", "-9", str(stopped)], capture_output=True)
    done = _finish(job, timeout=60)
    assert done.returncode != 0
    assert len(lines) == 1, done.stderr[-3000:]
    assert "the process is stopped, killed or cut off" in lines[0]
    assert f"the last checkpoint is {out / 'checkpoints' / 'iter_0000004'}" in lines[0]
    assert noticed <= timeout + 1, noticed  # within the timeout (1 s: the reading of this test's pipe)


def test_a_read_that_never_returns_on_one_process_is_named_by_the_other(shapes, tmp_path):
    """Rank 1's first image of its second batch is a FIFO nobody writes (a read that never returns, as from a
    network file system that does not answer): its heartbeat goes on, its progress does not, and rank 0, waiting
    for it, ends the job naming it."""
    from tasks.engine.stream import TrainingStream

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    config = load_config(QUICKSTART, [*TINY, f"data.root={data}"])
    train_set = get_task("detection").train_dataset(config)
    stream = iter(TrainingStream(len(train_set), 2, config.seed, 1, 2, train_set.aspect_groups()))
    next(stream)
    path = Path(train_set.describe(next(stream)[0][0]))
    path.unlink()
    os.mkfifo(path)
    timeout = 8
    job = _launch(*_job_args(data, tmp_path / "run", f"train.collective_timeout_s={timeout}"))
    stuck = _worker(job, 1)
    try:
        lines = _error_line(job, "error: rank 1 has made no progress", limit=timeout + 120)
    finally:  # the launcher would give the stuck worker 30 s to end before killing it: no need to wait
        subprocess.run(["kill", "-9", str(stuck)], capture_output=True)
    done = _finish(job, timeout=60)
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    assert "at its iteration 1 while rank 0 waits for it: its training loop is stuck" in lines[0]


def _netns(name: str, *command: str) -> None:
    done = subprocess.run(["ip", *(["-n", name] if name else []), *command], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"ip {' '.join(command)}: {done.stderr.strip()} (network namespaces need root and iproute2)")


@pytest.fixture
def two_machines():
    """Two "machines": two network namespaces joined by a veth pair, 10.87.0.1 and 10.87.0.2."""
    tag = f"{os.getpid() % 100000}"
    names = [f"rdA{tag}", f"rdB{tag}"]
    links = [f"veA{tag}", f"veB{tag}"]
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    try:
        for name in names:
            _netns("", "netns", "add", name)
        _netns("", "link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for i, (name, link) in enumerate(zip(names, links)):
            _netns("", "link", "set", link, "netns", name)
            _netns(name, "addr", "add", f"10.87.0.{i + 1}/24", "dev", link)
            _netns(name, "link", "set", link, "up")
            _netns(name, "link", "set", "lo", "up")
        yield list(zip(names, links))
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("launcher", ["accelerate", "slurm"])
def test_two_machines_train_as_two_processes_on_one(shapes, tmp_path, two_machines, uninterrupted, launcher):
    """One process in each of two network namespaces (the run folder shared, as on a cluster's shared file
    system), started by ``accelerate launch --num_machines 2 --machine_rank R`` or by tools/slurm_train.sh
    under SLURM's variables (``scontrol`` answering as SLURM would): the same losses and metrics as the two
    processes of one machine."""
    out, port = tmp_path / "run", free_port()
    if launcher == "accelerate":
        jobs = [_launch(*_job_args(shapes, out), machines=2, rank=rank, ip="10.87.0.1", port=port,
                        prefix=("ip", "netns", "exec", name), env={"GLOO_SOCKET_IFNAME": link})
                for rank, (name, link) in enumerate(two_machines)]
    else:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        # `scontrol show hostnames`, one line at a time as for a long node list (a reader that leaves after the
        # first line would make the second a SIGPIPE)
        (bin_dir / "scontrol").write_text("#!/bin/sh\necho 10.87.0.1\nsleep 0.2\necho 10.87.0.2\n")
        (bin_dir / "scontrol").chmod(0o755)
        path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
        jobs = [subprocess.Popen(["ip", "netns", "exec", name, "bash", "tools/slurm_train.sh", *_job_args(shapes, out)[1:]],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                 env={**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                                      "GLOO_SOCKET_IFNAME": link, "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
                                      "SLURM_NODEID": str(rank), "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1",
                                      "MAIN_PORT": str(port), "ACCELERATE_ARGS": "--mixed_precision no --dynamo_backend no"})
                for rank, (name, link) in enumerate(two_machines)]
    done = _finish_all(jobs)
    assert all(machine.returncode == 0 for machine in done), "\n".join(
        f"machine {rank} (exit code {machine.returncode}): {machine.stderr[-3000:]}" for rank, machine in enumerate(done))
    world = json.loads((out / "world.json").read_text())
    assert world["world_size"] == 2
    _assert_same_run(out, uninterrupted)


# --- data loader faults -----------------------------------------------------------------------------------

def test_a_killed_data_loader_worker_is_one_line_naming_it_and_the_likely_cause(shapes, tmp_path):
    """kill -9 of a DataLoader worker (what the out-of-memory killer does) during iteration 3."""
    from test_engine import with_training_hook

    from tasks.engine.loop import DataLoaderFault

    killed = []

    def children() -> list[int]:
        return [int(pid) for pid in Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()]

    before = set(children())  # processes an earlier test of this pytest worker left running are not the loader's

    def kill_a_worker_at_call_3(n, losses):
        if n == 3:
            workers = [pid for pid in children() if pid not in before
                       and b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            killed.append(workers[0])
            os.kill(workers[0], signal.SIGKILL)
            time.sleep(0.5)

    with pytest.raises(DataLoaderFault) as failed:
        run(shapes, tmp_path / "run", "train.max_iters=50", "train.checkpoint_period=2", "data.num_workers=2",
            task=with_training_hook(kill_a_worker_at_call_3))
    message = str(failed.value)
    assert "\n" not in message and f"a data loader worker (pid {killed[0]}) is killed by signal: Killed" in message
    assert "most likely the out-of-memory killer" in message and "lower data.num_workers (now 2)" in message
    assert f"the last checkpoint is {tmp_path / 'run' / 'checkpoints' / 'iter_0000002'}" in message


def test_a_stalled_read_times_out_naming_the_images_being_read(shapes, tmp_path):
    """Every training image a FIFO that nobody writes: the first batch never comes, and after data.timeout_s
    the run stops naming its images."""
    from tasks.engine.loop import DataLoaderFault

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    for image in (data / "train2017").iterdir():
        image.unlink()
        os.mkfifo(image)
    start = time.monotonic()
    with pytest.raises(DataLoaderFault) as failed:
        run(data, tmp_path / "run", "train.max_iters=5", "data.num_workers=1", "data.timeout_s=2")
    assert time.monotonic() - start < 60
    message = str(failed.value)
    assert message.startswith("data loading stalled at iteration 1: no batch in data.timeout_s=2 s; the batch being "
                              f"read holds {data / 'train2017'}")
    assert message.count(str(data / "train2017")) == 2  # train.batch_size images
    del failed  # the loader (held by the error's traceback) shuts down now: its worker's read is let go first
    for fifo in (data / "train2017").iterdir():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader sees the end of the file
        except OSError:  # ENXIO: nobody is reading this one
            pass
    gc.collect()


# --- trackers ---------------------------------------------------------------------------------------------

def test_trackers_get_the_config_the_scalars_the_metrics_and_the_drawings(shapes, tmp_path, monkeypatch):
    """train.log_with: [tensorboard, mlflow] (MLflow's SQLite store and its artifacts in the run folder, nothing
    in the working folder): the config as hyper-parameters, every logged scalar with its step, the validation
    metrics, the drawings; a resumed run logs on to the same MLflow run."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    trackers = "train.log_with=[tensorboard,mlflow]"
    run(shapes, out, "train.max_iters=3", trackers)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    run(shapes, out, "train.max_iters=5", trackers)  # resumed from iter_3
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == run_id

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    logged = client.get_run(run_id)
    assert logged.data.params["train.max_iters"] == "3" and logged.data.params["model.backbone.depth"] == "18"
    assert logged.data.params["data.min_size_train"] == "[64]"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    assert [m.step for m in client.get_metric_history(run_id, "images_per_second")] == [1, 2, 3, 4, 5]
    final = json.loads((out / "metrics.json").read_text())
    assert client.get_metric_history(run_id, "val/bbox/AP")[-1].value == pytest.approx(final["bbox/AP"])
    drawings = [a.path for a in client.list_artifacts(run_id, "visualizations")]
    assert drawings and all(p.endswith(".png") for p in drawings)
    assert sorted(p.name for p in (out / "mlartifacts").rglob("*.png")) == sorted(Path(p).name for p in drawings)
    assert not (tmp_path / "mlruns").exists()  # MLflow's default artifact folder in the working folder

    events = [EventAccumulator(str(f), size_guidance={"images": 0}).Reload()
              for f in sorted((out / "resdet").rglob("events.out.tfevents.*"))]  # the first run's, the resumed one's
    tags = [e.Tags() for e in events]
    steps = [s.step for e, t in zip(events, tags) if "loss" in t["scalars"] for s in e.Scalars("loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert any("_hparams_/experiment" in e.summary_metadata for e in events)  # the config
    assert any(tag.startswith("val/") for t in tags for tag in t["images"])  # the drawings
    ap = [s.value for e, t in zip(events, tags) if "val/bbox/AP" in t["scalars"] for s in e.Scalars("val/bbox/AP")]
    assert ap[-1] == pytest.approx(final["bbox/AP"], abs=1e-6)


def test_an_unknown_or_missing_tracker_is_a_config_error(shapes, tmp_path):
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match="train.log_with: unknown tracker 'tensorbord'; accelerate's trackers are "):
        run(shapes, tmp_path / "run", "train.log_with=[tensorbord]")
