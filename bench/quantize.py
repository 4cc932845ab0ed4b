"""Quantised model variants against fp32: rows/s and agreement, on two corpora.

    .venv/bin/python bench/quantize.py                     # rich tables, ~4-6 min on 2 shared cores
    .venv/bin/python bench/quantize.py --json              # one JSON object on stdout
    .venv/bin/python bench/quantize.py --rows 100 --corpora demo   # quick smoke run

Corpora: ``demo`` is ``spotbatch.demo.sample_corpus`` (short templated sentences);
``paragraphs`` is the standard library's ``pydoc_data.topics`` split on blank lines,
whitespace collapsed, 5-400 words (1,976 paragraphs, about 32 words on average), of
which ``--rows`` are taken evenly spaced, so short and long ones mix in every batch.

Method: the fp32 handler (``get_handler(--model)``) and one ``quantized(...)`` variant
per ``--schemes`` entry are loaded on the CPU, each behind its own
``BatchRunner(precision="fp32")`` (what the worker calls), with
``torch.set_num_threads(--torch-threads)``. Every batch of ``--batch-rows`` rows goes
through all of them side by side (the order rotates per batch), so load on the shared
machine falls on all alike; one warm-up batch each is excluded. ``rows_per_s`` = rows /
the sum of that runner's batch wall times; ``cpu_speedup`` is the same ratio on the
calling thread's CPU time (with one torch thread the model runs on it), which other
processes taking the cores do not move. Agreement is against the fp32 outputs of the
same rows: per-row cosine (mean, 1st percentile, min) and the mean share of each row's
top ``--k`` nearest neighbours (cosine, within the corpus) that both agree on. A variant
passes ``--gate`` when its mean and 1st-percentile cosine both reach it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from spotbatch.demo import sample_corpus  # noqa: E402
from spotbatch.models import get_handler  # noqa: E402
from spotbatch.models.quantize import SCHEMES, agreement, quantized  # noqa: E402
from spotbatch.models.runner import BatchRunner  # noqa: E402

CORPORA = ("demo", "paragraphs")


def paragraphs(rows: int, *, min_words: int = 5, max_words: int = 400) -> list[str]:
    """``rows`` paragraphs of pydoc_data.topics, evenly spaced over all of them."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if min_words <= len(text.split()) <= max_words:
                found.append(text)
    step = max(1, len(found) // rows)
    return found[::step][:rows]


def corpus(name: str, rows: int) -> list[str]:
    if name == "demo":
        return [row["text"] for row in sample_corpus(rows)]
    return paragraphs(rows)


def side_by_side(runners: dict[str, BatchRunner], texts: list[str], batch_rows: int) -> dict[str, dict[str, Any]]:
    """Run every batch through every runner; per runner: outputs, wall and CPU seconds."""
    batches = [texts[i : i + batch_rows] for i in range(0, len(texts), batch_rows)]
    names = list(runners)
    for name in names:  # warm-up: first-call allocations and kernel choices
        runners[name].run(batches[0], {})
    result = {name: {"parts": [], "wall_s": 0.0, "cpu_s": 0.0} for name in names}
    for index, batch in enumerate(batches):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.thread_time()
            out = runners[name].run(batch, {})["embedding"]
            result[name]["cpu_s"] += time.thread_time() - cpu
            result[name]["wall_s"] += time.perf_counter() - wall
            result[name]["parts"].append(out)
    for entry in result.values():
        entry["embedding"] = np.concatenate(entry.pop("parts"))
    return result


def measure(args: argparse.Namespace, name: str, runners: dict[str, BatchRunner]) -> dict[str, Any]:
    texts = corpus(name, args.rows)
    runs = side_by_side(runners, texts, args.batch_rows)
    base = runs["fp32"]
    words = [len(t.split()) for t in texts]
    report: dict[str, Any] = {"rows": len(texts), "words_mean": round(float(np.mean(words)), 1),
                              "words_max": max(words), "variants": {}}
    for variant, run in runs.items():
        entry = {"rows_per_s": round(len(texts) / run["wall_s"], 1),
                 "speedup": round(base["wall_s"] / run["wall_s"], 2),
                 "cpu_speedup": round(base["cpu_s"] / run["cpu_s"], 2)}
        if variant != "fp32":
            agree = agreement(base["embedding"], run["embedding"], k=args.k)
            entry.update(mean_cosine=round(agree.mean_cosine, 5), p01_cosine=round(agree.p01_cosine, 5),
                         min_cosine=round(agree.min_cosine, 5), nn_overlap=round(agree.nn_overlap, 3),
                         passes_gate=agree.passes(args.gate))
        report["variants"][variant] = entry
    return report


def build_runners(model: str, schemes: list[str]) -> dict[str, BatchRunner]:
    handlers = {"fp32": get_handler(model)}
    handlers.update({scheme: quantized(get_handler(model), scheme) for scheme in schemes})
    runners = {name: BatchRunner(h, device="cpu", precision="fp32") for name, h in handlers.items()}
    for runner in runners.values():
        runner.load()
    return runners


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(110, Console().width))
    for name, result in report["corpora"].items():
        table = Table(title=f"{name}: {result['rows']} rows, {result['words_mean']} words/row on average "
                            f"(max {result['words_max']}), gate {report['config']['gate']}")
        for column in ("variant", "rows/s", "x fp32", "x fp32 (cpu)", "mean cos", "p1 cos", "min cos",
                       f"top-{report['config']['k']} NN", "gate"):
            table.add_column(column, justify="left" if column == "variant" else "right")
        for variant, v in result["variants"].items():
            gate = "" if variant == "fp32" else ("passes" if v["passes_gate"] else "REFUSED")
            cells = [v.get(key, "") for key in ("mean_cosine", "p01_cosine", "min_cosine", "nn_overlap")]
            table.add_row(variant, f"{v['rows_per_s']:.1f}", f"{v['speedup']:.2f}", f"{v['cpu_speedup']:.2f}",
                          *map(str, cells), gate)
        console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm", help="any name get_handler takes (an st:PATH folder too)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, of: {', '.join(SCHEMES)}")
    ap.add_argument("--corpora", default=",".join(CORPORA), help=f"comma-separated, of: {', '.join(CORPORA)}")
    ap.add_argument("--rows", type=int, default=500, help="rows per corpus (speed and agreement)")
    ap.add_argument("--batch-rows", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=10, help="nearest neighbours compared per row")
    ap.add_argument("--gate", type=float, default=0.98, help="agreement a variant must reach")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.corpora = [c for c in args.corpora.split(",") if c]
    bad = [s for s in args.schemes if s not in SCHEMES] + [c for c in args.corpora if c not in CORPORA]
    if bad:
        ap.error(f"unknown scheme or corpus {bad[0]!r}: schemes {', '.join(SCHEMES)}; corpora {', '.join(CORPORA)}")
    if args.rows <= args.k:
        ap.error(f"--rows must exceed --k ({args.k}) for the neighbour overlap")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    runners = build_runners(args.model, args.schemes)
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    config = {"model": args.model, "schemes": args.schemes, "rows": args.rows, "batch_rows": args.batch_rows,
              "torch_threads": args.torch_threads, "k": args.k, "gate": args.gate, "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_bf16": any(f in cpu.split() for f in ("avx512_bf16", "amx_bf16"))}
    report = {"config": config, "corpora": {name: measure(args, name, runners) for name in args.corpora}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_tables(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
