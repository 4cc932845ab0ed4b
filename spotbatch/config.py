"""Settings: CLI flags > env ``SPOTBATCH_*`` > a YAML file > defaults.

The YAML file is named by ``--config`` or env ``SPOTBATCH_CONFIG``; its keys are the
field names below, and an unknown key is an error (a typo must not silently fall back
to a default). Units are in the names.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

__all__ = ["Settings", "load_settings", "ConfigError", "flag_for"]

PENDING_BATCHES = 8  # the default backlog: enough closed batches to keep a fast model fed

_yaml_path: ContextVar[str | None] = ContextVar("spotbatch_yaml_path", default=None)


class ConfigError(ValueError):
    """Bad settings; the message is one line that names the key and the fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPOTBATCH_", extra="forbid")

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    topic: str = "spotbatch.jobs"
    group: str = "spotbatch-workers"
    # Tansu joins a group in about session_timeout/2; 10 s is Kafka's classic default.
    session_timeout_ms: int = Field(10_000, ge=1_000)
    max_poll_interval_ms: int = Field(300_000, ge=10_000)
    # Must exceed the largest job message (FACTS: a smaller one stalls the partition).
    # "auto": leave the group on a clean stop, except on Tansu (see Worker._should_leave).
    leave_group: Literal["auto", "always", "never"] = "auto"
    max_partition_fetch_bytes: int = Field(16 * 1024 * 1024, ge=1024 * 1024)
    # Kafka security (kafka-python's names; see spotbatch.kafka_security.client_options).
    # With a non-SASL protocol the SASL username/password are ignored (a shared Secret
    # may feed them to every pod).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None  # CA bundle (PEM) that signed the brokers' certificates
    kafka_ssl_certfile: str | None = None  # client certificate (PEM), for mutual TLS
    kafka_ssl_keyfile: str | None = None  # its private key (PEM), if not inside the certfile

    # Model and batching
    model: str = "minilm"
    # Models other fleets serve from this same topic, each fleet in its own consumer group:
    # their jobs are committed past here, untouched (no output, no dead letter, no status).
    skip_models: Annotated[list[str], NoDecode] = []
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    torch_threads: int | None = Field(None, ge=1)
    max_batch_rows: int = Field(64, ge=1)
    max_wait_ms: int = Field(50, ge=0)
    # Rows accepted but not yet inferred; above this the worker pauses its partitions.
    # Unset: PENDING_BATCHES batches (at least 4096 rows), so a batch can always fill.
    max_pending_rows: int | None = Field(None, ge=1)

    # Outputs: jobs may only write under this prefix (local folder or s3://bucket/prefix).
    output: str = "./spotbatch-output"

    # Inputs: URI jobs may only read under these prefixes; none means URI jobs are refused.
    # Env SPOTBATCH_INPUT_PREFIXES is comma-separated; YAML takes a list.
    input_prefixes: Annotated[list[str], NoDecode] = []
    # JSONL and Parquet inputs stream part by part at any size; these bound one job's cost.
    max_line_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # one JSONL record
    max_document_bytes: int = Field(256 * 1024 * 1024, ge=1)  # a .json array, the one format read whole
    input_read_timeout_s: float = Field(120.0, gt=0)  # one count or one part read; then input_timeout

    # Checkpoints (URI jobs run in parts; each durable part is checkpointed)
    checkpoint_uri: str | None = None  # default: <output>/_checkpoints
    checkpoint_interval: str = "auto"  # "<N>rows", "<N>s", or "auto" (Young's formula)
    mtbi_s: float = Field(6 * 3600.0, gt=0)  # mean time between interruptions, for "auto"
    max_attempts: int = Field(3, ge=1)  # attempts that finish no part before the DLQ

    # Preemption
    # "signal" (SIGTERM/SIGINT, what Kubernetes sends on a node drain) needs no network;
    # "auto" also polls the cloud metadata endpoint that answers (AWS, GCP, Azure).
    notice_source: Literal["auto", "aws", "gcp", "azure", "signal", "none"] = "signal"
    notice_poll_s: float | None = Field(None, gt=0)  # default: each provider's advice (AWS 5 s)
    drain_s: float = Field(25.0, gt=0)  # FACTS: design for 25 s (GCP gives 30, AWS 120)
    # After an AWS rebalance recommendation: checkpoint every batch, and for this long
    # leave large (URI) jobs to owners at lower risk. The interruption may never come.
    rebalance_hold_s: float = Field(300.0, ge=0)
    usage_topic: str = "spotbatch.usage"
    models_topic: str = "spotbatch.models"  # the model registry (compacted); rollouts keep their state here too

    # Usage ledger (the scheduler's cost report); set per pool by the Deployment
    pool: Literal["spot", "on-demand", "unknown"] = "unknown"
    instance_type: str = "local"
    gpu_count: int = Field(0, ge=0)
    usage_interval_s: float = Field(60.0, gt=0)  # a usage record every N seconds, and one at exit

    # Local autoscaler (`spotbatch scale-local`): KEDA's lagThreshold and cooldownPeriod
    scale_min_replicas: int = Field(0, ge=0)
    scale_max_replicas: int = Field(4, ge=1)
    scale_lag_threshold: int = Field(10, ge=1)
    scale_cooldown_s: float = Field(30.0, ge=0)  # no unconsumed record this long -> zero
    scale_poll_s: float = Field(1.0, gt=0)

    # Operations
    metrics_port: int = Field(0, ge=0, le=65535)
    # A worker that cannot reach Kafka for this long (at start, or mid-run) exits 1 with one line.
    broker_wait_s: float = Field(60.0, gt=0)

    @field_validator("input_prefixes", "skip_models", mode="before")
    @classmethod
    def _split_prefixes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("input_prefixes")
    @classmethod
    def _check_prefixes(cls, value: list[str]) -> list[str]:
        from spotbatch.storage import parse_uri

        for prefix in value:
            try:
                parse_uri(prefix)
            except ValueError as exc:
                raise ValueError(f"input prefix {prefix!r}: {exc}; use a folder or s3://bucket/prefix/") from None
        return value

    @model_validator(mode="after")
    def _derive_pending(self) -> "Settings":
        if self.max_pending_rows is None:
            self.max_pending_rows = max(PENDING_BATCHES * self.max_batch_rows, 4096)
        elif self.max_pending_rows < self.max_batch_rows:
            # Below one batch, a batch never fills: every one closes on max_wait_ms.
            raise ValueError(f"max_pending_rows ({self.max_pending_rows}) is below max_batch_rows "
                             f"({self.max_batch_rows}), so no batch could fill; raise it (env SPOTBATCH_MAX_PENDING_ROWS "
                             f"or YAML key max_pending_rows) or leave it unset (derived: {PENDING_BATCHES} batches)")
        return self

    @model_validator(mode="after")
    def _check_kafka_security(self) -> "Settings":
        protocol = self.kafka_security_protocol
        if protocol.startswith("SASL_"):
            missing = [k for k in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password")
                       if not getattr(self, k)]
            if missing:
                raise ValueError(f"kafka_security_protocol {protocol} needs {', '.join(missing)}; set "
                                 f"{', '.join('SPOTBATCH_' + k.upper() for k in missing)} (or use PLAINTEXT/SSL)")
        elif self.kafka_sasl_mechanism:
            raise ValueError(f"kafka_sasl_mechanism is set but kafka_security_protocol is {protocol}; "
                             "set SPOTBATCH_KAFKA_SECURITY_PROTOCOL to SASL_SSL or SASL_PLAINTEXT, or unset the mechanism")
        ssl_files = {k: getattr(self, k) for k in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")}
        given = [k for k, v in ssl_files.items() if v]
        if given and not protocol.endswith("SSL"):
            raise ValueError(f"{given[0]} is set but kafka_security_protocol is {protocol}; "
                             "set SPOTBATCH_KAFKA_SECURITY_PROTOCOL to SSL or SASL_SSL, or unset the file")
        if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
            raise ValueError("kafka_ssl_keyfile needs kafka_ssl_certfile (the client certificate it belongs to); "
                             "set SPOTBATCH_KAFKA_SSL_CERTFILE")
        for key in given:
            if not Path(ssl_files[key]).is_file():
                raise ValueError(f"{key} {ssl_files[key]} does not exist; point SPOTBATCH_{key.upper()} "
                                 "at a readable PEM file (or unset it)")
        return self

    def checkpoint_location(self) -> str:
        from spotbatch.storage import join_uri  # storage imports boto3; keep config light

        return self.checkpoint_uri or join_uri(self.output, "_checkpoints")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_path.get()
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def load_settings(config: str | Path | None = None, **flags: Any) -> Settings:
    """Build settings; ``flags`` set to None are "not given" and fall through."""
    path = str(config) if config is not None else os.environ.get("SPOTBATCH_CONFIG") or None
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config (or SPOTBATCH_CONFIG)")
    token = _yaml_path.set(path)
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, flags)) from None
    except (yaml.YAMLError, TypeError, ValueError) as exc:  # unparsable file, or not a mapping
        raise ConfigError(f"config file {path} is not a YAML mapping of settings: {str(exc).splitlines()[0]}") from None
    finally:
        _yaml_path.reset(token)


# Flags whose name is not the setting's with dashes (list settings take one value per flag).
_FLAGS = {"input_prefixes": "input-prefix", "skip_models": "skip-model", "kafka_bootstrap": "bootstrap"}


def flag_for(key: str) -> str:
    """The CLI flag of setting ``key`` on the verbs that have one."""
    return "--" + _FLAGS.get(key, key.replace("_", "-"))


def _one_line(exc: ValidationError, flags: Any = ()) -> str:
    """One line naming the setting and only the ways this verb can set it: its flag
    (``flags``: the settings the verb has flags for), the env var, the YAML key."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if not key:  # a cross-field check: its message names the keys and the fix
        return str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown setting {key!r}; valid keys: {', '.join(sorted(Settings.model_fields))}"
    ways = ([f"flag {flag_for(key)}"] if key in flags else []) + [f"env SPOTBATCH_{key.upper()}",
                                                                  f"YAML key {key}"]
    return f"setting {key!r}: {err['msg']} ({', '.join(ways[:-1])} or {ways[-1]})"
