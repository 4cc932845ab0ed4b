"""Kafka security settings -> kafka-python client keyword arguments.

The one place that maps ``Settings.kafka_*`` security fields onto kafka-python 3.x's
``KafkaConsumer`` / ``KafkaProducer`` / ``KafkaAdminClient`` keywords. Callers that
build a client from a bootstrap string take ``client_options`` and splat it in.
"""

from __future__ import annotations

from typing import Any

__all__ = ["client_options"]


def client_options(settings: Any) -> dict[str, Any]:
    """kafka-python keyword args for ``settings`` (only those set).

    PLAINTEXT gives ``{}`` so default clients are built exactly as before. SASL
    credentials go out only with a SASL_* protocol; SSL files only with SSL/SASL_SSL.
    """
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password.get_secret_value() if password is not None else None,
        )
    if protocol.endswith("SSL"):
        options.update(ssl_cafile=settings.kafka_ssl_cafile, ssl_certfile=settings.kafka_ssl_certfile,
                       ssl_keyfile=settings.kafka_ssl_keyfile)
    return {k: v for k, v in options.items() if v is not None}
