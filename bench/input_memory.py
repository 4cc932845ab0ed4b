"""Peak memory of a worker on a big URI job: an input of any size is read part by part.

Run:  .venv/bin/python bench/input_memory.py [--json] [--big-mb 2048] [--small-mb 32]
      [--line-bytes 8192] [--keep]

One run starts an embedded broker and, for each phase, a fresh ``spotbatch worker
--burst --model tiny`` process that reads one job and exits:

* ``inline``: one inline job of 8 rows: the worker's own footprint (model, clients).
* ``small``: one JSONL URI job of ``--small-mb``.
* ``big``: one JSONL URI job of ``--big-mb`` (default 2 GB, real lines of
  ``--line-bytes`` each, so every byte is parsed, not a sparse file).

Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the kernel's high-water mark,
nothing sampled). Bounded memory means ``big`` stays near ``small``: the input's size
does not show up in the worker's memory. Each phase also checks its outputs: every row
written once and the offset committed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def write_jsonl(path: Path, size_mb: int, line_bytes: int) -> int:
    """A JSONL file of about ``size_mb`` MiB; returns its rows."""
    pad = "x" * max(1, line_bytes - 40)
    rows, target = 0, size_mb * 1024 * 1024
    with open(path, "w", buffering=8 * 1024 * 1024) as fh:
        while fh.tell() < target:
            block = "".join(f'{{"id": "r{rows + i}", "text": "{pad}"}}\n' for i in range(256))
            fh.write(block)
            rows += 256
    return rows


def run_phase(bootstrap: str, name: str, job: dict, expected_rows: int, workdir: Path, timeout_s: float) -> dict:
    from spotbatch.kafka_admin import committed_offsets, ensure_topics, log_end_offsets
    from kafka import KafkaProducer
    from spotbatch.workers.streams import dlq_topic, results_topic

    tag = uuid.uuid4().hex[:8]
    topic, group = f"bench.mem.{name}.{tag}", f"bench-mem-{name}-{tag}"
    ensure_topics(bootstrap, {topic: 1, results_topic(topic): 1, dlq_topic(topic): 1})
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=16 * 1024 * 1024)
    producer.send(topic, key=job["job_id"].encode(), value=json.dumps(job).encode()).get(timeout=30)
    producer.close()
    output = workdir / f"out-{name}"
    cmd = [sys.executable, "-m", "spotbatch", "worker", "--burst", "--bootstrap", bootstrap, "--topic", topic,
           "--group", group, "--model", "tiny", "--torch-threads", "1", "--session-timeout-ms", "6000",
           "--output", str(output), "--input-prefix", str(workdir)]
    log_path = workdir / f"worker-{name}.log"
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        status, rusage = _wait(proc, timeout_s)
    seconds = time.monotonic() - started
    committed, ends = committed_offsets(bootstrap, group, topic), log_end_offsets(bootstrap, topic)
    rows = _output_rows(output)
    if status != 0 or committed != ends or rows != expected_rows:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"phase {name}: exit {status}, committed {committed} (log ends {ends}), "
                           f"{rows} rows written of {expected_rows}\n{tail}")
    return {"phase": name, "rows": rows, "parts": _parts(output), "seconds": round(seconds, 1),
            "peak_rss_mb": round(rusage.ru_maxrss / 1024, 1)}


def _wait(proc: subprocess.Popen, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, rusage
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"worker still running after {timeout_s}s")


def _output_rows(output: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in output.rglob("*.parquet"))


def _parts(output: Path) -> int:
    return sum(1 for _ in output.rglob("part-*.parquet"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--big-mb", type=int, default=2048)
    parser.add_argument("--small-mb", type=int, default=32)
    parser.add_argument("--line-bytes", type=int, default=8192, help="under the tiny model's 10,000 characters a row")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    from spotbatch.embedded import EmbeddedBroker

    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    workdir = Path(tempfile.mkdtemp(prefix="spotbatch-bench-mem-"))
    try:
        small_rows = write_jsonl(workdir / "small.jsonl", args.small_mb, args.line_bytes)
        big_rows = write_jsonl(workdir / "big.jsonl", args.big_mb, args.line_bytes)
        say(f"inputs: small {small_rows} rows ({args.small_mb} MiB), big {big_rows} rows ({args.big_mb} MiB)")
        jobs = {
            "inline": ({"job_id": "inline", "model": "tiny",
                        "inputs": {"rows": [{"id": f"r{i}", "text": "hello"} for i in range(8)]}}, 8),
            "small": ({"job_id": "small", "model": "tiny", "inputs": {"uri": str(workdir / "small.jsonl")}}, small_rows),
            "big": ({"job_id": "big", "model": "tiny", "inputs": {"uri": str(workdir / "big.jsonl")}}, big_rows),
        }
        results = []
        with EmbeddedBroker() as broker:
            for name, (job, rows) in jobs.items():
                say(f"phase {name} ...")
                results.append(run_phase(broker.bootstrap, name, job, rows, workdir, args.timeout_s))
                say(f"    {results[-1]}")
        by = {r["phase"]: r for r in results}
        summary = {"input_mb": {"small": args.small_mb, "big": args.big_mb}, "line_bytes": args.line_bytes,
                   "phases": results, "big_over_small_rss": round(by["big"]["peak_rss_mb"] / by["small"]["peak_rss_mb"], 2),
                   "big_over_inline_rss_mb": round(by["big"]["peak_rss_mb"] - by["inline"]["peak_rss_mb"], 1)}
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            print(f"{'phase':8} {'rows':>9} {'parts':>6} {'seconds':>8} {'peak RSS MiB':>13}")
            for r in results:
                print(f"{r['phase']:8} {r['rows']:>9} {r['parts']:>6} {r['seconds']:>8} {r['peak_rss_mb']:>13}")
            print(f"big/small peak RSS: {summary['big_over_small_rss']}x; "
                  f"big over the inline job's footprint: {summary['big_over_inline_rss_mb']} MiB")
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
