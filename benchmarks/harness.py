"""What bench_moe, bench_model, bench_dense and bench_full_depth share.

* the machine header: which CPU (by name and, since virtual machines often say only "AMD
  EPYC", by family and model), the CPUs and memory, the commit and the command line, so a
  table pasted into BENCHMARKS.md says where and from what it came (:func:`machine`,
  :func:`header`);
* reference probes measured in the same run: lk's read bandwidth and fp32 FMA peak on the
  benchmark's own cores (:func:`read_bandwidth_gbs`, :func:`ceilings`, :func:`bracketed`);
* alternating rounds: the reference and each candidate measured in turn, round after round,
  so both meet the same host state (a shared host's bandwidth moves within seconds), and
  ratios taken round by round (:func:`alternate`, :func:`paired_ratio`,
  :func:`pairs_by_bandwidth`);
* the report: medians, ratios to the reference and markdown tables (:func:`median`,
  :func:`ratio`, :func:`ratio_cell`, :func:`markdown_table`).

Only the standard library at import: lk's probes import ``lvllm._lk`` when called.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- machine header


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cpus_text(cpus: Iterable[int]) -> str:
    """'0,1,2': CPUs as VLLM_CPU_OMP_THREADS_BIND and the reports write them."""
    return ",".join(map(str, cpus))


def parse_cpus(text: str) -> list[int]:
    """The CPUs of a list as VLLM_CPU_OMP_THREADS_BIND takes it: "0,1,4-7"."""
    cpus = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, else lscpu's (empty where neither exists)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:   # Arm's /proc/cpuinfo names no model
        try:
            done = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10)
            for line in done.stdout.splitlines():
                key, _, value = line.partition(":")
                key = {"Model name": "model name", "CPU family": "cpu family", "Model": "model"}.get(key.strip())
                if key:
                    fields.setdefault(key, value.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return fields


def cpu_name() -> str:
    """'AMD EPYC (family 25 model 17)'."""
    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields or "model" in fields:
        name += f" (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    return name


def cpu_flags() -> set[str]:
    fields = _cpuinfo()
    return set((fields.get("flags") or fields.get("Features") or "").split())


def mem_total_gib() -> float:
    for line in _read_lines("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return float("nan")


def proc_status(key: str, pid: int | str = "self") -> int:
    """A byte count of /proc/<pid>/status (``VmRSS:``, ``RssAnon:``, ...); 0 once the process is gone."""
    for line in _read_lines(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def l3_bytes() -> int:
    """Total last-level cache of the machine (sum over distinct L3 instances; 32 MiB if unknown)."""
    seen, total = set(), 0
    for cache in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (cache / "level").read_text().strip() != "3":
                continue
            shared = (cache / "shared_cpu_list").read_text().strip()
            if shared in seen:
                continue
            seen.add(shared)
            size = (cache / "size").read_text().strip().upper()
            total += int(size.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        except (OSError, ValueError):
            continue
    return total or (32 << 20)


def commit() -> str:
    """The checkout's commit, '+ local changes' where tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + local changes" if dirty else "")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def lk_isa() -> str:
    try:
        from lvllm import _lk

        return _lk.best_isa()
    except ImportError:
        return "? (lvllm._lk not built)"


def machine(cpus: Iterable[int] | None = None) -> dict:
    """The facts of the header, for a report's JSON too; ``cpus``: those the benchmark runs on."""
    cpus = list(allowed_cpus() if cpus is None else cpus)
    return dict(
        date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", commit=commit(),
        command=command_line(), host=platform.node(), cpu=cpu_name(), allowed_cpus=len(allowed_cpus()),
        cpus_used=cpus, mem_total_gib=mem_total_gib(), l3_bytes=l3_bytes(), lk_isa=lk_isa(),
        isa_flags=sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "f16c", "amx"))),
        python=platform.python_version(), loadavg_start=os.getloadavg(),
    )


def header(name: str, facts: dict) -> str:
    """The first two lines of a benchmark's output: what ran, from which commit, and where."""
    return (f"{name} {facts['date']}, commit {facts['commit']}: {facts['command']}\n"
            f"machine: {facts['cpu']}, {facts['allowed_cpus']} CPUs allowed, cores {cpus_text(facts['cpus_used'])}, "
            f"RAM {facts['mem_total_gib']:.0f} GiB, L3 {facts['l3_bytes'] >> 20} MiB, lk ISA {facts['lk_isa']}, "
            f"load average {facts['loadavg_start'][0]:.2f}")


def stop_group(proc: subprocess.Popen, wait_s: float = 60) -> int | None:
    """SIGTERM to a server started in its own session (start_new_session=True), as systemd's
    KillMode=mixed sends it: to the server alone, which stops its engine itself (lvllm writes
    the routing statistics then; an engine sent SIGTERM too refuses that last call). SIGKILL to
    what of its process group is left after ``wait_s``; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()


# --------------------------------------------------------------------------- reference probes


def probe_bytes_per_thread(threads: int) -> int:
    """Each thread reads its own buffer, together far above the last-level cache: AMD's L3
    keeps part of a sweep 4x its size (128 MiB over a 32 MiB L3 read at ~37 GB/s against
    ~20 GB/s from DRAM), so >= 16x L3 and >= 512 MiB in all."""
    total = max(16 * l3_bytes(), 512 << 20)
    return min(1 << 30, max(64 << 20, total // max(1, threads)))


def read_bandwidth_gbs(threads: int | None = None, bytes_per_thread: int | None = None, reps: int = 3) -> float:
    """Read bandwidth, GB/s, of ``threads`` (default: one per allowed CPU) each sweeping
    ``bytes_per_thread`` (default :func:`probe_bytes_per_thread`) ``reps`` times (lk's probe)."""
    from lvllm import _lk

    threads = threads or len(allowed_cpus())
    return _lk.measure_read_bandwidth_gbs(threads, bytes_per_thread or probe_bytes_per_thread(threads), reps)


def ceilings(threads: int) -> dict:
    """The machine's read bandwidth and fp32 FMA peak on ``threads`` threads, now."""
    from lvllm import _lk

    per_thread = probe_bytes_per_thread(threads)
    return dict(read_gbs=read_bandwidth_gbs(threads, per_thread, 10), fma_gflops=_lk.measure_fma_peak_gflops(threads),
                bytes_per_thread=per_thread, source="lvllm._lk")


def bracketed(measure: Callable[[], Any], probe: Callable[[], float]) -> tuple[Any, list[float]]:
    """``measure()`` with ``probe()`` taken right before and right after it: (result, [before, after])."""
    before = probe()
    result = measure()
    return result, [before, probe()]


def steady_bandwidth(probes: list[float], tolerance: float = 0.15) -> float | None:
    """The mean of a measurement's probes where they agree within ``tolerance``, else None."""
    return statistics.mean(probes) if probes and min(probes) > (1 - tolerance) * max(probes) else None


# --------------------------------------------------------------------------- alternating rounds


def time_calls(call: Callable[[int], Any], calls: int, warmups: int = 0) -> list[float]:
    """Seconds of each of ``calls`` calls ``call(i)`` after ``warmups`` untimed ones (``i``
    counts all of them, so a call can rotate over weight copies)."""
    for i in range(warmups):
        call(i)
    times = []
    for i in range(warmups, warmups + calls):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return times


def alternate(measures: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list]:
    """``rounds`` rounds, each calling every measure once in the dict's order (the reference
    first, so each candidate's round has the reference's just before it): per name, its
    results round by round."""
    results: dict[str, list] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            results[name].append(measure())
    return results


def pairs_by_bandwidth(candidates: list, references: list, probes: Callable[[Any], list[float]],
                       tolerance: float = 0.15) -> list[tuple]:
    """For measurements not taken side by side: each candidate round with the reference round
    whose steady read bandwidth (``probes(round)``) is closest to its own, within
    ``tolerance``; a candidate round with no such reference round is left out."""
    pairs = []
    for candidate in candidates:
        level = steady_bandwidth(probes(candidate), tolerance)
        if not level:
            continue
        matches = [(abs(bw / level - 1), reference) for reference in references
                   if (bw := steady_bandwidth(probes(reference), tolerance)) and abs(bw / level - 1) < tolerance]
        if matches:
            pairs.append((candidate, min(matches, key=lambda m: m[0])[1]))
    return pairs


# --------------------------------------------------------------------------- report


def median(values: Iterable) -> float:
    """The median of the figures given, None and nan left out (nan where none is left)."""
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")


def ratio(candidate: float, reference: float, higher_is_better: bool = True) -> float:
    """How much better the candidate is than the reference: above 1 is better, whether the
    figure is a rate (higher is better) or a time (lower is better); nan without both."""
    num, den = (candidate, reference) if higher_is_better else (reference, candidate)
    if num is None or den is None or not den:
        return float("nan")
    return num / den


def paired_ratio(pairs: Iterable[tuple], value: Callable[[Any], float], higher_is_better: bool = True) -> float:
    """The median over (candidate, reference) pairs of rounds of :func:`ratio` of their ``value``."""
    return median(ratio(value(candidate), value(reference), higher_is_better) for candidate, reference in pairs)


def ratio_cell(value: float | None) -> str:
    """'1.23x', or '-' where there is no ratio."""
    return "-" if value is None or value != value else f"{value:.2f}x"


def table_head(columns: list[str]) -> list[str]:
    return [table_row(columns), "|" + "---|" * len(columns)]


def table_row(cells: Iterable) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def markdown_table(columns: list[str], rows: Iterable[Iterable]) -> list[str]:
    """A markdown table's lines: the header, the rule, a line per row."""
    return table_head(columns) + [table_row(row) for row in rows]


def choices(parser, option: str, text: str, valid) -> list[str]:
    """A comma-separated option's values, each one of ``valid`` (else the parser's error)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in valid]
    if unknown:
        parser.error(f"{option}: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    return values
