"""The noise guard: what else the machine was doing while a case was measured.

A timing taken while another job shares the cores is the other job's number as much as ours, and
nothing in the figure says so. The guard reads the kernel's counters (cheap /proc reads, no sampling
thread) before and after each case and says whether the case was measured on a quiet machine:

- other processes' CPU share: the busy time of the cores this process may run on (its affinity),
  minus the CPU time of this process and its descendants (under torchrun, its sibling ranks), over the
  case's wall time x those cores. This is measured, not inferred from the load average: on a 2-core
  machine the benchmark itself keeps the load near 2, and only other processes' time is noise;
- the load average and other runnable tasks at each end (context for the reason);
- the CPU frequency governor and clock, the hottest temperature sensor, where the system exposes them;
- on an accelerator, what its driver tells (``Device.activity``): other processes' utilisation where
  it is attributed per process (NVML), utilisation of all processes, temperature, clock.

A case is quiet unless other processes used more than the threshold (default 10%) of its cores, or of
its accelerator. ``system_facts()`` is the same survey once, for the bench session header and for
``npuinfer doctor``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .device import cpu_model_name

DEFAULT_THRESHOLD = 0.10  # of the cores (and of the accelerator) that other processes may use in a quiet case
GOVERNOR_ADVICE = "sudo cpupower frequency-set -g performance"
_CPUFREQ = Path("/sys/devices/system/cpu")
_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)  # /proc/stat's resolution


# --------------------------------------------------------------------------------------------- readings


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity); all of them where the system has no affinity."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(psutil.cpu_count() or 1))


def cpu_list(cpus: list[int]) -> str:
    """0,1,2,5 -> "0-2,5" (the kernel's own notation)."""
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def busy_cpu_seconds(cpus: list[int]) -> float:
    """CPU seconds the given CPUs have spent not idle since boot (user, nice, system, irq, softirq, steal)."""
    wanted = {f"cpu{c}" for c in cpus}
    try:
        total = 0
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if not line.startswith("cpu"):
                    break
                fields = line.split()
                if fields[0] in wanted:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
                    total += user + nice + system + irq + softirq + steal
        return total * _TICK_S
    except OSError:  # not Linux: psutil's per-cpu times, indexed by cpu number
        per_cpu = psutil.cpu_times(percpu=True)
        return sum(t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
                   + getattr(t, "steal", 0.0) for i, t in enumerate(per_cpu) if i in set(cpus))


def family(root_pid: int) -> list[psutil.Process]:
    """``root_pid`` and its descendants: the processes whose CPU time is the measurement's own."""
    try:
        pids = _descendants(root_pid)
        if pids is None:  # no /proc/PID/task/TID/children: psutil scans every process (a few ms)
            root = psutil.Process(root_pid)
            return [root, *root.children(recursive=True)]
        return [psutil.Process(pid) for pid in [root_pid, *pids] if psutil.pid_exists(pid)]
    except psutil.Error:
        return [psutil.Process()]


def _descendants(pid: int) -> list[int] | None:
    """Descendant pids from the kernel's children lists (Linux, CONFIG_PROC_CHILDREN): a few file reads
    instead of a scan of every process; None where the kernel does not keep them."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{current}/task/{tid}/children").read_text().split()
            except FileNotFoundError:
                if current == pid:
                    return None
                continue
            except OSError:
                continue
            found += map(int, children)
            todo += map(int, children)
    return found


def family_cpu_seconds(processes: list[psutil.Process]) -> float:
    """CPU seconds of the processes, with those of their children that have ended (waited for)."""
    total = 0.0
    for proc in processes:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # ended between listing and reading: its time is now in its parent's children_*
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def runnable_tasks(processes: list[psutil.Process]) -> int:
    """Runnable tasks (threads) now, on the whole machine, not counting those of ``processes``."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return -1
    own = 0
    for proc in processes:
        try:
            for task in os.scandir(f"/proc/{proc.pid}/task"):
                stat = Path(task.path, "stat").read_text()
                own += stat[stat.rindex(")") + 2] == "R"
        except (OSError, ValueError):
            continue
    return max(running - own, 0)


def cpu_governor(cpus: list[int]) -> str | None:
    """The cpufreq governor of the CPUs ("performance", "powersave", ... or "a/b" when they differ);
    None where cpufreq is not exposed (most VMs and containers: the host decides)."""
    found = []
    for cpu in cpus:
        try:
            found.append((_CPUFREQ / f"cpu{cpu}" / "cpufreq" / "scaling_governor").read_text().strip())
        except OSError:
            continue
    return "/".join(sorted(set(found))) or None


def cpu_mhz(cpus: list[int]) -> float | None:
    """The CPUs' mean current clock: cpufreq's scaling_cur_freq, else what psutil reads (/proc/cpuinfo)."""
    khz = []
    for cpu in cpus if (_CPUFREQ / f"cpu{cpus[0]}" / "cpufreq").is_dir() else ():
        try:
            khz.append(int((_CPUFREQ / f"cpu{cpu}" / "cpufreq" / "scaling_cur_freq").read_text()))
        except (OSError, ValueError):
            continue
    if khz:
        return sum(khz) / len(khz) / 1000
    try:
        freq = psutil.cpu_freq()
    except Exception:
        return None
    return float(freq.current) if freq and freq.current else None


def hottest_sensor_c() -> float | None:
    """The highest temperature any sensor reports now (°C); None where there are none."""
    read = getattr(psutil, "sensors_temperatures", None)
    try:
        sensors = read() if read else {}
    except Exception:
        return None
    values = [t.current for entries in sensors.values() for t in entries if t.current]
    return max(values) if values else None


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------------------------- the guard


@dataclass(frozen=True)
class Probe:
    """One reading of the counters."""

    perf: float  # time.perf_counter()
    epoch: float  # time.time(), for the accelerator driver's per-process samples
    busy_s: float  # busy CPU seconds of the allowed CPUs since boot
    own_s: float  # CPU seconds of the measurement's own processes
    load1: float | None
    other_runnable: int
    mhz: float | None
    device: dict[str, float | int]


@dataclass
class Verdict:
    """Was the machine quiet while a case was measured, and why not."""

    quiet: bool
    reasons: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # the figures, for the row's noise column
    cost_s: float = 0.0  # the guard's own time for this case (its two probes)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


class NoiseGuard:
    """Probes before and after each case; ``verdict(start, end)`` says whether the case was quiet.

    ``threshold``: the share of the allowed CPUs (and of the accelerator) other processes may use.
    ``own_root``: the pid whose descendants are the measurement (default this process; under torchrun the
    launcher, so that the sibling ranks are not counted as noise).
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, device=None, own_root: int | None = None):
        self.threshold = threshold
        self.device = device
        self.own_root = own_root or os.getpid()
        self.cpus = allowed_cpus()
        self.governor = cpu_governor(self.cpus)
        self._sensors = hottest_sensor_c() is not None  # most VMs have none: not asked again per case
        self.also_own: list[int] = []  # more roots whose families are the measurement (a server on this machine)

    def probe(self, since: float | None = None) -> Probe:
        processes = family(self.own_root) + [p for root in self.also_own for p in family(root)]
        load = load_average()
        device = self.device.activity(since) if self.device is not None and self.device.is_accelerator else {}
        return Probe(perf=time.perf_counter(), epoch=time.time(), busy_s=busy_cpu_seconds(self.cpus),
                     own_s=family_cpu_seconds(processes), load1=load[0] if load else None,
                     other_runnable=runnable_tasks(processes), mhz=cpu_mhz(self.cpus), device=device)

    def start(self) -> Probe:
        begin = time.perf_counter()
        probe = self.probe()
        self._cost = time.perf_counter() - begin
        return probe

    def stop(self, start: Probe) -> Verdict:
        begin = time.perf_counter()
        end = self.probe(since=start.epoch)
        verdict = self.verdict(start, end)
        verdict.cost_s = getattr(self, "_cost", 0.0) + time.perf_counter() - begin
        return verdict

    def verdict(self, start: Probe, end: Probe) -> Verdict:
        wall = max(end.perf - start.perf, 1e-9)
        capacity = wall * len(self.cpus)
        own = max(end.own_s - start.own_s, 0.0)
        other = min(max(end.busy_s - start.busy_s - own, 0.0), capacity)  # ticks can overshoot a short interval
        share = other / capacity
        # /proc/stat and the processes' times count whole ticks: a short case needs a margin of a few ticks
        resolution = 2 * _TICK_S * len(self.cpus)
        facts: dict[str, Any] = {
            "other_cpu": round(share, 3), "other_cores": round(other / wall, 3), "own_cores": round(own / wall, 3),
            "cpus": cpu_list(self.cpus), "shares_cores": other > resolution, "wall_s": round(wall, 3), "load1": [_round(start.load1), _round(end.load1)],
            "other_runnable": [start.other_runnable, end.other_runnable], "governor": self.governor,
            "cpu_mhz": [_round(start.mhz, 0), _round(end.mhz, 0)],
        }
        hot = hottest_sensor_c() if self._sensors else None
        if hot is not None:
            facts["temperature_c"] = hot
        if end.device:
            facts["device"] = end.device
        reasons = []
        if other > self.threshold * capacity + resolution:
            reasons.append(f"other processes used {share:.0%} of cpus {cpu_list(self.cpus)} ({other / wall:.2f} "
                           f"cores; quiet is <= {self.threshold:.0%}), load average {_fmt(start.load1)} -> "
                           f"{_fmt(end.load1)}, {max(start.other_runnable, end.other_runnable)} other runnable task(s)")
        other_util = end.device.get("other_util_pct")
        if other_util is not None and other_util > 100 * self.threshold:
            reasons.append(f"other processes used {other_util:.0f}% of {self.device} "
                           f"({end.device.get('other_processes', '?')} process(es))")
        return Verdict(quiet=not reasons, reasons=reasons, facts=facts)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------------------------- session facts


def system_facts(device=None, sample_s: float = 0.2, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """The machine as a benchmark sees it now: CPUs and affinity, load, other processes' CPU share over a
    ``sample_s`` sample (and the busiest of them), governor, clock, temperature, memory, the accelerator's
    activity; ``advice`` lists what to change before measuring. For the bench session header and
    ``npuinfer doctor``."""
    guard = NoiseGuard(threshold, device)
    before = {p.pid: p for p in psutil.process_iter(["name"])}
    cpu_before = {pid: _cpu_s(p) for pid, p in before.items()}
    start = guard.probe()
    time.sleep(sample_s)
    verdict = guard.verdict(start, guard.probe(since=start.epoch))
    own = {p.pid for p in family(guard.own_root)}
    busiest = []
    for pid, proc in before.items():
        if pid in own or cpu_before[pid] is None:
            continue
        after = _cpu_s(proc)
        if after is not None and after - cpu_before[pid] > 0:
            busiest.append((after - cpu_before[pid], pid, proc.info.get("name") or "?"))
    busiest.sort(reverse=True)

    freq = None
    try:
        freq = psutil.cpu_freq()
    except Exception:
        pass
    facts: dict[str, Any] = {
        "cpu_model": cpu_model_name(), "logical_cpus": psutil.cpu_count(), "allowed_cpus": cpu_list(guard.cpus),
        "load_average": [round(x, 2) for x in load_average() or ()],
        "other_cpu": verdict.facts["other_cpu"], "sample_s": sample_s,
        "busiest_other_processes": [{"pid": pid, "name": name, "cpu": round(cpu / sample_s / len(guard.cpus), 3)}
                                    for cpu, pid, name in busiest[:3]],
        "governor": guard.governor, "cpu_mhz": verdict.facts["cpu_mhz"][1],
        "cpu_mhz_max": float(freq.max) if freq and freq.max else None,
        "temperature_c": hottest_sensor_c(),
        "memory_available_gib": round(psutil.virtual_memory().available / 2**30, 1),
    }
    if device is not None and device.is_accelerator:
        facts["device"] = {"name": str(device), **device.activity()}
    facts["advice"] = _advice(facts, threshold)
    return facts


def _cpu_s(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def _advice(facts: dict[str, Any], threshold: float) -> list[str]:
    advice = []
    governor = facts.get("governor")
    if governor is None:
        advice.append("the CPU frequency governor is not exposed here (no cpufreq in /sys: a VM or container, the "
                      f"host decides); on a machine you control run `{GOVERNOR_ADVICE}` before measuring")
    elif governor != "performance":
        advice.append(f"the CPU frequency governor is {governor!r}, not 'performance': the clock follows the load "
                      f"and timings drift; run `{GOVERNOR_ADVICE}` before measuring")
    if facts["other_cpu"] > threshold:
        names = ", ".join(f"{p['name']} (pid {p['pid']}, {p['cpu']:.0%})" for p in facts["busiest_other_processes"])
        advice.append(f"other processes are using {facts['other_cpu']:.0%} of cpus {facts['allowed_cpus']} now"
                      + (f" (busiest: {names})" if names else "") + ": rows measured meanwhile will be marked not "
                      "quiet; --require-quiet fails them")
    return advice


def format_facts(facts: dict[str, Any]) -> list[str]:
    """``system_facts()`` as a few lines for a terminal."""
    load = facts.get("load_average") or []
    lines = [
        f"machine: {facts['cpu_model']}, {facts['logical_cpus']} logical cpus, this process on cpus "
        f"{facts['allowed_cpus']}; {facts['memory_available_gib']} GiB memory available",
        f"load average {' '.join(f'{x:.2f}' for x in load) or '?'}; other processes use {facts['other_cpu']:.0%} of "
        f"cpus {facts['allowed_cpus']} (over {facts['sample_s']:g} s)",
        f"cpu governor: {facts['governor'] or 'not exposed'}; clock {_mhz(facts.get('cpu_mhz'))}"
        + (f" (max {_mhz(facts['cpu_mhz_max'])})" if facts.get("cpu_mhz_max") else "")
        + (f"; hottest sensor {facts['temperature_c']:.0f} C" if facts.get("temperature_c") else ""),
    ]
    device = facts.get("device")
    if device:
        known = {k: v for k, v in device.items() if k != "name"}
        lines.append(f"{device['name']}: " + (", ".join(f"{k} {v:g}" for k, v in known.items())
                                              or "the driver reports no utilisation, temperature or clock"))
    lines += [f"advice: {line}" for line in facts.get("advice", [])]
    return lines


def _mhz(value: float | None) -> str:
    return "?" if not value else f"{value:.0f} MHz"
