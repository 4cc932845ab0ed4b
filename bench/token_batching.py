"""Token-aware batching on a variable-length corpus: raw loops vs the pipeline (minilm).

Run:  .venv/bin/python bench/token_batching.py [--json] [--rows 800] [--demo-rows 2000]
      [--batch-rows 64] [--max-batch-tokens 16384] [--rows-per-job 32] [--torch-threads 1]
      [--device cpu] [--skip-demo]

Corpora: ``paragraphs``, the standard library's ``pydoc_data.topics`` split on blank
lines, whitespace collapsed, kept at 5-400 words (1,976 of them; the first ``--rows``
in that order), and ``demo``, ``spotbatch.demo.sample_corpus`` (short, alike rows).

Per corpus, in this process (``bench/pipeline.py``'s RawLoop: BatchRunner, torch
threads 1, model load and a warm-up batch excluded):

* ``raw_arrival``: batches of ``--batch-rows`` in corpus (arrival) order: every batch
  padded to its longest row. The issue's baseline (about 14 rows/s for 1,976 paragraphs).
* ``raw_sorted``: the same rows sorted by token count first, batches of ``--batch-rows``:
  what the model does with the least padding (the issue measured 59.6).

Then the pipeline, exactly as ``bench/pipeline.py`` (b) measures it: embedded broker,
all jobs published first, ONE worker process ``--burst``, rows / (assigned ->
committed to log end), every output checked. The worker gets ``--max-batch-tokens``
(env SPOTBATCH_MAX_BATCH_TOKENS), so it sorts each batching window by tokens and cuts
it by that budget. The raw arrival loop runs once before and once after the pipeline,
bracketing it.

Figures: ``speedup_vs_arrival`` = pipeline / raw_arrival (target >= 3.0 on paragraphs),
``efficiency`` = pipeline / raw_arrival on the demo corpus as in pipeline.py, and
``efficiency_vs_sorted`` = pipeline / raw_sorted on both (the model's best order;
target >= 0.95). Targets are reported, never enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import Phase, RawLoop, combine_raw, corpus, run_phase  # noqa: E402  (bench/pipeline.py)

SPEEDUP_TARGET = 3.0
EFFICIENCY_TARGET = 0.95


def paragraphs(limit: int | None = None) -> list[dict]:
    """``pydoc_data.topics`` paragraphs of 5-400 words, in the module's order."""
    from pydoc_data.topics import topics

    out = []
    for text in topics.values():
        for para in text.split("\n\n"):
            words = para.split()
            if 5 <= len(words) <= 400:
                out.append({"id": f"p{len(out)}", "text": " ".join(words)})
    return out[:limit] if limit else out


def token_lengths(loop: RawLoop, rows: list[dict]) -> list[int]:
    return [int(n) for n in loop.handler.prepare([r["text"] for r in rows]).lengths]


def measure_corpus(name: str, rows: list[dict], loop: RawLoop, args: argparse.Namespace, bootstrap: str,
                   workdir: Path, say) -> dict[str, Any]:
    lengths = token_lengths(loop, rows)
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    say(f"[{name}] {len(rows)} rows, tokens p50 {sorted(lengths)[len(lengths) // 2]} max {max(lengths)}")
    arrival = [loop.measure(rows, args.batch_rows)]
    say(f"    raw arrival order: {arrival[0]['rows_per_s']} rows/s")
    phase = run_phase(bootstrap, Phase(f"tokens-{name}", args.batch_rows), args, rows, workdir)
    say(f"    pipeline (token budget {args.max_batch_tokens}): {phase['rows_per_s']} rows/s")
    arrival.append(loop.measure(rows, args.batch_rows))
    say(f"    raw arrival order again: {arrival[1]['rows_per_s']} rows/s")
    ordered = loop.measure([rows[i] for i in order], args.batch_rows)
    say(f"    raw sorted by tokens: {ordered['rows_per_s']} rows/s")
    raw = combine_raw(arrival, loop.load_s)
    pipe = phase["rows_per_s"]
    return {
        "rows": len(rows), "tokens": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths),
                                      "p50": sorted(lengths)[len(lengths) // 2]},
        "raw_arrival_rows_per_s": raw["rows_per_s"], "raw_arrival_passes": raw["passes_rows_per_s"],
        "raw_sorted_rows_per_s": ordered["rows_per_s"], "pipeline_rows_per_s": pipe,
        "speedup_vs_arrival": round(pipe / raw["rows_per_s"], 3),
        "efficiency_vs_sorted": round(pipe / ordered["rows_per_s"], 3),
        "peak_rss_mb": phase["peak_rss_mb"], "pipeline_seconds": phase["seconds"],
        "worker_threads": phase["threads_over_run"][:3], "warnings": raw["warnings"] + phase["warnings"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rows", type=int, default=800, help="paragraphs (of 1,976)")
    ap.add_argument("--demo-rows", type=int, default=2000)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--batch-rows", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--rows-per-job", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--max-wait-ms", type=int, default=None)
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    args.model = "minilm"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from spotbatch.embedded import EmbeddedBroker

    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    os.environ["SPOTBATCH_MAX_BATCH_TOKENS"] = str(args.max_batch_tokens)  # the worker processes inherit it
    loop = RawLoop("minilm", args.torch_threads, args.device)
    workdir = Path(tempfile.mkdtemp(prefix="spotbatch-tokens-"))
    report: dict[str, Any] = {}
    try:
        with EmbeddedBroker() as broker:
            report["paragraphs"] = measure_corpus("paragraphs", paragraphs(args.rows), loop, args,
                                                  broker.bootstrap, workdir, say)
            if not args.skip_demo:
                report["demo"] = measure_corpus("demo", corpus(args.demo_rows), loop, args, broker.bootstrap,
                                                workdir, say)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}\n(work folder kept: {workdir})", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    para = report["paragraphs"]
    report["targets"] = {
        "paragraphs_speedup_vs_arrival": {"target": SPEEDUP_TARGET, "value": para["speedup_vs_arrival"],
                                          "met": para["speedup_vs_arrival"] >= SPEEDUP_TARGET},
        **{f"{c}_efficiency": {"target": EFFICIENCY_TARGET, "vs_sorted": report[c]["efficiency_vs_sorted"],
                               "vs_arrival": report[c]["speedup_vs_arrival"],
                               "met": max(report[c]["efficiency_vs_sorted"], report[c]["speedup_vs_arrival"])
                               >= EFFICIENCY_TARGET}
           for c in ("paragraphs", "demo") if c in report},
    }
    report["config"] = {k: getattr(args, k) for k in ("rows", "demo_rows", "batch_rows", "max_batch_tokens",
                                                      "rows_per_job", "torch_threads", "device", "partitions")}
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
