"""``lite-tp launch``: several local processes that form one mesh.

    lite-tp launch --processes N [--devices-per-process D] [--max-restarts K] [--hang-timeout S] -- train|generate ARGS...

Starts N copies of ``lite-tp ARGS...`` on this machine. Each gets D fake CPU
devices (default: the mesh's device count / N) and joins the others through
``jax.distributed.initialize`` with a coordinator on 127.0.0.1 at a free port
(``runtime.devices.start_cluster`` reads the ``LITE_TP_*`` variables set here). Together
they hold one global mesh, exactly as one process per host would on a cluster.

Output: process 0's standard output is shown here; everything every process
writes (standard output and error) goes to ``RUN_DIR/logs/rank-K.log``
(``rank-K.attempt-N.log`` after restart N: every attempt's log is kept),
without Gloo's "Rank N is connected" chatter. Workers die with the launcher
(``PR_SET_PDEATHSIG``): a ``kill -9`` of the launcher leaves no orphan training on. If a process fails to start or exits
with an error, the others are stopped (SIGKILL: JAX's preemption handler
swallows SIGTERM) and the launcher exits non-zero (2 if that process reported
bad input) after printing the failed process's last error line.

Preemption: SIGTERM to the launcher is sent on to every process. A process
that saved its preemption checkpoint exits 143 (``lite-tp train``); that is not
a failure, so the others are left to finish their part of the same save, and
the launcher then exits 143 too: rerun the same command to continue.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from lite_tp_jax.runtime.exit_codes import ExitCode

LAUNCH_ENV = ("LITE_TP_COORDINATOR", "LITE_TP_NUM_PROCESSES", "LITE_TP_PROCESS_ID")
"""Set for each process started here; ``runtime.devices.start_cluster`` reads them."""
_GLOO_CHATTER = re.compile(  # "[Gloo] Rank N is connected to M peer ranks. ...", also cut in pieces by other writes
    r"\[Gloo\] Rank (\d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+\n?)?"
    r"|(?:(?:\d+ )?is connected to )?(?:\d+ )?peer ranks\. Expected number of connected peer ranks is : \d+\n?"
)
_NOT_THE_ERROR = re.compile(r"^(@ |\*\*\* |RPC: )")  # a native abort's stack trace and status detail


_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child of a fork only calls it
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_launcher(launcher: int) -> Callable[[], None]:
    """A ``preexec_fn``: the worker gets SIGKILL when the launcher dies (``kill -9``
    included), so no worker trains on as an orphan. Linux; elsewhere a no-op."""

    def arm() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != launcher:  # the launcher died before the line above
                os._exit(ExitCode.FAILURE)

    return arm


def log_name(rank: int, attempt: int = 0) -> str:
    """``rank-K.log`` for the first attempt, ``rank-K.attempt-N.log`` for restart N: every attempt's log is kept."""
    return f"rank-{rank}.log" if attempt == 0 else f"rank-{rank}.attempt-{attempt}.log"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_environment(rank: int, processes: int, devices_per_process: int, port: int) -> dict[str, str]:
    """The environment of process ``rank``: how to reach the coordinator, and its devices."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(zip(LAUNCH_ENV, (f"127.0.0.1:{port}", str(processes), str(rank))))
    env.update(JAX_NUM_CPU_DEVICES=str(devices_per_process), PYTHONUNBUFFERED="1")
    return env


@dataclass
class _Worker:
    rank: int
    process: subprocess.Popen
    log: TextIO
    last_error: str = ""
    last_output: str = ""
    exited_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    readers: list[threading.Thread] = field(default_factory=list)

    def read(self, stream: TextIO, echo: TextIO | None, is_stderr: bool) -> None:
        for line in stream:
            cleaned = _GLOO_CHATTER.sub("", line)
            if cleaned != line and not cleaned.strip():  # nothing but Gloo's chatter
                continue
            line = cleaned
            with self.lock:
                self.log.write(line)
                self.log.flush()
            if line.strip() and not _NOT_THE_ERROR.match(line.strip()):
                if is_stderr:
                    self.last_error = line.strip()
                else:
                    self.last_output = line.strip()
            if echo is not None:
                echo.write(line)
                echo.flush()


@dataclass(frozen=True)
class Outcome:
    """How a launch ended: the exit code, and for a failure the rank that failed
    first (None for a hang) and why, in one line."""

    code: int
    rank: int | None = None
    cause: str = ""


Watchdog = Callable[[], "str | None"]
"""Polled while the processes run; a returned string stops them all as a failure (a hang)."""


def run_processes(
    argv: Sequence[str],
    environments: Sequence[dict[str, str]],
    log_dir: str | os.PathLike,
    *,
    echo: TextIO | None = None,
    errors: TextIO | None = None,
    poll_s: float = 0.05,
) -> int:
    """Runs ``argv`` once per environment and supervises the processes.

    Process 0's standard output is copied to ``echo`` (default: stdout); every
    process's output goes to ``log_dir/rank-K.log``. Returns 0 when all exit
    with 0, 143 when they were preempted (each exited 0 or 143, at least one
    143). When one fails to start or exits non-zero otherwise, the others are killed,
    one line naming it and its last error line goes to ``errors`` (default:
    stderr), and its code is returned if it was 2 (bad input) or 4 (diverged), else 1.
    """
    return run_attempt(argv, environments, log_dir, echo=echo, errors=errors, poll_s=poll_s).code


def run_attempt(
    argv: Sequence[str],
    environments: Sequence[dict[str, str]],
    log_dir: str | os.PathLike,
    *,
    echo: TextIO | None = None,
    errors: TextIO | None = None,
    poll_s: float = 0.05,
    watchdog: Watchdog | None = None,
    attempt: int = 0,
) -> Outcome:
    """``run_processes``, returning the ``Outcome``; ``watchdog`` may declare a hang.
    SIGTERM to this process is passed on to every worker (preemption: they save
    at the next step boundary and exit), and the launch then ends with their codes."""
    echo = sys.stdout if echo is None else echo
    errors = sys.stderr if errors is None else errors
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    workers: list[_Worker] = []
    forward = _forward_sigterm(workers)
    try:
        for rank, env in enumerate(environments):
            log = open(log_dir / log_name(rank, attempt), "w")
            try:
                process = subprocess.Popen(
                    list(argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    errors="replace", start_new_session=True, preexec_fn=_die_with_launcher(os.getpid()),
                )
            except OSError as error:
                log.close()
                _stop(workers)
                print(f"lite-tp launch: process {rank} failed to start: {error}", file=errors)
                return Outcome(ExitCode.FAILURE, rank, f"failed to start: {error}")
            worker = _Worker(rank, process, log)
            for stream, out, is_stderr in ((process.stdout, echo if rank == 0 else None, False), (process.stderr, None, True)):
                reader = threading.Thread(target=worker.read, args=(stream, out, is_stderr), daemon=True)
                reader.start()
                worker.readers.append(reader)
            workers.append(worker)
        failed, hang = _wait(workers, poll_s, watchdog)
    except KeyboardInterrupt:  # Ctrl-C: as SIGTERM, the processes save at the step boundary; again: stop now
        print("lite-tp launch: Ctrl-C: the processes save a checkpoint at the end of this step "
              "(Ctrl-C again to stop at once)", file=errors, flush=True)
        try:
            _forward_sigterm._forward(workers)
            _wait(workers, poll_s)
            saved = all(w.process.returncode in (0, ExitCode.PREEMPTED) for w in workers)
        except KeyboardInterrupt:
            saved = False
        _stop(workers)
        print("lite-tp launch: interrupted" + ("; the processes saved a checkpoint: rerun the same command to continue"
                                               if saved else ""), file=errors)
        return Outcome(ExitCode.INTERRUPTED, None, "interrupted")
    finally:
        forward.restore()
    _stop(workers)
    if hang is not None:
        print(f"lite-tp launch: {hang}; stopped every process", file=errors)
        return Outcome(ExitCode.FAILURE, None, hang)
    if failed is None:
        if any(w.process.returncode == ExitCode.PREEMPTED for w in workers):
            print("lite-tp launch: preempted (SIGTERM): the processes saved a checkpoint and stopped; "
                  "rerun the same command to continue", file=errors)
            return Outcome(ExitCode.PREEMPTED, None, "preempted")
        return Outcome(ExitCode.OK)
    code = failed.process.returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    last = failed.last_error or failed.last_output or "(no output)"
    print(f"lite-tp launch: process {failed.rank} {how}: {last}  [log: {log_dir / log_name(failed.rank, attempt)}]", file=errors)
    kept = code if code in (ExitCode.BAD_INPUT, ExitCode.DIVERGED) else ExitCode.FAILURE
    return Outcome(kept, failed.rank, f"process {failed.rank} {how}: {last}")


class _forward_sigterm:
    """While installed (main thread only), SIGTERM is sent on to every worker."""

    def __init__(self, workers: list[_Worker]):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda *_: self._forward(workers))

    @staticmethod
    def _forward(workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _wait(workers: list[_Worker], poll_s: float, watchdog: Watchdog | None = None) -> tuple[_Worker | None, str | None]:
    """Waits until all exit (None, None), one fails: exits non-zero other than
    preempted (it, None), or the watchdog reports a hang (None, its message)."""
    while True:
        now = time.monotonic()
        for worker in workers:
            if worker.exited_at is None and worker.process.poll() is not None:
                worker.exited_at = now
        failures = [w for w in workers if w.exited_at is not None and w.process.returncode not in (0, ExitCode.PREEMPTED)]
        if failures:
            return min(failures, key=lambda w: (w.exited_at, w.rank)), None
        if all(w.exited_at is not None for w in workers):
            return None, None
        hang = watchdog() if watchdog is not None else None
        if hang is not None:
            return None, hang
        time.sleep(poll_s)


def _stop(workers: list[_Worker]) -> None:
    """Kills the processes still running (SIGKILL), then drains their output."""
    for worker in workers:
        if worker.process.poll() is None:
            os.killpg(worker.process.pid, signal.SIGKILL)  # its own session: the worker and its children
    for worker in workers:
        worker.process.wait()
        for reader in worker.readers:
            reader.join(timeout=5)
        worker.log.close()
