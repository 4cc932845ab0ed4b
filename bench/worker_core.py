"""The worker's core figures in one run: the tiny ceiling, the broker's limit, minilm.

Run:  .venv/bin/python bench/worker_core.py [--json] [--quick] [--device cpu|cuda] [--skip-minilm]
      [--rows 60000] [--tiny-rows-per-job 10,100,1000] [--consumer-passes 3]
      [--paragraph-rows 800] [--demo-rows 2000] [--minilm-rows-per-job 32]
      [--torch-threads 1] [--partitions 4] [--timeout-s 600] [--keep]

One process, one embedded broker (Tansu), three parts:

(a) ``tiny``: for each of ``--tiny-rows-per-job`` (10, 100, 1000 rows per job) a fresh
    topic, all jobs published first, then ONE ``spotbatch worker --burst --model tiny
    --torch-threads T`` with every other setting at the worker's default (batch 64 rows,
    max wait 50 ms): ``bench/pipeline.py``'s ``run_phase``, i.e. rows / (the worker's
    ``assigned`` log line -> committed offsets at the log end), every output checked.
    The raw tiny loop (``pipeline.RawLoop``: ``BatchRunner`` in this process, batches of
    64) runs once before the first phase and once after each, so its passes bracket
    every phase; ``raw`` = all rows / all time over the passes, and each phase's
    ``vs_raw`` = pipeline rows/s / raw rows/s.

(b) the broker's side: a bare ``kafka.KafkaConsumer`` (no group, default fetch
    settings) assigned every partition of each tiny topic, from the beginning, until it
    has every record (the same job messages the worker read). records/s and MB/s (key +
    value bytes) from the assignment to the last record, the best of
    ``--consumer-passes``; ``consumer_cpu_share`` = the polling thread's CPU time / wall
    time (close to 1: the client is CPU-bound; low: it waits on the broker).
    ``rows_per_s_ceiling`` = records/s x rows per job: what no worker on this topic can
    beat. Whether kafka-python found the C ``crc32c`` module is reported (without it the
    pure-Python CRC caps a consumer at a few thousand records/s).

(c) ``minilm`` on both corpora, ``bench/token_batching.py``'s ``measure_corpus``:
    ``paragraphs`` (``pydoc_data.topics``, variable length; above its 1,976 rows the
    list repeats with new ids) and ``demo`` (``spotbatch.demo.sample_corpus``). Raw
    arrival-order loop (batches of 64, before and after the pipeline), the pipeline at
    the worker's defaults (token budget included), and the raw loop sorted by tokens.
    ``efficiency`` = pipeline / raw arrival order.

Targets (the issue's, for one worker on the 2-core CPU dev machine) are printed as a
table, target / value / met, and never enforced: the exit code is 0 whatever they say,
1 only when a phase fails its checks (worker exit code, offsets, outputs) or times out.
Peak RSS is per worker process (VmHWM, see pipeline.py). Each pipeline phase also
carries ``window_wall_s``: [assigned, committed] as Unix times, so samples taken
outside (``bench/gpu.sh``'s nvidia-smi) can be cut to the pipeline's own interval.

``--quick`` shrinks the rows (tiny 12,000, paragraphs 160, demo 400, 2 consumer passes)
for a smoke run of about two minutes on 2 cores; its figures are noisier (fixed costs
weigh more) and not the issue's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline  # noqa: E402  (bench/pipeline.py)
from pipeline import Phase, RawLoop, combine_raw, corpus, run_phase  # noqa: E402
from token_batching import measure_corpus, paragraphs  # noqa: E402  (bench/token_batching.py)

from spotbatch.config import Settings  # noqa: E402

WORKER_BATCH_ROWS = Settings.model_fields["max_batch_rows"].default  # the worker's default --max-batch-rows

# (key, what, threshold): value >= threshold is "met"
TARGETS = [
    ("tiny_100_rows_per_s", "tiny, 100 rows/job: rows/s", 35_000.0),
    ("tiny_100_vs_raw", "tiny, 100 rows/job: pipeline / raw tiny loop", 0.35),
    ("tiny_10_rows_per_s", "tiny, 10 rows/job: rows/s", 12_000.0),
    ("tiny_1000_rows_per_s", "tiny, 1,000 rows/job: rows/s", 50_000.0),
    ("minilm_demo_efficiency", "minilm, demo: pipeline / raw arrival loop", 0.95),
    ("minilm_paragraphs_efficiency", "minilm, paragraphs: pipeline / raw arrival loop", 0.95),
    ("minilm_paragraphs_speedup", "minilm, paragraphs: speed-up over the raw arrival loop", 3.0),
]

QUICK = {"rows": 12_000, "paragraph_rows": 160, "demo_rows": 400, "consumer_passes": 2}
DEFAULTS = {"rows": 60_000, "paragraph_rows": 800, "demo_rows": 2000, "consumer_passes": 3}


# ---- (b) a bare consumer ---------------------------------------------------------------

def crc32c_c_available() -> bool:
    """Whether kafka-python's record decoding uses the C crc32c module."""
    try:
        from kafka.record import util
    except ImportError:
        return False
    return getattr(util, "crc32c_c", None) is not None


def bare_consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 120.0) -> dict[str, Any]:
    """One pass: a fresh group-less consumer reads every record of ``topic`` from offset 0."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", client_id="bench-bare-consumer")
    try:
        deadline = time.monotonic() + 15.0
        parts = consumer.partitions_for_topic(topic)
        while not parts:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bare consumer: no metadata for {topic}")
            time.sleep(0.05)
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        records = nbytes = 0
        t_first = None
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while records < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare consumer: {records} of {expected} records of {topic} after {timeout_s:.0f}s")
            for recs in consumer.poll(timeout_ms=200).values():
                if t_first is None:
                    t_first = time.perf_counter()
                records += len(recs)
                nbytes += sum(max(r.serialized_key_size, 0) + max(r.serialized_value_size, 0) for r in recs)
        t1 = time.perf_counter()
        cpu = time.thread_time() - cpu0
    finally:
        consumer.close()
    seconds = t1 - t0
    return {"records": records, "bytes": nbytes, "seconds": round(seconds, 4),
            "records_per_s": round(records / seconds, 1), "mb_per_s": round(nbytes / seconds / 1e6, 2),
            "records_per_s_after_first_fetch": round(records / (t1 - t_first), 1) if t_first and t1 > t_first else None,
            "consumer_cpu_share": round(cpu / seconds, 2)}


def bare_consumer_phase(bootstrap: str, topic: str, jobs: int, rows_per_job: int, passes: int) -> dict[str, Any]:
    runs = [bare_consume(bootstrap, topic, jobs) for _ in range(passes)]
    best = max(runs, key=lambda r: r["records_per_s"])
    return {"topic": topic, "rows_per_job": rows_per_job, "records": jobs,
            "mean_record_bytes": round(best["bytes"] / max(1, best["records"]), 1),
            "records_per_s": best["records_per_s"], "mb_per_s": best["mb_per_s"],
            "rows_per_s_ceiling": round(best["records_per_s"] * rows_per_job, 1),
            "consumer_cpu_share": best["consumer_cpu_share"],
            "passes_records_per_s": [r["records_per_s"] for r in runs], "passes": runs}


# ---- helpers ---------------------------------------------------------------------------------

def _window(log_path: Path, seconds: float) -> list[float] | None:
    """[assigned, committed] as Unix times, from the worker log's first ``assigned`` line.

    Uses pipeline._log_marks (private): run_phase does not return absolute times.
    """
    marks = getattr(pipeline, "_log_marks", None)
    try:
        t = marks(log_path.read_text(errors="replace")).get("assigned") if marks else None
    except OSError:
        return None
    return [round(t, 3), round(t + seconds, 3)] if t is not None else None


def paragraph_rows(n: int) -> list[dict]:
    """The first ``n`` paragraphs; past the 1,976 there are, the list again with new ids."""
    base = paragraphs()
    if n <= len(base):
        return base[:n]
    return [{"id": f"p{i}", "text": base[i % len(base)]["text"]} for i in range(n)]


def _sub(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    """A copy of the options for one phase (run_phase and measure_corpus read them)."""
    return argparse.Namespace(**{**vars(args), **changes})


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return None


def _default_max_batch_tokens() -> int | None:
    env = os.environ.get("SPOTBATCH_MAX_BATCH_TOKENS")
    if env:
        return int(env)
    from spotbatch.config import Settings

    return Settings.model_fields["max_batch_tokens"].default


# ---- the run -----------------------------------------------------------------------------------

def run(args: argparse.Namespace, workdir: Path, say) -> dict[str, Any]:
    from spotbatch.embedded import EmbeddedBroker

    report: dict[str, Any] = {"tiny": None, "bare_consumer": None, "minilm": None}
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap
        say(f"broker {bootstrap}; work dir {workdir}")

        # (a) tiny
        rows = corpus(args.rows)
        tiny_args = _sub(args, model="tiny", max_wait_ms=None)
        say(f"(a) tiny: {args.rows} rows, raw loop batch {WORKER_BATCH_ROWS}, {args.torch_threads} torch thread(s)")
        raw_loop = RawLoop("tiny", args.torch_threads, args.device)
        passes = [raw_loop.measure(rows, WORKER_BATCH_ROWS)]
        say(f"    raw tiny loop: {passes[-1]['rows_per_s']} rows/s")
        phases: dict[str, Any] = {}
        topics: list[tuple[str, int, int]] = []
        for n in args.tiny_rows_per_job:
            phase = run_phase(bootstrap, Phase(f"tiny-{n}", WORKER_BATCH_ROWS), _sub(tiny_args, rows_per_job=n),
                              rows, workdir)
            passes.append(raw_loop.measure(rows, WORKER_BATCH_ROWS))
            phase["window_wall_s"] = _window(Path(phase["log"]), phase["seconds"])
            phases[str(n)] = phase
            topics.append((phase["topic"], phase["jobs"], n))
            say(f"    {n} rows/job: {phase['rows_per_s']} rows/s ({phase['jobs']} jobs, peak RSS "
                f"{phase['peak_rss_mb']} MB); raw tiny loop after it: {passes[-1]['rows_per_s']} rows/s")
        raw = combine_raw(passes, raw_loop.load_s)
        del raw_loop
        for phase in phases.values():
            phase["vs_raw"] = round(phase["rows_per_s"] / raw["rows_per_s"], 3)
        report["tiny"] = {"raw": raw, "rows_per_job": phases}

        # (b) the broker's limit: a bare consumer over the same topics
        say(f"(b) bare kafka-python consumer, best of {args.consumer_passes} (C crc32c: {crc32c_c_available()})")
        consumer: dict[str, Any] = {"crc32c_c": crc32c_c_available(), "topics": {}}
        for topic, jobs, n in topics:
            res = bare_consumer_phase(bootstrap, topic, jobs, n, args.consumer_passes)
            consumer["topics"][str(n)] = res
            say(f"    {n} rows/job topic: {res['records_per_s']} records/s, {res['mb_per_s']} MB/s "
                f"(ceiling {res['rows_per_s_ceiling']} rows/s)")
        if consumer["topics"]:
            top = max(consumer["topics"].values(), key=lambda r: r["records_per_s"])
            consumer["records_per_s"] = top["records_per_s"]
            consumer["records_per_s_topic_rows_per_job"] = top["rows_per_job"]
        report["bare_consumer"] = consumer

        # (c) minilm, both corpora
        if not args.skip_minilm:
            margs = _sub(args, model="minilm", rows_per_job=args.minilm_rows_per_job, batch_rows=WORKER_BATCH_ROWS,
                         max_batch_tokens=_default_max_batch_tokens(), max_wait_ms=None)
            say(f"(c) minilm: paragraphs {args.paragraph_rows} rows, demo {args.demo_rows} rows, "
                f"{args.minilm_rows_per_job} rows/job, token budget {margs.max_batch_tokens} (worker default)")
            loop = RawLoop("minilm", args.torch_threads, args.device)
            minilm: dict[str, Any] = {"model_load_s": loop.load_s, "max_batch_tokens": margs.max_batch_tokens}
            for name, crows in (("paragraphs", paragraph_rows(args.paragraph_rows)), ("demo", corpus(args.demo_rows))):
                res = measure_corpus(name, crows, loop, margs, bootstrap, workdir, say)
                res["efficiency"] = res["speedup_vs_arrival"]  # the issue's: pipeline / raw arrival order
                res["window_wall_s"] = _window(workdir / f"worker-tokens-{name}.log", res["pipeline_seconds"])
                minilm[name] = res
            report["minilm"] = minilm
    report["targets"] = targets(report)
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    tiny = (report.get("tiny") or {}).get("rows_per_job", {})
    mini = report.get("minilm") or {}
    values: dict[str, float | None] = {
        "tiny_100_rows_per_s": tiny.get("100", {}).get("rows_per_s"),
        "tiny_100_vs_raw": tiny.get("100", {}).get("vs_raw"),
        "tiny_10_rows_per_s": tiny.get("10", {}).get("rows_per_s"),
        "tiny_1000_rows_per_s": tiny.get("1000", {}).get("rows_per_s"),
        "minilm_demo_efficiency": (mini.get("demo") or {}).get("efficiency"),
        "minilm_paragraphs_efficiency": (mini.get("paragraphs") or {}).get("efficiency"),
        "minilm_paragraphs_speedup": (mini.get("paragraphs") or {}).get("speedup_vs_arrival"),
    }
    return [{"key": key, "target": what, "threshold": thr, "value": values[key],
             "met": None if values[key] is None else values[key] >= thr} for key, what, thr in TARGETS]


# ---- printing ----------------------------------------------------------------------------------

def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=120)
    cfg = report["config"]
    tiny = report["tiny"]
    t = Table(title=f"(a) tiny, one worker, worker defaults, {cfg['rows']} rows, device {cfg['device']}",
              caption=f"raw tiny loop passes (rows/s): {tiny['raw']['passes_rows_per_s']}")
    for col in ("rows/job", "jobs", "rows/s", "vs raw", "seconds", "peak RSS MB", "worker cores", "infer. off CPU s"):
        t.add_column(col, justify="right")
    for n, p in tiny["rows_per_job"].items():
        busiest = (p["threads_over_run"] or [{}])[0]
        t.add_row(n, str(p["jobs"]), f"{p['rows_per_s']:,.0f}", f"{p['vs_raw']:.3f}", f"{p['seconds']:.2f}",
                  str(p["peak_rss_mb"]), str(p["cpu_cores_avg_over_run"]), str(busiest.get("off_cpu_s", "-")))
    t.add_row("raw loop", "", f"{tiny['raw']['rows_per_s']:,.0f}", "1", f"{tiny['raw']['seconds']:.2f}", "", "", "")
    console.print(t)

    bc = report["bare_consumer"]
    b = Table(title=f"(b) bare kafka-python consumer on the same topics, best of {cfg['consumer_passes']} "
                    f"(C crc32c: {bc['crc32c_c']})")
    for col in ("rows/job", "records", "bytes/record", "records/s", "MB/s", "rows/s ceiling", "client CPU share"):
        b.add_column(col, justify="right")
    for n, r in bc["topics"].items():
        b.add_row(n, str(r["records"]), f"{r['mean_record_bytes']:,.0f}", f"{r['records_per_s']:,.0f}",
                  f"{r['mb_per_s']:.2f}", f"{r['rows_per_s_ceiling']:,.0f}", f"{r['consumer_cpu_share']:.2f}")
    console.print(b)

    mini = report["minilm"]
    if mini:
        m = Table(title=f"(c) minilm, {cfg['minilm_rows_per_job']} rows/job, token budget {mini['max_batch_tokens']}",
                  caption="raw arrival passes (rows/s): " + "; ".join(
                      f"{n} {mini[n]['raw_arrival_passes']}" for n in ("paragraphs", "demo")))
        for col in ("corpus", "rows", "tokens p50/max", "raw arrival", "raw sorted", "pipeline",
                    "efficiency", "vs sorted", "peak RSS MB"):
            m.add_column(col, justify="left" if col == "corpus" else "right")
        for name in ("paragraphs", "demo"):
            c = mini[name]
            m.add_row(name, str(c["rows"]), f"{c['tokens']['p50']}/{c['tokens']['max']}",
                      f"{c['raw_arrival_rows_per_s']:.1f}", f"{c['raw_sorted_rows_per_s']:.1f}",
                      f"{c['pipeline_rows_per_s']:.1f}", f"{c['efficiency']:.3f}", f"{c['efficiency_vs_sorted']:.3f}",
                      str(c["peak_rss_mb"]))
        console.print(m)

    g = Table(title="targets (issue 10; one worker on the 2-core CPU machine; reported, never enforced)")
    for col in ("target", "value", "met"):
        g.add_column(col, justify="left" if col == "target" else "right")
    for row in report["targets"]:
        v = row["value"]
        shown = "-" if v is None else (f"{v:,.0f}" if row["threshold"] >= 100 else f"{v:.3f}")
        met = "-" if row["met"] is None else ("[green]met[/green]" if row["met"] else "[red]NOT met[/red]")
        g.add_row(f"{row['target']} >= {row['threshold']:,g}", shown, met)
    console.print(g)
    console.print(f"config: {json.dumps(cfg)}")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def _warnings(report: dict[str, Any]) -> list[str]:
    out = []
    if report["config"]["device"] != "cpu":
        out.append(f"device {report['config']['device']}: the targets are for the CPU dev machine")
    if report["config"]["quick"]:
        out.append("--quick: small row counts, fixed costs weigh more; not the issue's figures")
    set_env = sorted(k for k in os.environ if k.startswith("SPOTBATCH_"))
    if set_env:
        out.append(f"SPOTBATCH_* set in the environment (the workers inherit them): {', '.join(set_env)}")
    tiny = report["tiny"]
    out += [f"tiny raw: {w}" for w in tiny["raw"]["warnings"]]
    for n, p in tiny["rows_per_job"].items():
        out += [f"tiny {n} rows/job: {w}" for w in p["warnings"]]
    if not report["bare_consumer"]["crc32c_c"]:
        out.append("the C crc32c module is not importable: kafka-python uses its pure-Python CRC (slow)")
    for name in ("paragraphs", "demo"):
        c = (report["minilm"] or {}).get(name)
        if c:
            out += [f"minilm {name}: {w}" for w in c["warnings"]]
    return out


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress off)")
    ap.add_argument("--quick", action="store_true", help="small row counts: a ~2 min smoke run on 2 cores")
    ap.add_argument("--device", default="cpu", help="raw loops and workers alike (cpu, cuda, cuda:N)")
    ap.add_argument("--skip-minilm", action="store_true", help="skip (c)")
    ap.add_argument("--rows", type=int, default=None, help=f"tiny rows per phase (default {DEFAULTS['rows']})")
    ap.add_argument("--tiny-rows-per-job", default="10,100,1000", help="comma-separated")
    ap.add_argument("--consumer-passes", type=int, default=None, help=f"default {DEFAULTS['consumer_passes']}")
    ap.add_argument("--paragraph-rows", type=int, default=None, help=f"default {DEFAULTS['paragraph_rows']}")
    ap.add_argument("--demo-rows", type=int, default=None, help=f"default {DEFAULTS['demo_rows']}")
    ap.add_argument("--minilm-rows-per-job", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per worker")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (outputs, worker logs)")
    args = ap.parse_args(argv)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else default)
    try:
        args.tiny_rows_per_job = [int(x) for x in args.tiny_rows_per_job.split(",") if x.strip()]
    except ValueError:
        ap.error("--tiny-rows-per-job: comma-separated integers")
    if min([args.rows, args.consumer_passes, args.paragraph_rows, args.demo_rows, args.minilm_rows_per_job,
            args.torch_threads, args.partitions, *args.tiny_rows_per_job]) < 1:
        ap.error("row counts, passes, threads and partitions must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    load_start = _loadavg()
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="spotbatch-core-"))
    try:
        report = run(args, workdir, say)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}\n(work folder with worker logs kept: {workdir})", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["config"] = {
        "device": args.device, "quick": args.quick, "rows": args.rows, "tiny_rows_per_job": args.tiny_rows_per_job,
        "worker_batch_rows": WORKER_BATCH_ROWS, "torch_threads": args.torch_threads, "partitions": args.partitions,
        "consumer_passes": args.consumer_passes, "skip_minilm": args.skip_minilm,
        "paragraph_rows": args.paragraph_rows, "demo_rows": args.demo_rows,
        "minilm_rows_per_job": args.minilm_rows_per_job, "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "loadavg_1m_at_start": load_start, "loadavg_1m_at_end": _loadavg(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    report["warnings"] = _warnings(report)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
