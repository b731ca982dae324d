"""CPU threads from the free cores (`hope_hf.threads`): the choice given fake load readings, the user's own choice
respected, the readings of /proc/stat, the Trainer callback and the CLI's log line."""

import pytest
import torch

from hope_hf.threads import (
    CpuTimes,
    FreeCoreThreads,
    FreeCoreThreadsCallback,
    read_cpu_times,
    threads_for,
    used_by_others,
    user_thread_choice,
)


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    """Two cores' worth of threads, nothing chosen in the environment; torch's count restored afterwards."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class FakeLoad:
    """A reader of `CpuTimes` that replays (clock, cores used by others, cores used by this process) steps."""

    def __init__(self, *steps):
        self.steps, self.times, self.calls = list(steps), CpuTimes(0.0, 0.0, 0.0), 0

    def __call__(self, cpus):
        self.calls += 1
        if self.calls > 1:
            if not self.steps:
                raise OSError("no more readings")
            clock, others, own = self.steps.pop(0)
            span = clock - self.times.clock
            self.times = CpuTimes(self.times.busy + (others + own) * span, self.times.own + own * span, clock)
        return self.times


@pytest.mark.parametrize("cores,others,expected", [
    (2, 0.0, 2), (2, 0.2, 2), (2, 0.5, 1), (2, 1.0, 1), (2, 2.0, 1), (2, 5.0, 1), (4, 1.3, 2), (8, 0.0, 8),
])
def test_one_thread_per_free_core(cores, others, expected):
    assert threads_for(cores, others) == expected


def test_threads_for_refuses_no_cores():
    with pytest.raises(ValueError, match="cores must be >= 1, got 0"):
        threads_for(0, 0.0)


def test_used_by_others_subtracts_this_process():
    before, after = CpuTimes(10.0, 3.0, 100.0), CpuTimes(13.0, 4.0, 102.0)  # 3 s busy, 1 s of them ours, in 2 s
    assert used_by_others(before, after) == pytest.approx(1.0)
    assert used_by_others(after, after) == 0.0


def test_a_busy_core_is_left_out_and_taken_back_when_free():
    load = FakeLoad((0.25, 1.0, 0.0), (10.0, 0.0, 1.0), (31.0, 0.0, 1.0), (62.0, 1.0, 1.0))
    threads = FreeCoreThreads(period=30, cpus=[0, 1], reader=load).start(wait=0)
    assert threads.threads == torch.get_num_threads() == 1 and threads.adapting
    assert threads.describe() == "CPU threads: 1 (1 of 2 cores free (other processes used 1.0 cores))"
    assert threads.update() == 1  # 10 s after the last reading: not yet re-measured
    assert threads.update() == 2 == torch.get_num_threads()  # 31 s: the other process has stopped
    assert threads.update() == 1 == torch.get_num_threads()  # 62 s: busy again


def test_the_users_choice_is_respected(monkeypatch):
    def unread(cpus):
        raise AssertionError("the load is not read when the user chose the threads")

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    threads = FreeCoreThreads(cpus=[0, 1], reader=unread).start(wait=0)
    assert threads.reason == "chosen by the user (OMP_NUM_THREADS=2)" and not threads.adapting
    assert threads.update() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(3)
    assert user_thread_choice(2) == "torch.set_num_threads(3)"
    threads = FreeCoreThreads(cpus=[0, 1], reader=FakeLoad((0.25, 0.0, 0.0))).start(wait=0)
    assert threads.describe() == "CPU threads: 3 (chosen by the user (torch.set_num_threads(3)))"
    assert not threads.adapting and torch.get_num_threads() == 3


def test_a_thread_count_set_during_the_run_stops_the_adapting():
    threads = FreeCoreThreads(period=1, cpus=[0, 1], reader=FakeLoad((0.25, 0.0, 0.0), (5.0, 1.0, 0.0)))
    assert threads.start(wait=0).threads == 2
    torch.set_num_threads(1)
    assert threads.update() == 1 and not threads.adapting
    assert "torch.set_num_threads(1) during the run" in threads.reason
    torch.set_num_threads(2)
    assert threads.update() == 1  # no longer adapting: the user's count is not overridden


def test_unreadable_load_keeps_torchs_default():
    def missing(cpus):
        raise FileNotFoundError("/proc/stat")

    threads = FreeCoreThreads(cpus=[0, 1], reader=missing).start(wait=0)
    assert threads.threads == 2 and not threads.adapting and "cannot read the CPU load" in threads.reason
    load = FakeLoad((0.25, 1.0, 0.0))
    threads = FreeCoreThreads(cpus=[0, 1], reader=load).start(wait=0)
    assert threads.update() == 1 and not threads.adapting and "no longer re-checked" in threads.reason


def test_bad_period_is_refused_by_name():
    with pytest.raises(ValueError, match="period must be > 0 seconds, got 0"):
        FreeCoreThreads(period=0)


def test_read_cpu_times_sums_the_processs_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 900 900 0 0 0 0 0 0\n"
                    "cpu0 100 5 20 1000 7 1 2 0 0 0\n"
                    "cpu1 200 0 30 2000 9 0 0 0 0 0\n"
                    "cpu12 999 0 0 0 0 0 0 0 0 0\n"
                    "intr 12345\n")
    monkeypatch.setattr("os.sysconf", lambda name: 100)
    reading = read_cpu_times([0, 1], str(stat))
    assert reading.busy == pytest.approx((100 + 5 + 20 + 1 + 2 + 200 + 30) / 100)


def test_callback_starts_reports_and_updates():
    load = FakeLoad((0.25, 1.0, 0.0), (40.0, 0.0, 1.0))
    lines = []
    callback = FreeCoreThreadsCallback(FreeCoreThreads(cpus=[0, 1], reader=load), report=lines.append)
    callback.on_train_begin(None, None, None)
    assert lines == ["CPU threads: 1 (1 of 2 cores free (other processes used 1.0 cores)); re-checked every 30 s"]
    callback.on_step_begin(None, None, None)
    assert torch.get_num_threads() == 2


def test_cli_train_and_eval_report_their_threads(tmp_path, capsys, monkeypatch):
    """`train` chooses from the free cores (nothing chosen: torch's default of one thread per core); `eval` keeps
    OMP_NUM_THREADS. Each says so in one line."""
    import os
    import re

    from hope_hf.cli import main

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out), "--config_overrides", "hidden_size=32,num_attention_heads=2",
                 "--seq_len", "32", "--vocab_size", "320", "--max_corpus_chars", "20000", "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--max_eval_samples", "2", "--disable_tqdm", "true",
                 "--sample_max_new_tokens", "2"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CPU threads")]
    match = re.fullmatch(rf"CPU threads: (\d+) \(\1 of {cores} cores free \(other processes used \d+\.\d cores\)\); "
                         r"re-checked every 30 s", line)
    assert match, line
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert main(["eval", "--model_name_or_path", str(out), "--seq_len", "32", "--max_corpus_chars", "20000",
                 "--max_eval_samples", "2"]) == 0
    captured = capsys.readouterr()
    assert "CPU threads: 1 (chosen by the user (OMP_NUM_THREADS=1))" in captured.err.splitlines()
    assert "perplexity" in captured.out and torch.get_num_threads() == 1
