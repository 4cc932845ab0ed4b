"""Turning one Kafka record into a batchable job, or a JobError that names why not."""

from __future__ import annotations

from typing import Any, cast

from spotbatch.errors import JobError
from spotbatch.input_access import InputPolicy
from spotbatch.inputs import InputLimits, RowReader, open_input
from spotbatch.jobs import InlineInputs, Job, UriInputs
from spotbatch.models.base import ModelHandler
from spotbatch.workers.batcher import PendingJob
from spotbatch.workers.parts import PartFeed, PartPlanner
from spotbatch.workers.sinks import ParquetSink

__all__ = ["Intake"]


class Intake:
    """Checks a parsed job against this worker (model, output prefix, params, rows).

    ``needs_io`` tells the owner thread whether ``build`` reads a file, so that it
    can run it on the I/O pool instead of stalling the consumer loop.
    """

    def __init__(self, handler: ModelHandler, sink: ParquetSink, planner: PartPlanner, *,
                 aliases: tuple[str, ...] = (), inputs: InputPolicy | None = None,
                 limits: InputLimits | None = None) -> None:
        self._handler = handler
        self._sink = sink
        self._inputs = inputs or InputPolicy(())  # none: URI jobs are refused
        self._limits = limits or InputLimits()
        self._planner = planner
        # The name the operator configured ("torchscript:./m.pt") and the handler's own.
        self._names = {handler.name, *aliases}

    @staticmethod
    def needs_io(job: Job) -> bool:
        return not isinstance(job.inputs, InlineInputs)

    def check(self, job: Job) -> tuple[str, dict[str, Any]]:
        """Cheap checks done before any I/O: model, params, output location."""
        if job.model not in self._names:
            raise _not_ours(job.model, self._handler.name)
        try:
            params = self._handler.check_params(job.params)
        except ValueError as exc:
            raise JobError("invalid_job", f"params: {exc}") from None
        return self._sink.output_uri(job.job_id, job.output), params

    def output_of(self, job: Job) -> str:
        """Where the job's result lives: its Parquet file, or the folder of its parts."""
        if self.needs_io(job):
            return self._sink.folder_uri(job.job_id, job.output)
        return self._sink.output_uri(job.job_id, job.output)

    def build(self, job: Job, record: Any, epoch: int, *, lookup: bool = True) -> list[PendingJob] | PartFeed:
        """The job's work: one unit for an inline job, the feed of its unfinished parts
        for a URI job.

        Runs on the I/O pool (an inline job with ``lookup=False`` does no I/O). An empty list means the job is already complete: a
        redelivered job whose output a previous owner made durable but could not commit
        (killed first, or held back by an unfinished job earlier in the partition).
        Job ids name outputs, so an existing output is this job's result.
        """
        output_uri, params = self.check(job)
        if self.needs_io(job):
            return self._feed(job, record, params, epoch) or []
        if lookup and self._sink.exists(output_uri):  # lookup=False: no owner took it up before
            return []
        ids, values = self._inline_rows(job)
        self.check_rows(ids, values)
        return [PendingJob(job, record, ids, values, output_uri, params, epoch=epoch)]

    def check_rows(self, ids: list[str], values: list[Any]) -> None:
        rows_ok = getattr(self._handler, "rows_ok", None)
        if rows_ok is not None and rows_ok(values):
            return
        for row_id, value in zip(ids, values):
            try:
                self._handler.check_row(value)
            except ValueError as exc:
                raise JobError("row_rejected", f"row {row_id!r}: {exc}") from None

    def _feed(self, job: Job, record: Any, params: dict, epoch: int) -> PartFeed | None:
        reader = self._open(job)
        try:
            rows = reader.count()
            if not rows:
                raise JobError("input_invalid", f"{cast(UriInputs, job.inputs).uri} has no rows")
            feed = self._planner.plan(job, record, reader, rows, params, epoch, self.check_rows)
        except BaseException:
            reader.close()
            raise
        if feed is None:
            reader.close()
        return feed

    def _open(self, job: Job) -> RowReader:
        inputs = cast(UriInputs, job.inputs)  # needs_io(job): a URI job
        uri = self._inputs.resolve(inputs.uri)  # before any byte is read
        return open_input(uri, id_column=inputs.id_column, input_column=inputs.input_column or self._handler.input_column,
                          limits=self._limits)

    def _inline_rows(self, job: Job) -> tuple[list[str], list[Any]]:
        column, rows = self._handler.input_column, cast(InlineInputs, job.inputs).rows
        try:
            values = [row[column] for row in rows]
        except KeyError:
            i = next(i for i, row in enumerate(rows) if column not in row)
            raise JobError("invalid_job", f"inputs.rows.{i}: missing the model's input column {column!r}") from None
        return [row["id"] for row in rows], values


def _not_ours(model: str, served: str) -> JobError:
    """A model some fleet could serve is ``model_not_served`` (redrivable); a name no
    handler takes is ``unknown_model`` (a typo: fix the job). Decided from the name
    alone: a user model's path is not looked at, so a job learns nothing of our disk."""
    from spotbatch.models import USER_PREFIXES, available

    prefix, sep, path = model.partition(":")
    if model in available() or (sep and prefix in USER_PREFIXES and path):
        return JobError("model_not_served", f"model {model!r}: this worker serves {served!r}; run a fleet for it "
                        "(its own group; --skip-model here) and redrive: spotbatch dlq redrive --code model_not_served")
    choices = ", ".join(available() + [f"{p}:PATH" for p in USER_PREFIXES])
    return JobError("unknown_model", f"model {model!r} names no model handler (choose one of: {choices}); "
                    f"this worker serves {served!r}")
