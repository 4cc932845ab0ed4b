"""``spotbatch lag``, ``spotbatch scaler serve`` and ``spotbatch scale-local``.

Keep imports of heavy modules (grpc, kafka) inside the command bodies: ``spotbatch
--help`` must stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import typer

from spotbatch.cli.common import BootstrapOpt, ConfigOpt, fail, load_or_exit, option_group, setup_logging
from spotbatch.cli.worker import SCALE_LOCAL_WORKER_OPTIONS, settings_flags
from spotbatch.kafka_security import client_options

__all__ = ["register"]

scaler_app = typer.Typer(no_args_is_help=True, help="KEDA external scaler.")


def register(app: typer.Typer) -> None:
    """Attach this module's verbs to the main app."""
    app.add_typer(scaler_app, name="scaler")
    app.command("scale-local")(scale_local)
    app.command("lag")(lag)
    scaler_app.command("serve")(serve)


@option_group(SCALE_LOCAL_WORKER_OPTIONS, into="worker_options")
def scale_local(
    worker_options: dict,
    min_replicas: Optional[int] = typer.Option(None, "--min", "--scale-min-replicas", help="Fewest workers (0 = scale to zero). Default 0 [env SPOTBATCH_SCALE_MIN_REPLICAS]."),
    max_replicas: Optional[int] = typer.Option(None, "--max", "--scale-max-replicas", help="Most workers. Default 4 [env SPOTBATCH_SCALE_MAX_REPLICAS]."),
    lag_threshold: Optional[int] = typer.Option(None, "--lag-threshold", "--scale-lag-threshold", help="Records of lag per worker (KEDA lagThreshold). Default 10 [env SPOTBATCH_SCALE_LAG_THRESHOLD]."),
    cooldown_s: Optional[float] = typer.Option(None, "--cooldown-s", "--scale-cooldown-s", help="Seconds with no unconsumed record before scaling to zero; also the scale-in window. Default 30 [env SPOTBATCH_SCALE_COOLDOWN_S]."),
    poll_s: Optional[float] = typer.Option(None, "--poll-s", "--scale-poll-s", help="Seconds between lag polls. Default 1 [env SPOTBATCH_SCALE_POLL_S]."),
    log_dir: Optional[Path] = typer.Option(None, help="Write each worker's log to DIR/worker-<n>.log (default: this stderr)."),
    once: bool = typer.Option(False, "--once", help="Exit once the backlog is done and the cooldown has passed."),
    as_json: bool = typer.Option(False, "--json", help="Print the report (events, replicas over time) as JSON on exit."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML settings file [env SPOTBATCH_CONFIG]; workers get it too."),
) -> None:
    """Run `spotbatch worker` processes between --min and --max from the group's lag (KEDA + HPA rules).

    The worker settings given here reach every worker as SPOTBATCH_* environment (with
    --config as SPOTBATCH_CONFIG), never as a rebuilt command line."""
    flags = settings_flags(worker_options)
    settings = load_or_exit(config, scale_min_replicas=min_replicas, scale_max_replicas=max_replicas,
                            scale_lag_threshold=lag_threshold, scale_cooldown_s=cooldown_s, scale_poll_s=poll_s,
                            **flags)
    setup_logging()
    from spotbatch.scaler.local import SCALE_ACTIONS, run_scale_local, worker_env

    given = {"kafka_bootstrap", "topic", "group"} | {key for key, value in flags.items() if value is not None}
    try:
        report = run_scale_local(settings, worker_env=worker_env(settings, sorted(given), config=config),
                                 log_dir=log_dir, once=once)
    except ValueError as exc:  # bad --min/--max, unknown topic (LagError), crash loop
        fail(str(exc))
    except RuntimeError as exc:
        fail(str(exc), code=1)
    if as_json:
        print(report.to_json())
    else:
        typer.echo(f"scale-local: {report.workers_started} workers started, at most {report.max_replicas} at once, "
                   f"{sum(e['event'] in SCALE_ACTIONS for e in report.scale_events)} scale events in {report.seconds:.0f}s",
                   err=True)


def _offset_reset_policy(text: str) -> Literal["latest", "earliest"]:
    """--offset-reset-policy as LagOptions takes it; LagError, worded as LagOptions words it, if neither."""
    from spotbatch.scaler.lag import LagError

    if text == "latest":
        return "latest"
    if text == "earliest":
        return "earliest"
    raise LagError(f"offsetResetPolicy must be latest or earliest, got {text!r}")


def lag(
    group: str = typer.Option(..., "--group", help="Consumer group to measure."),
    topic: Optional[str] = typer.Option(None, "--topic", help="Topic (default: every topic the group has committed offsets for)."),
    bootstrap: Optional[str] = BootstrapOpt,
    lag_threshold: int = typer.Option(10, "--lag-threshold", help="KEDA lagThreshold: records per replica."),
    activation_lag_threshold: int = typer.Option(0, "--activation-lag-threshold", help="KEDA activationLagThreshold."),
    offset_reset_policy: str = typer.Option("latest", "--offset-reset-policy", help="KEDA offsetResetPolicy: latest or earliest."),
    allow_idle_consumers: bool = typer.Option(False, "--allow-idle-consumers", help="No partition cap on replicas."),
    min_replicas: int = typer.Option(0, "--min-replicas", help="ScaledObject minReplicaCount."),
    max_replicas: int = typer.Option(100, "--max-replicas", help="ScaledObject maxReplicaCount."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """A consumer group's lag as KEDA's kafka trigger sees it, and the replicas it would want.

    Per partition: committed offset, true log end, lag; then the total, whether the
    trigger is active, and the replicas KEDA + the HPA would ask for."""
    from spotbatch.scaler.lag import LagError, LagOptions

    settings = load_or_exit(config, kafka_bootstrap=bootstrap)
    try:
        options = LagOptions(lag_threshold=lag_threshold, activation_lag_threshold=activation_lag_threshold,
                             offset_reset_policy=_offset_reset_policy(offset_reset_policy),
                             allow_idle_consumers=allow_idle_consumers)
        report = _lag_report(settings.kafka_bootstrap, group, topic, options, min_replicas, max_replicas,
                             client_options=client_options(settings))
    except (LagError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(report))
    else:
        _print_lag(report)


def _lag_report(bootstrap: str, group: str, topic: Optional[str], options, min_replicas: int, max_replicas: int,
                *, client_options=None) -> dict:
    from kafka.errors import KafkaError

    from spotbatch.kafka_admin import OffsetReader
    from spotbatch.scaler import policy
    from spotbatch.scaler.lag import LagError, compute_lag, read_offsets

    bounds = policy.ReplicaBounds(min_replicas=min_replicas, max_replicas=max_replicas)
    try:
        reader = OffsetReader(bootstrap, client_options=client_options)
    except KafkaError as exc:
        raise LagError(f"cannot reach Kafka at {bootstrap} ({exc}); pass --bootstrap HOST:PORT") from None
    try:
        # A group that has committed nothing yet (workers not started, or still joining) is
        # what KEDA sees before the first commit: with --topic its backlog follows KEDA's
        # no-commit rule; without one there is no topic to measure (read_offsets says so).
        known = reader.group_known(group)
        if not known and topic is None:
            raise LagError(f"consumer group {group!r} is unknown on {bootstrap} (no member, no commit yet); "
                           "pass --topic to see its backlog by KEDA's no-commit rule, or check --group")
        committed, ends = read_offsets(reader, group, topic)
    finally:
        reader.close()
    result = compute_lag(committed, ends, options)
    metric = policy.lag_metric(result.total_lag, result.active, options.lag_threshold)
    return {"group": group, "topic": topic, "bootstrap": bootstrap, "lag_threshold": options.lag_threshold,
            "offset_reset_policy": options.offset_reset_policy, "group_known": known,
            **result.to_dict(), "replicas": policy.keda_replicas(metric, None, bounds)}


def _print_lag(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"group {report['group']}")
    for col in ("topic", "partition", "committed", "log end", "lag"):
        table.add_column(col, justify="left" if col == "topic" else "right")
    for p in report["partitions"]:
        committed = "-" if p["committed"] < 0 else str(p["committed"])
        table.add_row(p["topic"], str(p["partition"]), committed, str(p["log_end"]), str(p["lag"]))
    console = Console()
    console.print(table)
    console.print(f"total lag {report['total_lag']} (with persistent {report['total_lag_with_persistent']}), "
                  f"active {str(report['active']).lower()}, replicas {report['replicas']} "
                  f"(lagThreshold {report['lag_threshold']})", highlight=False)
    if not report.get("group_known", True):
        rule = ("each partition counts its whole log" if report["offset_reset_policy"] == "earliest"
                else "each partition counts 1 (--offset-reset-policy earliest counts the whole log)")
        console.print(f"group {report['group']} has committed nothing yet: KEDA's no-commit rule for "
                      f"offsetResetPolicy {report['offset_reset_policy']}: {rule}", highlight=False, markup=False)


def serve(
    port: int = typer.Option(9090, "--port", help="gRPC port (KEDA's scalerAddress)."),
    metrics_port: int = typer.Option(9091, "--metrics-port", help="HTTP /metrics and /healthz port."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
    bootstrap: Optional[str] = typer.Option(None, "--bootstrap", help="Default for triggers without bootstrapServers [env SPOTBATCH_KAFKA_BOOTSTRAP]."),
    cache_s: float = typer.Option(2.0, "--cache-s", min=0.0, help="Seconds a group's offsets are reused across calls."),
    checkpoint_uri: Optional[str] = typer.Option(None, "--checkpoint-uri", help="Checkpoint store, for work mode's rows done of URI jobs [env SPOTBATCH_CHECKPOINT_URI]."),
    pools: bool = typer.Option(False, "--pools", help="Serve triggers with `pool: spot|on-demand` their share (hybrid scheduler; reads the spot Deployment's status)."),
    namespace: str = typer.Option("spotbatch", "--namespace", help="With --pools: namespace of the worker Deployments."),
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", help="With --pools: kubeconfig file (default: in-cluster, else ~/.kube/config)."),
    call_timeout_s: float = typer.Option(3.0, "--call-timeout-s", min=0.1, help="Seconds one trigger's call waits for its Kafka; then its last answer (if any) or UNAVAILABLE."),
    stale_s: float = typer.Option(300.0, "--stale-s", min=0.0, help="Oldest last answer served while a trigger's Kafka fails."),
    max_groups: int = typer.Option(1024, "--max-groups", min=1, help="Groups/triggers whose state is kept (least recently used evicted)."),
    max_clusters: int = typer.Option(64, "--max-clusters", min=1, help="Kafka clusters kept connected (least recently used closed)."),
    allowed_bootstrap: Optional[list[str]] = typer.Option(None, "--allowed-bootstrap", help="host:port a trigger may name in bootstrapServers (repeatable; default: any). Others get PERMISSION_DENIED."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Serve KEDA's external scaler gRPC interface (plus gRPC health, /metrics, /healthz)."""
    import signal
    import threading

    from spotbatch.scaler.service import LagSource
    from spotbatch.scaler.service import serve as start

    settings = load_or_exit(config, kafka_bootstrap=bootstrap, checkpoint_uri=checkpoint_uri)
    setup_logging()
    checkpoints = None
    if settings.checkpoint_uri:
        from spotbatch.checkpointing import store_for_checkpoints

        checkpoints = store_for_checkpoints(settings.checkpoint_uri)
    splitter = None
    if pools:  # the hybrid scheduler's PoolSplitter
        from spotbatch.scheduler.splitter import live_splitter

        try:
            splitter = live_splitter(usage_topic=settings.usage_topic, default_bootstrap=bootstrap or settings.kafka_bootstrap,
                                     namespace=namespace, kubeconfig=kubeconfig,
                                     client_options=client_options(settings))
        except Exception as exc:  # noqa: BLE001 - kubernetes.config raises several types for one fix
            fail(f"--pools needs Kubernetes access ({exc}); run in-cluster or pass --kubeconfig FILE")
    source = LagSource(cache_s=cache_s, usage_topic=settings.usage_topic, checkpoints=checkpoints, splitter=splitter,
                       client_options=client_options(settings), call_timeout_s=call_timeout_s, stale_s=stale_s,
                       max_groups=max_groups, max_clusters=max_clusters, input_prefixes=settings.input_prefixes)
    try:
        server = start(port=port, metrics_port=metrics_port, host=host, source=source,
                       default_bootstrap=bootstrap or settings.kafka_bootstrap,
                       allowed_bootstrap=allowed_bootstrap or None)
    except OSError as exc:
        fail(f"{exc} (--port {port} / --metrics-port {metrics_port} must be free)")
    except ValueError as exc:  # a malformed --allowed-bootstrap
        fail(str(exc).replace("metadata bootstrapServers", "--allowed-bootstrap"))
    typer.echo(f"scaler serving gRPC on {host}:{server.port}, /metrics and /healthz on :{server.metrics_port}", err=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
