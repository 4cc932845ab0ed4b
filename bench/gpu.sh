#!/usr/bin/env bash
# The GPU check of issue 10, in one run of under 5 minutes on one lent GPU (an H200 here):
#
#   1. bench/worker_core.py --device cuda --json: raw loop and pipeline rows/s for minilm on
#      both corpora (and the tiny / bare-consumer figures), while nvidia-smi samples the GPU
#      every 200 ms; GPU utilisation is reported over each pipeline phase's own interval
#      (the worker's assigned -> committed, window_wall_s in the JSON) and over the whole run.
#   2. a real CUDA out-of-memory: minilm in BatchRunner(device="cuda") under
#      torch.cuda.set_per_process_memory_fraction (model + OOM_HEADROOM_MB), one batch of
#      OOM_ROWS long paragraphs; the runner must log "out of memory on N rows, retrying as
#      a + b" and its outputs must match the same rows run unsplit in chunks of 32 that fit
#      (every row's cosine > 0.999).
#
# Run from anywhere:  bash bench/gpu.sh        (results also go to $OUT/gpu.json when $OUT is set)
# Env: PYTHON (default .venv/bin/python; the venv is created when missing), TORCH_SPEC
# (torch==2.13.0, the Makefile's), GPU_BENCH_ARGS (appended to worker_core.py's arguments),
# OOM_ROWS (4096), OOM_HEADROOM_MB (512), GPU_INDEX (0, the GPU nvidia-smi samples).
# Exit: 0 when everything ran and the OOM check held (worker_core's targets are CPU-machine
# targets, reported, never enforced); 1 when a step failed; 2 when there is no usable GPU.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
die() { echo "bench/gpu.sh: $1" >&2; exit "${2:-1}"; }  # one line, then exit (1, or $2)

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  die "no NVIDIA GPU here (nvidia-smi missing or lists no GPU); run this on a GPU machine" 2
fi

PY="${PYTHON:-.venv/bin/python}"
if [ -z "${PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
  # what `make setup` does (Makefile), with the CUDA build of torch that PyPI serves on Linux
  echo "bench/gpu.sh: no .venv; creating it (python3 -m venv .venv; pip install ${TORCH_SPEC:-torch==2.13.0} -e '.[test]')" >&2
  python3 -m venv .venv || die "python3 -m venv .venv failed"
  .venv/bin/python -m pip install -q --upgrade pip || die "pip upgrade failed (no network?)"
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" || die "installing ${TORCH_SPEC:-torch==2.13.0} failed (no network?)"
  .venv/bin/python -m pip install -q -e '.[test]' || die "pip install -e '.[test]' failed (no network?)"
fi
[ -x "$PY" ] || die "$PY is not an executable python"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
  || die "torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -n 1) in $PY sees no CUDA device (a CPU build? remove .venv or set PYTHON)" 2

if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; RES="$OUT"; else RES="$(mktemp -d /tmp/spotbatch-gpu-XXXXXX)"; fi
SMI_PID=""
trap '[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null || true' EXIT

# ---- 1. worker_core on the GPU, with nvidia-smi sampling ------------------------------------
# Sizes for ~2-3 minutes on an H200 (hard limit 240 s): tiny at the issue's 60,000 rows,
# paragraphs four times over (7,904 rows: the 1,976 repeated with new ids), 32,000 demo rows.
nvidia-smi -i "${GPU_INDEX:-0}" --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
  -lms 200 > "$RES/nvidia_smi.csv" 2>"$RES/nvidia_smi.err" &
SMI_PID=$!
echo "bench/gpu.sh: worker_core.py --device cuda (results in $RES)" >&2
rc=0
# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of words on purpose
timeout 240 "$PY" bench/worker_core.py --device cuda --json --rows 60000 --paragraph-rows 7904 --demo-rows 32000 \
  --consumer-passes 3 --timeout-s 120 ${GPU_BENCH_ARGS:-} > "$RES/worker_core.json" 2> "$RES/worker_core.err" || rc=$?
kill "$SMI_PID" 2>/dev/null || true
wait "$SMI_PID" 2>/dev/null || true
SMI_PID=""
if [ "$rc" -ne 0 ]; then
  die "worker_core.py failed (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out after 240 s')): $(grep -v '^\s*$' "$RES/worker_core.err" | tail -n 1)" 1
fi

# ---- 2. a real CUDA OOM, split by the runner ------------------------------------------------
echo "bench/gpu.sh: OOM split (${OOM_ROWS:-4096} rows, model + ${OOM_HEADROOM_MB:-512} MiB)" >&2
rc=0
timeout 60 "$PY" - "$RES/oom.json" "${OOM_ROWS:-4096}" "${OOM_HEADROOM_MB:-512}" > "$RES/oom.out" 2>&1 <<'PY' || rc=$?
import gc
import json
import logging
import re
import sys
import time

import numpy as np
import torch

sys.path.insert(0, "bench")
from token_batching import paragraphs  # noqa: E402

from spotbatch.models import get_handler  # noqa: E402
from spotbatch.models.runner import BatchRunner  # noqa: E402

out_path, n_rows, headroom_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


cap = Capture()
runner_log = logging.getLogger("spotbatch.models.runner")
runner_log.addHandler(cap)
runner_log.setLevel(logging.WARNING)

# the 512 longest paragraphs (one batch pads to its longest row: 256 tokens, the truncation), repeated to n_rows
longest = sorted(paragraphs(), key=lambda r: -len(r["text"]))[:512]
texts = [longest[i % len(longest)]["text"] for i in range(n_rows)]
handler = get_handler("minilm")
runner = BatchRunner(handler, device="cuda")
runner.load()
params = handler.check_params({})
column = None


def run(values):
    global column
    outputs = runner.run(values, params)
    column = column or next(iter(outputs))
    return outputs[column]


# reference: the same rows in chunks of 32, no memory cap, no split
t0 = time.perf_counter()
reference = np.concatenate([run(texts[i:i + 32]) for i in range(0, n_rows, 32)])
reference_s = time.perf_counter() - t0
assert not cap.messages, f"the unsplit reference split: {cap.messages[:2]}"

torch.cuda.synchronize()
gc.collect()
torch.cuda.empty_cache()
total = torch.cuda.get_device_properties(0).total_memory
base = torch.cuda.memory_reserved()
cap_bytes = base + headroom_mb * 2**20
torch.cuda.set_per_process_memory_fraction(cap_bytes / total)
torch.cuda.reset_peak_memory_stats()
result = {"rows": n_rows, "headroom_mb": headroom_mb, "cap_mb": round(cap_bytes / 2**20, 1),
          "memory_fraction": cap_bytes / total, "reserved_before_mb": round(base / 2**20, 1),
          "reference_chunk_rows": 32, "reference_s": round(reference_s, 2)}
t0 = time.perf_counter()
try:
    split = run(texts)
    result["error"] = None
except Exception as exc:  # noqa: BLE001 - reported, then the check fails
    split = None
    result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
result["split_run_s"] = round(time.perf_counter() - t0, 2)
result["peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
torch.cuda.set_per_process_memory_fraction(1.0)

oom = [m for m in cap.messages if "out of memory on" in m]
pieces = [int(x) for m in oom for pair in re.findall(r"retrying as (\d+) \+ (\d+)", m) for x in pair]
result.update({"splits": len(oom), "first_message": oom[0] if oom else None,
               "smallest_piece_rows": min(pieces) if pieces else None})
if split is not None:
    cos = (split * reference).sum(1) / (np.linalg.norm(split, axis=1) * np.linalg.norm(reference, axis=1))
    result.update({"rows_out": int(len(split)), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())})
result["ok"] = bool(oom) and split is not None and len(split) == n_rows and result["min_cosine"] > 0.999
json.dump(result, open(out_path, "w"))
print(json.dumps(result))
PY
if [ "$rc" -ne 0 ]; then
  die "the OOM check crashed (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out')): $(grep -v '^\s*$' "$RES/oom.out" | tail -n 1)" 1
fi

# ---- summary: print, and write gpu.json ------------------------------------------------------
"$PY" - "$RES" <<'PY'
import json
import sys
from datetime import datetime
from pathlib import Path

res = Path(sys.argv[1])
core = json.loads((res / "worker_core.json").read_text())
oom = json.loads((res / "oom.json").read_text())
samples = []  # (unix time, util %, memory MiB)
for line in (res / "nvidia_smi.csv").read_text().splitlines():
    try:
        ts, util, mem = (x.strip() for x in line.split(","))
        samples.append((datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(util), float(mem)))
    except ValueError:
        continue  # a header, an [N/A], a half-written last line


def gpu(windows):
    inside = [s for s in samples if any(w and w[0] <= s[0] <= w[1] for w in windows)]
    if not inside:
        return {"samples": 0, "util_mean_pct": None, "util_max_pct": None, "mem_max_mib": None}
    utils = [s[1] for s in inside]
    return {"samples": len(inside), "util_mean_pct": round(sum(utils) / len(utils), 1),
            "util_max_pct": max(utils), "mem_max_mib": max(s[2] for s in inside)}


def fmt(g):
    if not g["samples"]:
        return "GPU util: no nvidia-smi sample inside the interval"
    return f"GPU util mean {g['util_mean_pct']}% max {g['util_max_pct']:.0f}% ({g['samples']} samples, mem max {g['mem_max_mib']:.0f} MiB)"


summary = {"minilm": {}, "tiny": {}, "gpu_util_whole_run": gpu([[-1e18, 1e18]])}
mini = core.get("minilm") or {}
windows = []
for name in ("paragraphs", "demo"):
    c = mini.get(name)
    if not c:
        continue
    g = gpu([c.get("window_wall_s")])
    windows.append(c.get("window_wall_s"))
    summary["minilm"][name] = {k: c[k] for k in ("rows", "raw_arrival_rows_per_s", "raw_sorted_rows_per_s",
                                                 "pipeline_rows_per_s", "efficiency", "efficiency_vs_sorted",
                                                 "peak_rss_mb")} | {"gpu": g}
    print(f"minilm {name:10s} ({c['rows']} rows): raw arrival {c['raw_arrival_rows_per_s']:,.1f} rows/s, raw sorted "
          f"{c['raw_sorted_rows_per_s']:,.1f}, pipeline {c['pipeline_rows_per_s']:,.1f} (x{c['efficiency']:.2f} of "
          f"arrival); {fmt(g)}")
summary["gpu_util_minilm_pipeline"] = gpu(windows)
if windows:
    print(f"minilm pipeline runs together: {fmt(summary['gpu_util_minilm_pipeline'])}")
for n, p in ((core.get("tiny") or {}).get("rows_per_job") or {}).items():
    g = gpu([p.get("window_wall_s")])
    summary["tiny"][n] = {"rows_per_s": p["rows_per_s"], "vs_raw": p["vs_raw"], "peak_rss_mb": p["peak_rss_mb"], "gpu": g}
    print(f"tiny {n:>4} rows/job: pipeline {p['rows_per_s']:,.0f} rows/s (x{p['vs_raw']:.3f} of the raw tiny loop "
          f"{core['tiny']['raw']['rows_per_s']:,.0f}); {fmt(g)}")
bc = core.get("bare_consumer") or {}
if bc.get("records_per_s"):
    print(f"bare consumer: {bc['records_per_s']:,.0f} records/s (C crc32c {bc['crc32c_c']})")
print(f"whole worker_core run: {fmt(summary['gpu_util_whole_run'])}")
if oom.get("splits"):
    print(f"OOM split: {oom['rows']} rows under a {oom['cap_mb']:.0f} MiB cap: the runner split {oom['splits']} times "
          f"(first: \"{oom['first_message']}\"; smallest piece {oom['smallest_piece_rows']} rows)")
else:
    print(f"OOM split: NO out-of-memory split logged for {oom['rows']} rows under {oom['cap_mb']:.0f} MiB "
          f"(raise OOM_ROWS or lower OOM_HEADROOM_MB)")
if oom.get("error"):
    print(f"OOM split: the split run failed: {oom['error']}")
if "min_cosine" in oom:
    print(f"OOM split: outputs vs unsplit chunks of 32: min cosine {oom['min_cosine']:.6f} "
          f"({'> 0.999: ok' if oom['min_cosine'] > 0.999 else '<= 0.999: MISMATCH'})")
print(f"OOM check: {'ok' if oom['ok'] else 'FAILED'}")
report = {"summary": summary, "oom": oom, "worker_core": core, "nvidia_smi_samples": len(samples)}
(res / "gpu.json").write_text(json.dumps(report))
print(f"wrote {res / 'gpu.json'}")
sys.exit(0 if oom["ok"] else 1)
PY
