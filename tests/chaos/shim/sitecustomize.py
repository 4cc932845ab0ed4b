"""Inference log for the chaos tests (imported by ``site`` at start-up of a worker
process whose PYTHONPATH begins with this folder; nothing else puts it on a path).

With ``SPOTBATCH_TEST_INFERENCE_LOG`` set to a file path, every call of
``BatchRunner.run`` appends one line per input row *before* the model runs:
``<monotonic seconds> <row key>``, where the row key is the text up to its first space
(the chaos tests start every text with ``<job_id>|<row_id>``). One ``os.write`` per
batch on an O_APPEND descriptor: a SIGKILL loses at most the batch being written, and
a batch is logged even if the process dies while computing it, so the log never
under-counts inference work. The worker itself is unchanged: this only wraps the
model call that the inference thread makes.
"""

import os

# With ``SPOTBATCH_CHAOS=<point>:<n>`` (e.g. ``after_write:3``), the worker is killed with
# SIGKILL the n-th time it reaches that point of its loop: the kill plan is installed on
# the product's hook point (spotbatch.chaos), which does nothing unless a test does this.
if os.environ.get("SPOTBATCH_CHAOS"):
    from spotbatch import chaos
    from spotbatch.testing.faults import KillAt

    chaos.install(KillAt.parse(os.environ["SPOTBATCH_CHAOS"]))

_PATH = os.environ.get("SPOTBATCH_TEST_INFERENCE_LOG")

if _PATH:
    import time

    from spotbatch.models.runner import BatchRunner

    _fd = os.open(_PATH, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _run = BatchRunner.run

    def _logged_run(self, values, params):
        now = f"{time.monotonic():.6f}"
        keys = [v.split(" ", 1)[0] if isinstance(v, str) else "?" for v in values]
        os.write(_fd, "".join(f"{now} {k}\n" for k in keys).encode())
        return _run(self, values, params)

    BatchRunner.run = _logged_run

# With ``SPOTBATCH_TEST_POLL_FAULT=1``, ``KafkaConsumer.poll`` raises one retriable
# ``KafkaConnectionError`` (as kafka-python 3.0.12 does when a metadata refresh fails
# during a coordinator lookup while the broker is unreachable), on the first call after
# a poll that returned records: the worker is then mid-work, as in a real outage.
if os.environ.get("SPOTBATCH_TEST_POLL_FAULT") == "1":
    import kafka
    import kafka.errors

    _poll = kafka.KafkaConsumer.poll
    _state = {"armed": False, "fired": False}

    def _faulty_poll(self, *args, **kwargs):
        if _state["armed"] and not _state["fired"]:
            _state["fired"] = True
            raise kafka.errors.KafkaConnectionError("111 ECONNREFUSED (injected by the chaos tests)")
        records = _poll(self, *args, **kwargs)
        if records:
            _state["armed"] = True
        return records

    kafka.KafkaConsumer.poll = _faulty_poll

# With ``SPOTBATCH_TEST_FLUSH_FAULT=1``, ``KafkaProducer.flush`` raises the
# ``KafkaTimeoutError`` that kafka-python raises when records are still undelivered at
# the timeout (seen at the end of a drain after the broker connection was cut).
if os.environ.get("SPOTBATCH_TEST_FLUSH_FAULT") == "1":
    import kafka
    import kafka.errors

    def _faulty_flush(self, timeout=None):
        raise kafka.errors.KafkaTimeoutError("Timeout waiting for future (injected by the chaos tests)")

    kafka.KafkaProducer.flush = _faulty_flush

# With ``SPOTBATCH_TEST_SLOW_READ=<seconds>``, reading a URI job's input file takes that
# much longer (a large file on a slow store): jobs behind it in the partition are
# processed while it loads, so they become durable before it.
if os.environ.get("SPOTBATCH_TEST_SLOW_READ"):
    import time
    import spotbatch.workers.intake as _intake

    _delay_s = float(os.environ["SPOTBATCH_TEST_SLOW_READ"])
    _open_input = _intake.open_input

    def _slow_open_input(*args, **kwargs):
        time.sleep(_delay_s)
        return _open_input(*args, **kwargs)

    _intake.open_input = _slow_open_input

# With ``SPOTBATCH_TEST_KILL_ON=<prefix>``, a model call given a row whose text starts
# with the prefix SIGKILLs the worker before the model runs: what a native crash in the
# model or the kernel's OOM killer does, beyond any exception boundary.
if os.environ.get("SPOTBATCH_TEST_KILL_ON"):
    import signal

    from spotbatch.models.runner import BatchRunner

    _marker = os.environ["SPOTBATCH_TEST_KILL_ON"]
    _run_unkilled = BatchRunner.run

    def _killing_run(self, values, params):
        if any(isinstance(v, str) and v.startswith(_marker) for v in values):
            os.kill(os.getpid(), signal.SIGKILL)
        return _run_unkilled(self, values, params)

    BatchRunner.run = _killing_run
