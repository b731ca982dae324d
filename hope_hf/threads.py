"""CPU threads for torch that follow the cores other processes leave free.

Torch runs one intra-op OpenMP thread per core. A HOPE layer is many small operations, each ending on a thread
barrier; when another process keeps one of the cores busy, the thread that shares that core reaches every barrier
late and the work slows several-fold (docs/performance.md, "CPU threads on a shared machine"). `FreeCoreThreads`
sets torch's intra-op thread count to the cores that are free: the CPU time the machine spent (``/proc/stat``, over
the CPUs this process may run on) minus this process's own, re-measured every ``period`` seconds when ``update()``
is called (for example at every training step by `FreeCoreThreadsCallback`). A thread count the user chose
(``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, ``torch.set_num_threads`` before or during the run) is left alone.

    from hope_hf.threads import FreeCoreThreads, FreeCoreThreadsCallback

    print(FreeCoreThreads().start().describe())      # choose once, now: "CPU threads: 1 (1 of 2 cores free ...)"
    trainer.add_callback(FreeCoreThreadsCallback())  # choose when training begins, re-check at every step
"""

from __future__ import annotations

import math
import os
import time
from typing import NamedTuple

import torch
from transformers import TrainerCallback

__all__ = ["FreeCoreThreads", "FreeCoreThreadsCallback", "threads_for", "user_thread_choice"]

# A core that other processes use for less than this share of the time still counts as free.
BUSY_SHARE = 0.25
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
NOT_STARTED = "not started"


def threads_for(cores: int, used_by_others: float) -> int:
    """Intra-op threads for `cores` CPUs of which other processes use `used_by_others` cores' worth of time: one per
    core left free (a core counts as taken once others use more than `BUSY_SHARE` of it), at least one."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    taken = max(0, math.ceil(used_by_others - BUSY_SHARE))
    return max(1, cores - taken)


def user_thread_choice(cores: int, environ=None) -> str | None:
    """How the user chose torch's intra-op thread count (an environment variable, or `torch.set_num_threads` to a
    count other than the default of one per core), or None if nothing was chosen."""
    return _environment_choice(environ) or (
        f"torch.set_num_threads({torch.get_num_threads()})" if torch.get_num_threads() != cores else None)


def _environment_choice(environ=None) -> str | None:
    environ = os.environ if environ is None else environ
    for name in _THREAD_VARIABLES:
        if environ.get(name, "").strip():
            return f"{name}={environ[name].strip()}"
    return None


class CpuTimes(NamedTuple):
    """A reading: seconds of CPU time the machine spent busy on `cpus` and this process's own, at `clock`."""

    busy: float
    own: float
    clock: float


def read_cpu_times(cpus, stat_path: str = "/proc/stat") -> CpuTimes:
    """Busy seconds (all but idle and iowait) of the CPUs numbered `cpus` since boot, from `stat_path`."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = 0
    with open(stat_path) as f:  # first: where there is no /proc/stat, there is no os.sysconf either (Windows)
        for line in f:
            fields = line.split()
            if fields and fields[0] in wanted:
                values = [int(v) for v in fields[1:8]]  # user nice system idle iowait irq softirq
                busy += sum(values) - values[3] - values[4]
    return CpuTimes(busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic())


def used_by_others(before: CpuTimes, after: CpuTimes) -> float:
    """Cores' worth of CPU time that other processes used between two readings."""
    span = after.clock - before.clock
    if span <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / span


class FreeCoreThreads:
    """Keeps torch's intra-op thread count at the number of free cores (see the module docstring).

    `reader` takes the CPU numbers and returns a `CpuTimes` (`read_cpu_times` by default; tests pass fakes).
    After `start()`, `threads` is the count in use and `reason` says why; `adapting` is False when the count is the
    user's or cannot be measured, and `update()` then does nothing.
    """

    def __init__(self, period: float = 30.0, cpus=None, reader=read_cpu_times):
        if period <= 0:
            raise ValueError(f"period must be > 0 seconds, got {period}")
        self.period = period
        if cpus is None:  # the CPUs this process may run on (Linux); elsewhere every CPU
            cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        self.cpus = sorted(cpus)
        self.reader = reader
        self.threads = torch.get_num_threads()
        self.reason = NOT_STARTED
        self.adapting = False
        self._last = None

    def start(self, wait: float = 0.25) -> FreeCoreThreads:
        """Choose the thread count from two readings `wait` seconds apart, unless the user chose it; returns self."""
        self.threads = torch.get_num_threads()
        choice = _environment_choice()
        if choice is None:
            try:
                self._last = self.reader(self.cpus)
            except (OSError, ValueError) as err:  # no /proc/stat (not Linux) or an unreadable one: torch's default
                self.reason = f"torch's default (cannot read the CPU load: {err})"
                return self
            choice = user_thread_choice(len(self.cpus))  # (torch's default differs from the CPU count elsewhere)
        if choice is not None:
            self.reason = f"chosen by the user ({choice})"
            return self
        time.sleep(wait)
        self.adapting = True
        self._apply(self._measure(self.reader(self.cpus)))
        return self

    def update(self) -> int:
        """Re-measure and re-set the thread count if `period` seconds have passed since the last reading; the count.
        Stops adapting if someone else changed torch's thread count since."""
        if not self.adapting:
            return self.threads
        if torch.get_num_threads() != self.threads:
            self.adapting = False
            self.threads = torch.get_num_threads()
            self.reason = f"chosen by the user (torch.set_num_threads({self.threads}) during the run)"
            return self.threads
        try:
            now = self.reader(self.cpus)
        except (OSError, ValueError) as err:  # the load cannot be read any more: keep the count
            self.adapting, self.reason = False, f"{self.reason}; no longer re-checked ({err})"
            return self.threads
        if now.clock - self._last.clock >= self.period:
            self._apply(self._measure(now))
        return self.threads

    def describe(self) -> str:
        """One line: the thread count and why."""
        return f"CPU threads: {self.threads} ({self.reason})"

    def _measure(self, now: CpuTimes) -> float:
        others, self._last = used_by_others(self._last, now), now
        return others

    def _apply(self, others: float) -> None:
        self.threads = threads_for(len(self.cpus), others)
        torch.set_num_threads(self.threads)
        self.reason = f"{self.threads} of {len(self.cpus)} cores free (other processes used {others:.1f} cores)"


class FreeCoreThreadsCallback(TrainerCallback):
    """`Trainer` callback: `FreeCoreThreads.start()` when training begins (unless started already; its one-line
    description passed to `report`, if given), `update()` before every training step (on the main thread, where
    torch's thread count applies)."""

    def __init__(self, threads: FreeCoreThreads | None = None, report=None):
        self.threads = FreeCoreThreads() if threads is None else threads
        self.report = report

    def on_train_begin(self, args, state, control, **kwargs):
        if self.threads.reason == NOT_STARTED:
            self.threads.start()
        if self.report is not None:
            again = f"; re-checked every {self.threads.period:g} s" if self.threads.adapting else ""
            self.report(self.threads.describe() + again)

    def on_step_begin(self, args, state, control, **kwargs):
        self.threads.update()
