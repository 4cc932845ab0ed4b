"""Settings: CLI flags > env ``SPOTBATCH_*`` > a YAML file > defaults.

The YAML file is named by ``--config`` or env ``SPOTBATCH_CONFIG``; its keys are the
field names below, flat or grouped under their section's name (``kafka:``, ``batching:``,
... see SECTIONS), and an unknown key is an error (a typo must not silently fall back
to a default). Units are in the names.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from typing_extensions import Self

import yaml
from pydantic import (AliasChoices, BaseModel, BeforeValidator, Field, PlainSerializer, SecretStr, TypeAdapter, ValidationError,
                      field_validator, model_validator)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from spotbatch.interval_spec import AUTO, IntervalSpec
from spotbatch.uris import join_uri, parse_uri

__all__ = ["Settings", "Environment", "load_settings", "env_setting", "ConfigError", "flag_for"]

PENDING_BATCHES = 8  # the default backlog: enough closed batches to keep a fast model fed

_yaml_path: ContextVar[str | None] = ContextVar("spotbatch_yaml_path", default=None)


class ConfigError(ValueError):
    """Bad settings; the message is one line that names the key and the fix."""


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):  # env: comma-separated; YAML and flags give a list
        value = [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


# The settings, in sections. Each is one YAML mapping (``kafka:``, ``batching:``, ...; see
# SECTIONS) or flat keys at the top; flags and SPOTBATCH_* environment stay flat.

class KafkaSection(BaseModel):
    """Brokers, topics, the consumer group and client security."""

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

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Self:
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


class BatchingSection(BaseModel):
    """The model a worker serves and how it batches rows."""

    model: str = "minilm"
    # Models other fleets serve from this same topic, each fleet in its own consumer group:
    # their jobs are committed past here, untouched (no output, no dead letter, no status).
    skip_models: CommaList = []
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    torch_threads: int | None = Field(None, ge=1)
    max_batch_rows: int = Field(256, ge=1)
    max_wait_ms: int = Field(50, ge=0)
    # Text models with a prepare stage (minilm, st:): a batch's padded tokens (longest row x
    # rows) stay within this, rows sorted by length; null: rows only. Others batch by rows.
    max_batch_tokens: int | None = Field(16384, ge=1)
    # Rows accepted but not yet inferred; above this the worker pauses its partitions.
    # Unset: PENDING_BATCHES batches (at least 16384 rows: a fast model eats 4096 in tens of
    # milliseconds, less than one owner turn), so a batch can always fill.
    max_pending_rows: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _derive_pending(self) -> Self:
        if self.max_pending_rows is None:
            self.max_pending_rows = max(PENDING_BATCHES * self.max_batch_rows, 16384)
        elif self.max_pending_rows < self.max_batch_rows:
            # Below one batch, a batch never fills: every one closes on max_wait_ms.
            raise ValueError(f"max_pending_rows ({self.max_pending_rows}) is below max_batch_rows "
                             f"({self.max_batch_rows}), so no batch could fill; raise it (env SPOTBATCH_MAX_PENDING_ROWS "
                             f"or YAML key max_pending_rows) or leave it unset (derived: {PENDING_BATCHES} batches)")
        return self


class IOSection(BaseModel):
    """Where outputs go, where inputs may come from, and what one input may cost."""

    # Outputs: jobs may only write under this prefix (local folder or s3://bucket/prefix).
    output: str = "./spotbatch-output"

    # Inputs: URI jobs may only read under these prefixes; none means URI jobs are refused.
    # Env SPOTBATCH_INPUT_PREFIXES is comma-separated; YAML takes a list.
    input_prefixes: CommaList = []
    # JSONL and Parquet inputs stream part by part at any size; these bound one job's cost.
    max_line_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # one JSONL record
    max_document_bytes: int = Field(256 * 1024 * 1024, ge=1)  # a .json array, the one format read whole
    input_read_timeout_s: float = Field(120.0, gt=0)  # one count or one part read; then input_timeout

    @field_validator("input_prefixes")
    @classmethod
    def _check_prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            try:
                parse_uri(prefix)
            except ValueError as exc:
                raise ValueError(f"input prefix {prefix!r}: {exc}; use a folder or s3://bucket/prefix/") from None
        return value


class CheckpointSection(BaseModel):
    """URI jobs run in parts; each durable part is checkpointed."""

    checkpoint_uri: str | None = None  # default: <output>/_checkpoints
    # "<N>rows", "<N>s", or "auto" (Young's formula); parsed here, so a bad one names its key.
    checkpoint_interval: Annotated[IntervalSpec, BeforeValidator(IntervalSpec.parse), PlainSerializer(str)] = AUTO
    mtbi_s: float = Field(6 * 3600.0, gt=0)  # mean time between interruptions, for "auto"
    max_attempts: int = Field(3, ge=1)  # attempts that finish no part before the DLQ


class PreemptionSection(BaseModel):
    """Spot notices and the drain they start."""

    # "signal" (SIGTERM/SIGINT, what Kubernetes sends on a node drain) needs no network;
    # "auto" also polls the cloud metadata endpoint that answers (AWS, GCP, Azure).
    notice_source: Literal["auto", "aws", "gcp", "azure", "signal", "none"] = "signal"
    notice_poll_s: float | None = Field(None, gt=0)  # default: each provider's advice (AWS 5 s)
    drain_s: float = Field(25.0, gt=0)  # FACTS: design for 25 s (GCP gives 30, AWS 120)
    # Metadata endpoints for the notice watchers; unset: the provider's own address. Tests and
    # the demo point them at a fake (spotbatch.testing).
    aws_metadata_url: str | None = None
    gcp_metadata_url: str | None = None
    azure_metadata_url: str | None = None
    # After an AWS rebalance recommendation: checkpoint every batch, and for this long
    # leave large (URI) jobs to owners at lower risk. The interruption may never come.
    rebalance_hold_s: float = Field(300.0, ge=0)


class UsageSection(BaseModel):
    """The usage ledger (the scheduler's cost report) and the model registry topic."""

    usage_topic: str = "spotbatch.usage"
    models_topic: str = "spotbatch.models"  # the model registry (compacted); rollouts keep their state here too
    # Set per pool by the Deployment
    pool: Literal["spot", "on-demand", "unknown"] = "unknown"
    instance_type: str = "local"
    gpu_count: int = Field(0, ge=0)
    usage_interval_s: float = Field(60.0, gt=0)  # a usage record every N seconds, and one at exit


class ScaleSection(BaseModel):
    """`spotbatch scale-local`: KEDA's lagThreshold and cooldownPeriod, on one machine."""

    scale_min_replicas: int = Field(0, ge=0)
    scale_max_replicas: int = Field(4, ge=1)
    scale_lag_threshold: int = Field(10, ge=1)
    scale_cooldown_s: float = Field(30.0, ge=0)  # no unconsumed record this long -> zero
    scale_poll_s: float = Field(1.0, gt=0)


class OpsSection(BaseModel):
    """Metrics, health and how long to wait for Kafka."""

    metrics_port: int = Field(0, ge=0, le=65535)
    # A worker that cannot reach Kafka for this long (at start, or mid-run) exits 1 with one line.
    broker_wait_s: float = Field(60.0, gt=0)


SECTIONS: dict[str, type[BaseModel]] = {
    "kafka": KafkaSection, "batching": BatchingSection, "io": IOSection, "checkpoints": CheckpointSection,
    "preemption": PreemptionSection, "usage": UsageSection, "scale": ScaleSection, "ops": OpsSection,
}


class Settings(KafkaSection, BatchingSection, IOSection, CheckpointSection, PreemptionSection, UsageSection,
               ScaleSection, OpsSection, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPOTBATCH_", extra="forbid")

    def checkpoint_location(self) -> str:
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
            sources.append(_SectionedYaml(settings_cls, yaml_file=path))
        return tuple(sources)


class _SectionedYaml(YamlConfigSettingsSource):
    """A YAML file of flat keys, or of section mappings (``kafka: {topic: ...}``), or both."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        doc = super()._read_file(file_path)
        if not isinstance(doc, dict):
            raise ValueError(f"its top level is a {type(doc).__name__}, not a mapping")
        flat = {k: v for k, v in doc.items() if not (k in SECTIONS and isinstance(v, dict))}
        for name, values in doc.items():
            if name not in SECTIONS or not isinstance(values, dict):
                continue
            fields = SECTIONS[name].model_fields
            for key, value in values.items():
                if key not in fields:
                    raise ValueError(f"{name}.{key} is not a setting of section {name!r}; "
                                     f"it holds {', '.join(fields)}")
                if key in flat:
                    raise ValueError(f"{key} is set twice, at the top and in section {name!r}; keep one")
                flat[key] = value
        return flat


class Environment(BaseSettings):
    """The variables spotbatch reads but other tools own (no SPOTBATCH_ prefix): the AWS SDK's
    S3 endpoint override and Kubernetes' in-cluster marker. Build one where the value is
    used, never at import, so a changed (or monkeypatched) environment is seen."""

    model_config = SettingsConfigDict(extra="ignore", env_ignore_empty=True)  # empty = unset, as `or` did

    # The S3-specific name first, as botocore resolves them.
    aws_endpoint_url: str | None = Field(default=None,
                                         validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"))
    kubernetes_service_host: str | None = Field(default=None, validation_alias="KUBERNETES_SERVICE_HOST")


def env_setting(key: str) -> Any:
    """Setting ``key`` from env ``SPOTBATCH_<KEY>`` alone, checked against its field's type
    and bounds; None when the variable is unset. For code that is handed no Settings
    (``watchers_for``, ``start_or_external``): one variable, without validating the rest."""
    field = Settings.model_fields[key]
    raw = EnvSettingsSource(Settings)()  # the SPOTBATCH_* variables Settings knows, not yet validated
    if key not in raw:
        return None
    # The field's bounds (ge=...) live in its metadata; Annotated re-attaches them.
    parts: Any = (field.annotation, *field.metadata)
    kind: Any = Annotated[parts] if field.metadata else field.annotation
    try:
        return TypeAdapter(kind).validate_python(raw[key])
    except ValidationError as exc:
        raise ConfigError(f"setting {key!r}: {exc.errors()[0]['msg']} (env SPOTBATCH_{key.upper()})") from None


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
        raise ConfigError(f"config file {path}: {str(exc).splitlines()[0]}; write a YAML mapping of settings "
                          "(flat keys, or sections such as `kafka:` and `batching:`)") from None
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
