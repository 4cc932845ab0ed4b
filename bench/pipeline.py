"""Pipeline efficiency: raw model loop vs the whole Kafka -> worker -> Parquet path.

Run:  .venv/bin/python bench/pipeline.py [--json] [--model minilm] [--rows 3000]
      [--batch-rows 64] [--rows-per-job 32] [--torch-threads 1] [--unbatched-rows 1000]
      [--raw-passes 2] [--raw-unbatched-rows 300] [--partitions 4] [--keep]

One run measures, on the same corpus (``spotbatch.demo.sample_corpus``) and the same
batch size:

(a) ``raw_rows_per_s``: ``BatchRunner(get_handler(model), device="cpu").run()`` in this
    process (``--device`` picks another device; the workers get the same one)
    over the rows in batches of ``--batch-rows``, after
    ``torch.set_num_threads(--torch-threads)``. Model load and one warm-up batch are
    excluded; ``time.perf_counter`` covers every row. With ``--raw-passes 2`` (the
    default) one pass runs before (b) and one right after it, and (a) is all rows
    over all time: the machine's load drifts, and bracketing (b) makes b/a fairer.
    Both passes are printed; if they differ by more than 10 % a warning says so.

(b) ``pipeline_rows_per_s``: an embedded broker (Tansu) and a fresh topic; ALL jobs
    (``--rows-per-job`` rows each, inline) are published first; then ONE worker process
    ``python -m spotbatch worker --burst --model M --max-batch-rows B --torch-threads T
    --device D --session-timeout-ms 6000 --output <tmp>`` is started. rows/s = rows / (t_end - t_start):

    * t_start: the timestamp of the worker's first ``assigned [...]`` log line. Model
      load, group join and everything before the assignment are excluded; the first
      fetch (offset reset + fetch) is included, since that is pipeline work. The log
      clock is wall time with millisecond resolution (logging's ``asctime``).
    * t_end: the instant the group's committed offsets reach the log end of every
      partition, i.e. the last job is durable AND committed. To avoid perturbing the
      worker on a small machine, this process does not poll the broker during the
      run: it only lists the output folder (every 20 ms, a cheap ``scandir``), and
      once every job's Parquet file exists it polls committed offsets with one
      persistent admin client every ~10 ms. t_end is the wall time at which the
      first poll that sees the log end *returned*: an upper bound on the true commit
      instant, late by at most the printed "commit seen <= X s after" (time since the
      previous, negative probe was sent). rows/s up to the last Parquet file's mtime
      (a lower bound on t_end) is reported too.
    The worker's burst-mode exit comes ~2 s after it is caught up (its idle wait) plus
    shutdown; that tail is outside the interval. Nothing is subtracted from it.

    The run is then checked: exit code 0, committed offsets == log-end offsets,
    one Parquet file per job and as many output rows as rows published. A failed
    check makes the script exit 1 (the figures would be meaningless) and keeps the
    work folder with the worker logs. A rebalance during the run is a warning.

(c) ``unbatched_rows_per_s``: (b) again on a new topic with ``--max-batch-rows 1``,
    on ``--unbatched-rows`` rows (fewer by default: batch 1 is slow).

(a1) ``raw_unbatched_rows_per_s``: the raw loop at batch 1 on ``--raw-unbatched-rows``
    rows, so ``model_batching_gain`` = a / a1 shows how much batching can give at all.

Derived: ``efficiency`` = b / a (target >= 0.90) and ``batching_gain`` = b / c
(target >= 2.0). The script reports whether each target is met; it never fails on
them. ``efficiency_net_of_cpu_wait`` is b / a with the time each side's compute
thread spent runnable-but-waiting-for-a-core removed (other processes on a shared
machine); the headline ``efficiency`` is the plain one.

Peak RSS per worker: the last ``VmHWM`` read from /proc/<pid>/status while the
worker was alive (sampled every 100 ms, then every few ms once the last commit is
seen; VmHWM only grows, so the last read before exit is the peak). Not wait4()'s
``ru_maxrss``: Python spawns the child with vfork + exec, and at exec the kernel
folds the *parent's* RSS high-water mark into the child's maxrss, so it would report
this bench process (which holds the raw-loop model) whenever that is larger.

Diagnostics per worker: the timeline (spawn -> model loaded -> assigned -> last
output -> committed -> burst stop -> exit, seconds since spawn), CPU seconds
(user+sys from wait4), the average cores busy between assignment and commit
(/proc/<pid>/stat), and, for the busiest threads over that same window, seconds on
a CPU, waiting for a CPU (runnable while other threads or processes held the
cores) and off CPU (asleep: no work, or blocked on the GIL, a lock or I/O), from
/proc/<pid>/task/<tid>/schedstat. The main thread is the worker's Kafka owner
thread; with ``--torch-threads 1`` the busiest thread is the inference thread. The
raw loop's thread gets the same split, and the 1-minute load average at start and
end is in the config, so a busy machine is visible as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from procstat import proc_cpu_s, schedstat, threads_sched  # bench/procstat.py

EFFICIENCY_TARGET = 0.90
BATCHING_GAIN_TARGET = 2.0
_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_OUTPUT_SCAN_S = 0.020
_COMMIT_POLL_S = 0.010
_RSS_SAMPLE_S = 0.100


# ---- corpus -----------------------------------------------------------------------

def corpus(n: int) -> list[dict]:
    from spotbatch.demo import sample_corpus

    return list(sample_corpus(n))


# ---- (a) raw model loop --------------------------------------------------------------

class RawLoop:
    """(a): the model in this process, loaded once; ``measure`` times one pass."""

    def __init__(self, model: str, threads: int, device: str) -> None:
        import torch

        from spotbatch.models import get_handler
        from spotbatch.models.runner import BatchRunner

        torch.set_num_threads(threads)
        self.handler = get_handler(model)
        self.params = self.handler.check_params({})  # what the worker passes for a job without params
        self.runner = BatchRunner(self.handler, device=device)
        t0 = time.perf_counter()
        self.runner.load()
        self.load_s = round(time.perf_counter() - t0, 2)

    def measure(self, rows: list[dict], batch_rows: int) -> dict[str, Any]:
        values = [r[self.handler.input_column] for r in rows]
        self.runner.run(values[:batch_rows], self.params)  # warm-up, not timed
        sched0 = schedstat("/proc/thread-self/schedstat")
        t0 = time.perf_counter()
        batches = 0
        for i in range(0, len(values), batch_rows):
            self.runner.run(values[i : i + batch_rows], self.params)
            batches += 1
        seconds = time.perf_counter() - t0
        sched1 = schedstat("/proc/thread-self/schedstat")
        return {"rows": len(values), "batch_rows": batch_rows, "batches": batches, "seconds": round(seconds, 3),
                "rows_per_s": round(len(values) / seconds, 1), "thread": _sched_split(seconds, sched0, sched1)}


def combine_raw(passes: list[dict], load_s: float) -> dict[str, Any]:
    """(a) over several passes on the same rows: total rows / total time."""
    rows = sum(p["rows"] for p in passes)
    seconds = sum(p["seconds"] for p in passes)
    threads = [p["thread"] for p in passes if p["thread"]]
    thread = None
    if len(threads) == len(passes):
        thread = {k: round(sum(t[k] for t in threads), 2) for k in threads[0]}
    rates = [p["rows_per_s"] for p in passes]
    warnings = []
    if max(rates) > 1.10 * min(rates):
        warnings.append(f"raw passes differ by more than 10 % ({rates} rows/s): the machine's load changed "
                        "during the run; rerun on a quiet machine for a tighter efficiency figure")
    return {"rows": passes[0]["rows"], "rows_timed": rows, "warnings": warnings, "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1), "passes_rows_per_s": [p["rows_per_s"] for p in passes],
            "model_load_s": load_s, "thread": thread}


def _sched_split(wall_s: float, before: tuple[float, float] | None, after: tuple[float, float] | None) -> dict | None:
    """How a thread spent a wall-clock window: on CPU, waiting for a CPU, off CPU.

    "waiting_for_cpu" is time stolen by other runnable threads/processes (a busy
    machine); "off_cpu" is time asleep: no work, or blocked on the GIL, a lock or I/O.
    """
    if before is None or after is None:
        return None
    on, wait = after[0] - before[0], after[1] - before[1]
    return {"wall_s": round(wall_s, 2), "on_cpu_s": round(on, 2), "waiting_for_cpu_s": round(wait, 2),
            "off_cpu_s": round(max(0.0, wall_s - on - wait), 2)}


# ---- (b)/(c) whole pipeline ---------------------------------------------------------

@dataclass
class Phase:
    name: str
    batch_rows: int


def publish_all(bootstrap: str, topic: str, model: str, rows: list[dict], rows_per_job: int) -> tuple[int, int]:
    from kafka import KafkaProducer

    from spotbatch.models import get_handler
    from spotbatch.publish import publish_jobs, rows_to_jobs

    column = get_handler(model).input_column
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        jobs = rows_to_jobs(rows, model=model, input_column=column, rows_per_job=rows_per_job, prefix="bench")
        report = publish_jobs(producer, topic, jobs)
    finally:
        producer.close()
    if not report.ok:
        raise RuntimeError(f"{report.failed} jobs failed to publish: {report.errors[:3]}")
    return report.jobs, report.rows


def run_phase(bootstrap: str, phase: Phase, args: argparse.Namespace, rows: list[dict], workdir: Path) -> dict[str, Any]:
    from kafka.admin import KafkaAdminClient

    from spotbatch.kafka_admin import committed_offsets, ensure_topics, log_end_offsets
    from spotbatch.workers.streams import dlq_topic, results_topic

    tag = uuid.uuid4().hex[:8]
    topic, group = f"bench.{phase.name}.{tag}", f"bench-{phase.name}-{tag}"
    ensure_topics(bootstrap, {topic: args.partitions, results_topic(topic): 1, dlq_topic(topic): 1})
    jobs, published_rows = publish_all(bootstrap, topic, args.model, rows, args.rows_per_job)
    ends = log_end_offsets(bootstrap, topic)
    if sum(ends.values()) != jobs:
        raise RuntimeError(f"log ends {ends} do not add up to the {jobs} jobs published")

    output = workdir / phase.name
    output.mkdir(parents=True)
    log_path = workdir / f"worker-{phase.name}.log"
    cmd = [sys.executable, "-m", "spotbatch", "worker", "--burst", "--bootstrap", bootstrap, "--topic", topic,
           "--group", group, "--model", args.model, "--max-batch-rows", str(phase.batch_rows),
           "--torch-threads", str(args.torch_threads), "--device", args.device,
           "--session-timeout-ms", "6000", "--output", str(output)]
    if args.max_wait_ms is not None:
        cmd += ["--max-wait-ms", str(args.max_wait_ms)]

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-commit-probe", request_timeout_ms=10_000)
    try:
        with open(log_path, "wb") as log_file:
            t_spawn = time.time()
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            watch = _watch(proc.pid, output, log_path, jobs, lambda: _committed(admin, group, topic), ends, args.timeout_s)
    finally:
        admin.close()
    log_text = log_path.read_text(errors="replace")
    marks = _log_marks(log_text)

    problems, warnings = [], []
    if watch["exit_code"] != 0:
        problems.append(f"worker exit code {watch['exit_code']}")
    final = committed_offsets(bootstrap, group, topic)
    if not _reached(final, ends):
        problems.append(f"committed {final} != log ends {ends}")
    files, out_rows = _outputs(output)
    if files != jobs or out_rows != published_rows:
        problems.append(f"outputs: {files} files / {out_rows} rows, expected {jobs} / {published_rows}")
    if "assigned" not in marks:
        problems.append("no 'assigned' line in the worker log")
    if watch["t_commit"] is None:
        problems.append("never saw committed offsets reach the log end while the worker ran")
    if problems:
        raise RuntimeError(f"phase {phase.name} failed: {'; '.join(problems)}\n--- worker log tail ---\n"
                           + "\n".join(log_text.splitlines()[-30:]))
    if marks["assigned_count"] != 1 or marks["revoked"]:
        warnings.append(f"rebalances during the run: {marks['assigned_count']} assignments, "
                        f"{marks['revoked']} revokes/losses (figures include them)")

    t_start, t_end = marks["assigned"], watch["t_commit"]
    seconds = t_end - t_start

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t_spawn, 3)

    return {
        "rows": published_rows, "jobs": jobs, "batch_rows": phase.batch_rows,
        "seconds": round(seconds, 3), "rows_per_s": round(published_rows / seconds, 1),
        "rows_per_s_to_last_output": round(published_rows / (watch["t_last_output"] - t_start), 1)
        if watch["t_last_output"] else None,
        "commit_probe_uncertainty_s": round(watch["commit_probe_uncertainty_s"], 4),
        "peak_rss_mb": _mb(watch["vmhwm_kb"]),
        "cpu_s": round(watch["cpu_s"], 2),
        "cpu_cores_avg_over_run": round(watch["cpu_s_window"] / seconds, 2) if watch["cpu_s_window"] is not None else None,
        "threads_over_run": watch["threads"][:6],
        "timeline_s": {  # seconds since the worker process was spawned
            "model_loaded": rel(marks.get("model_loaded")), "assigned": rel(t_start),
            "last_output_written": rel(watch["t_last_output"]), "committed_to_log_end": rel(t_end),
            "burst_stop_logged": rel(marks.get("burst_stop")), "exited": rel(watch["t_exit"]),
        },
        "warnings": warnings,
        "topic": topic, "log": str(log_path),
    }


def _reached(committed: dict[int, int], ends: dict[int, int]) -> bool:
    """Every partition committed up to its log end (an empty partition needs no commit)."""
    return all(committed.get(p, 0) >= end for p, end in ends.items())


def _committed(admin: Any, group: str, topic: str) -> dict[int, int]:
    offsets = admin.list_group_offsets(group).get(group, {})
    return {tp.partition: m.offset for tp, m in offsets.items() if tp.topic == topic and m.offset >= 0}


def _watch(pid: int, output: Path, log_path: Path, jobs: int, committed, ends: dict[int, int], timeout_s: float) -> dict[str, Any]:
    """Follow the worker until it exits: outputs, commit instant, VmHWM, CPU, exit code."""
    deadline = time.monotonic() + timeout_s
    t_commit = t_all_outputs = None
    t_spawn = time.time()
    last_negative = None
    uncertainty = 0.0
    vmhwm = 0
    threads_at_assign: dict[int, tuple[float, float]] = {}
    threads_at_commit: dict[int, tuple[float, float]] = {}
    t_threads_at_assign = None
    cpu_at_assign = cpu_end = None
    next_rss = next_scan = 0.0
    while True:
        now = time.monotonic()
        if now >= next_rss or t_commit is not None:  # after the last commit: every turn, until exit
            vmhwm = max(vmhwm, _vmhwm_kb(pid))
            next_rss = now + _RSS_SAMPLE_S
        if t_commit is None and t_all_outputs is None and now >= next_scan:
            scanned = time.time()
            if _count_outputs(output) >= jobs:
                t_all_outputs = time.time()
            else:
                last_negative = scanned  # the final commit comes after the last file: not yet
            next_scan = now + _OUTPUT_SCAN_S
        if t_commit is None and t_all_outputs is not None:
            sent = time.time()
            try:
                reached = _reached(committed(), ends)
            except Exception:  # noqa: BLE001 - a failed probe is retried next turn
                reached = False
            if reached:
                t_commit = time.time()
                # the commit happened after the last negative observation (scan or probe)
                uncertainty = t_commit - (last_negative or t_spawn)
                cpu_end = proc_cpu_s(pid)
                threads_at_commit = threads_sched(pid)
            else:
                last_negative = sent
        waited, status, usage = os.wait4(pid, os.WNOHANG)
        if waited:
            t_exit = time.time()
            break
        if cpu_at_assign is None:
            cpu_at_assign = _cpu_if_assigned(pid, log_path)
            if cpu_at_assign is not None:
                threads_at_assign, t_threads_at_assign = threads_sched(pid), time.time()
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.wait4(pid, 0)
            raise TimeoutError(f"worker {pid} still running after {timeout_s:.0f}s")
        time.sleep(_COMMIT_POLL_S if t_commit is None else 0.002)
    window = None
    if t_commit is not None and cpu_at_assign is not None:
        window = cpu_end - cpu_at_assign
    return {
        "exit_code": os.waitstatus_to_exitcode(status), "t_commit": t_commit, "t_exit": t_exit,
        "t_last_output": _last_output_mtime(output), "commit_probe_uncertainty_s": uncertainty,
        "vmhwm_kb": vmhwm, "cpu_s": usage.ru_utime + usage.ru_stime,
        "cpu_s_window": window,
        "threads": _thread_deltas(pid, t_commit - t_threads_at_assign if t_commit and t_threads_at_assign else None,
                                  threads_at_assign, threads_at_commit),
    }


def _thread_deltas(pid: int, wall_s: float | None, before: dict, after: dict) -> list[dict]:
    """Per thread, between assignment and commit: on CPU / waiting for a CPU / off CPU.

    Busiest first. The main thread (tid == pid) is the worker's owner thread (polls
    Kafka, commits); the others are unnamed (Python 3.11 does not name OS threads).
    With --torch-threads 1 the busiest one is the inference thread; the rest are the
    I/O pool, kafka-python's network threads, and the producer's sender.
    """
    if wall_s is None:
        return []
    rows = []
    for tid, stat in after.items():
        split = _sched_split(wall_s, before.get(tid, (0.0, 0.0)), stat)
        if split and split["on_cpu_s"] > 0.005:
            rows.append({"thread": "main/owner" if tid == pid else f"tid {tid}", **split})
    return sorted(rows, key=lambda r: -r["on_cpu_s"])


def _cpu_if_assigned(pid: int, log: Path) -> float | None:
    """The worker's CPU seconds once its log shows the assignment (within ~10 ms)."""
    try:
        if b" assigned [" in log.read_bytes():
            return proc_cpu_s(pid)
    except OSError:
        pass
    return None


def _vmhwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0  # gone, or a zombie whose memory is already released


def _count_outputs(output: Path) -> int:
    n = 0
    for _, _, names in os.walk(output):
        n += sum(1 for f in names if f.endswith(".parquet") and not f.startswith("."))
    return n


def _parquet_files(output: Path) -> list[Path]:
    return [p for p in output.rglob("*.parquet") if not p.name.startswith(".")]


def _last_output_mtime(output: Path) -> float | None:
    files = _parquet_files(output)
    return max(p.stat().st_mtime for p in files) if files else None


def _outputs(output: Path) -> tuple[int, int]:
    import pyarrow.parquet as pq

    files = _parquet_files(output)
    return len(files), sum(pq.read_metadata(p).num_rows for p in files)


def _log_marks(text: str) -> dict[str, Any]:
    marks: dict[str, Any] = {"assigned_count": 0, "revoked": 0}
    for line in text.splitlines():
        m = _LOG_TS.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if " assigned [" in line:
            marks["assigned_count"] += 1
            marks.setdefault("assigned", t)
        elif re.search(r" (revoked|lost) \[\d", line):  # "revoked []" at start-up is no rebalance
            marks["revoked"] += 1
        elif " loaded on " in line:
            marks.setdefault("model_loaded", t)
        elif "burst mode: caught up" in line:
            marks.setdefault("burst_stop", t)
    return marks


def _mb(kb: int | None) -> float | None:
    return round(kb / 1024, 1) if kb else None


# ---- report -------------------------------------------------------------------------

def build_report(args: argparse.Namespace, raw: dict, batched: dict, unbatched: dict | None,
                 raw1: dict | None) -> dict[str, Any]:
    eff = round(batched["rows_per_s"] / raw["rows_per_s"], 3)
    net = _net_of_cpu_wait(raw, batched)
    gain = round(batched["rows_per_s"] / unbatched["rows_per_s"], 3) if unbatched else None
    return {
        "raw_rows_per_s": raw["rows_per_s"],
        "raw_unbatched_rows_per_s": raw1["rows_per_s"] if raw1 else None,
        "model_batching_gain": round(raw["rows_per_s"] / raw1["rows_per_s"], 3) if raw1 else None,
        "pipeline_rows_per_s": batched["rows_per_s"],
        "unbatched_rows_per_s": unbatched["rows_per_s"] if unbatched else None,
        "efficiency": eff,
        "batching_gain": gain,
        "efficiency_net_of_cpu_wait": net,
        "targets": {
            "efficiency": {"target": EFFICIENCY_TARGET, "met": eff >= EFFICIENCY_TARGET},
            "batching_gain": {"target": BATCHING_GAIN_TARGET, "met": gain >= BATCHING_GAIN_TARGET if gain else None},
        },
        "peak_rss_mb": {"batched_worker": batched["peak_rss_mb"],
                        "unbatched_worker": unbatched["peak_rss_mb"] if unbatched else None},
        "rows": {"raw": raw["rows"], "batched": batched["rows"], "unbatched": unbatched["rows"] if unbatched else None},
        "config": {"model": args.model, "device": args.device, "batch_rows": args.batch_rows, "rows_per_job": args.rows_per_job,
                   "torch_threads": args.torch_threads, "partitions": args.partitions,
                   "max_wait_ms": args.max_wait_ms if args.max_wait_ms is not None else "worker default",
                   "cpus": os.cpu_count(), "python": sys.version.split()[0],
                   "loadavg_1m_at_start": args.loadavg_start, "loadavg_1m_at_end": _loadavg()},
        "phases": {"raw": raw, "batched": batched, "unbatched": unbatched, "raw_unbatched": raw1},
    }


def _net_of_cpu_wait(raw: dict, batched: dict) -> float | None:
    """Secondary figure: b/a with each side's "waiting for a CPU" time removed.

    On a shared machine other processes steal cores at random; this shows what the
    pipeline would reach if neither the raw loop's thread nor the worker's inference
    thread had waited for a CPU. The headline efficiency stays the honest one.
    """
    rt = raw.get("thread")
    it = (batched.get("threads_over_run") or [None])[0]  # busiest: the inference thread
    if not rt or not it:
        return None
    raw_rate = raw["rows_timed"] / max(1e-9, rt["wall_s"] - rt["waiting_for_cpu_s"])
    pipe_rate = batched["rows"] / max(1e-9, batched["seconds"] - it["waiting_for_cpu_s"])
    return round(pipe_rate / raw_rate, 3)


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    ph = report["phases"]

    def ok(flag):
        return "-" if flag is None else ("[green]met[/green]" if flag else "[red]NOT met[/red]")

    t = Table(title=f"spotbatch pipeline bench ({report['config']['model']})")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("rows", justify="right")
    t.add_column("note")
    t.add_row("raw_rows_per_s (a)", f"{report['raw_rows_per_s']:.1f}", str(ph["raw"]["rows"]),
              f"in-process BatchRunner, batch {report['config']['batch_rows']}; passes "
              f"{ph['raw']['passes_rows_per_s']} rows/s")
    t.add_row("pipeline_rows_per_s (b)", f"{report['pipeline_rows_per_s']:.1f}", str(ph["batched"]["rows"]),
              f"assigned -> committed, {ph['batched']['seconds']} s, {ph['batched']['jobs']} jobs")
    if ph["unbatched"]:
        t.add_row("unbatched_rows_per_s (c)", f"{report['unbatched_rows_per_s']:.1f}", str(ph["unbatched"]["rows"]),
                  f"--max-batch-rows 1, {ph['unbatched']['seconds']} s")
    if report["raw_unbatched_rows_per_s"]:
        t.add_row("raw, batch 1 (a1)", f"{report['raw_unbatched_rows_per_s']:.1f}", str(ph["raw_unbatched"]["rows"]),
                  f"model's own batching gain a/a1 = {report['model_batching_gain']:.2f}")
    t.add_row("efficiency = b/a", f"{report['efficiency']:.3f}", "",
              f"target >= {EFFICIENCY_TARGET}: {ok(report['targets']['efficiency']['met'])}")
    if report["efficiency_net_of_cpu_wait"] is not None:
        t.add_row("  net of CPU wait", f"{report['efficiency_net_of_cpu_wait']:.3f}", "",
                  "b/a with time spent waiting for a core (busy machine) removed from both")
    gain = report["batching_gain"]
    t.add_row("batching_gain = b/c", "-" if gain is None else f"{gain:.3f}", "",
              f"target >= {BATCHING_GAIN_TARGET}: {ok(report['targets']['batching_gain']['met'])}")
    for name in ("batched", "unbatched"):
        p = ph[name]
        if p:
            t.add_row(f"peak RSS, {name} worker", f"{p['peak_rss_mb']} MB", "",
                      f"VmHWM; cpu {p['cpu_s']} s in all; "
                      f"{p['cpu_cores_avg_over_run']} cores over the run")
    console.print(t)

    d = Table(title="worker timelines (s since spawn)")
    d.add_column("phase")
    for key in ("model_loaded", "assigned", "last_output_written", "committed_to_log_end", "burst_stop_logged", "exited"):
        d.add_column(key, justify="right")
    for name in ("batched", "unbatched"):
        p = ph[name]
        if p:
            d.add_row(name, *[str(v) for v in p["timeline_s"].values()])
    console.print(d)
    th = Table(title="where the threads' time went (s): raw loop, and each worker from assigned to committed")
    for col in ("phase", "thread", "wall", "on CPU", "waiting for a CPU", "off CPU (idle/GIL/IO)"):
        th.add_column(col, justify="left" if col in ("phase", "thread") else "right")
    if ph["raw"].get("thread"):
        r = ph["raw"]["thread"]
        th.add_row("raw (all passes)", "main", *(str(r[k]) for k in ("wall_s", "on_cpu_s", "waiting_for_cpu_s", "off_cpu_s")))
    for name in ("batched", "unbatched"):
        p = ph[name]
        for r in (p or {}).get("threads_over_run", [])[:3]:
            th.add_row(name, r["thread"], *(str(r[k]) for k in ("wall_s", "on_cpu_s", "waiting_for_cpu_s", "off_cpu_s")))
    console.print(th)
    console.print(f"config: {json.dumps(report['config'])}")
    for warning in ph["raw"]["warnings"]:
        console.print(f"[yellow]warning (raw):[/yellow] {warning}")
    for name in ("batched", "unbatched"):
        p = ph[name]
        if p:
            console.print(f"{name}: commit seen <= {p['commit_probe_uncertainty_s']} s after it happened; "
                          f"rows/s to the last output file {p['rows_per_s_to_last_output']}")
            for warning in p["warnings"]:
                console.print(f"[yellow]warning ({name}):[/yellow] {warning}")


# ---- main ---------------------------------------------------------------------------

def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--rows", type=int, default=3000, help="rows for (a) and (b)")
    ap.add_argument("--unbatched-rows", type=int, default=1000, help="rows for (c); 0 skips (c)")
    ap.add_argument("--raw-passes", type=int, default=2,
                    help="passes of (a): the first before (b), the others right after it; (a) = all rows / all time")
    ap.add_argument("--raw-unbatched-rows", type=int, default=300,
                    help="rows for the raw loop at batch 1 (the model's own batching gain); 0 skips it")
    ap.add_argument("--batch-rows", type=int, default=64)
    ap.add_argument("--rows-per-job", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--device", default="cpu",
                    help="device for both (a) and the workers (cpu, cuda, cuda:N, auto); the same on both sides")
    ap.add_argument("--partitions", type=int, default=4, help="partitions of each bench topic")
    ap.add_argument("--max-wait-ms", type=int, default=None, help="worker --max-wait-ms (default: the worker's)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per worker")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (outputs, worker logs)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.rows, args.batch_rows, args.rows_per_job, args.torch_threads, args.raw_passes) < 1:
        raise SystemExit("--rows, --batch-rows, --rows-per-job, --torch-threads and --raw-passes must be >= 1")
    from spotbatch.embedded import EmbeddedBroker

    args.loadavg_start = _loadavg()
    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    rows = corpus(max(args.rows, args.unbatched_rows, args.raw_unbatched_rows))
    main_rows = rows[: args.rows]
    say(f"(a) raw model loop: {args.rows} rows, batch {args.batch_rows}, {args.torch_threads} torch thread(s)")
    loop = RawLoop(args.model, args.torch_threads, args.device)
    passes = [loop.measure(main_rows, args.batch_rows)]
    say(f"    {passes[0]['rows_per_s']} rows/s")
    workdir = Path(tempfile.mkdtemp(prefix="spotbatch-bench-"))
    unbatched = raw1 = None
    try:
        with EmbeddedBroker() as broker:
            say(f"(b) pipeline, batch {args.batch_rows}: {args.rows} rows; broker {broker.bootstrap}; work dir {workdir}")
            batched = run_phase(broker.bootstrap, Phase("batched", args.batch_rows), args, main_rows, workdir)
            say(f"    {batched['rows_per_s']} rows/s")
            if args.raw_passes > 1:
                say("(a) again, right after (b), so that (a) brackets (b)")
                for _ in range(args.raw_passes - 1):
                    passes.append(loop.measure(main_rows, args.batch_rows))
                    say(f"    {passes[-1]['rows_per_s']} rows/s")
            if args.unbatched_rows > 0:
                say(f"(c) pipeline, batch 1: {args.unbatched_rows} rows")
                unbatched = run_phase(broker.bootstrap, Phase("unbatched", 1), args,
                                      rows[: args.unbatched_rows], workdir)
                say(f"    {unbatched['rows_per_s']} rows/s")
        if args.raw_unbatched_rows > 0:
            say(f"(a1) raw model loop at batch 1: {args.raw_unbatched_rows} rows")
            raw1 = loop.measure(rows[: args.raw_unbatched_rows], 1)
            say(f"    {raw1['rows_per_s']} rows/s")
        raw = combine_raw(passes, loop.load_s)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}\n(work folder with worker logs kept: {workdir})", file=sys.stderr)
        args.keep = True  # the worker logs are the evidence
        return 1
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(args, raw, batched, unbatched, raw1)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
