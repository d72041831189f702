"""How busy the machine was while a comparison ran: wall-clock numbers from a loaded machine are not comparable.

Two readings:

* the load average (1, 5, 15 minutes) at the start and the end of the comparison, as ``os.getloadavg()`` reports it;
* for each run, the CPU time *other* processes used while it trained, in cores: the machine's busy time from
  ``/proc/stat`` over the run minus the CPU time of this comparison (the harness and the run's process). A load
  average alone cannot tell the comparison's own threads from the others', and the 1-minute average still carries the
  previous run's load when the next one starts.

The rule (:data:`BUSY_RULE`): a run is flagged when other processes used more than ``OTHERS_LIMIT`` cores on average
during it; the comparison is flagged when any run is, or when the 1-minute load average before the first run already
exceeded ``cores - 0.5``. The end load average is recorded but not judged: it includes the comparison's own last run.
"""

import os
import resource
import time


OTHERS_LIMIT = 0.5
BUSY_RULE = (
    f"a run is busy when other processes used more than {OTHERS_LIMIT} cores on average while it trained (/proc/stat "
    "busy time minus this comparison's own CPU time); the comparison is busy when any run is, or when the 1-minute "
    "load average before the first run exceeded cores - 0.5. Equal-wall-clock numbers of busy runs are not comparable."
)


def cores() -> int:
    """CPUs this process may run on (the affinity mask, which containers and taskset narrow), else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_kind() -> dict:
    """What decides whether a float computation here repeats another machine's bit for bit: the CPU model, the SIMD
    level torch dispatches its kernels to, torch's version and its thread count (reductions split by thread)."""
    import platform

    import torch

    model = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    except OSError:  # not Linux
        pass
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def describe_machine(kind: dict) -> str:
    return f"{kind['cpu']}, {kind['cpu_capability']}, torch {kind['torch']}, {kind['threads']} threads"


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):  # not on this platform
        return None


def _busy_seconds() -> float | None:
    """CPU-seconds the machine's CPUs spent busy since boot (``/proc/stat``), or None when that would not describe
    the CPUs we run on (no /proc, or a container seeing more CPUs than it may use)."""
    try:
        with open("/proc/stat") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    per_cpu = [line for line in lines if line.startswith("cpu") and not line.startswith("cpu ")]
    if len(per_cpu) != cores():
        return None
    fields = [int(value) for value in lines[0].split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user and nice]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished (waited-for) runs
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuWindow:
    """Measures other processes' CPU use between ``start()`` and ``stop()`` (call ``stop`` after the run's process
    was waited for, so its CPU time is counted as ours)."""

    def start(self) -> "CpuWindow":
        self.wall, self.busy, self.own = time.perf_counter(), _busy_seconds(), _own_cpu_seconds()
        self.load_before = load_average()
        return self

    def stop(self) -> dict:
        wall = time.perf_counter() - self.wall
        busy = _busy_seconds()
        record = {"load_average_before": self.load_before, "load_average_after": load_average(), "cores": cores()}
        if busy is None or self.busy is None or wall <= 0:
            record.update(others_cpu_cores=None, busy=None)
            return record
        others = max(0.0, (busy - self.busy) - (_own_cpu_seconds() - self.own)) / wall
        record.update(others_cpu_cores=round(others, 3), busy=others > OTHERS_LIMIT)
        return record


def loaded_at_start(load: list[float] | None) -> bool:
    """The start rule: a 1-minute load average above ``cores - 0.5`` (other work already running)."""
    return load is not None and load[0] > cores() - 0.5


def wait_until_quiet(timeout_s: float = 120.0, poll_s: float = 5.0) -> list[float] | None:
    """Wait (at most ``timeout_s``) until the 1-minute load average is at most ``cores - 0.5``, the start rule of
    :func:`machine_record`; return the last load average read. A run started right after another heavy one would
    otherwise be judged busy on that run's own load, which the 1-minute average forgets only over a minute or so
    (from 2 to 1.5 on two cores takes about 20 s)."""
    deadline = time.monotonic() + timeout_s
    load = load_average()
    while loaded_at_start(load) and time.monotonic() < deadline:
        time.sleep(poll_s)
        load = load_average()
    return load


def machine_record(start_load: list[float] | None, runs: list[dict]) -> dict:
    """compare.json's ``machine``: cores, load averages, the rule and its verdict, the busy runs."""
    number = cores()
    busy_runs = [run["label"] for run in runs if run.get("machine", {}).get("busy")]
    busy_at_start = loaded_at_start(start_load)
    return {
        "cores": number,
        "load_average_start": start_load,
        "load_average_end": load_average(),
        "busy_rule": BUSY_RULE,
        "busy_at_start": busy_at_start,
        "busy_runs": busy_runs,
        "busy": busy_at_start or bool(busy_runs),
    }
