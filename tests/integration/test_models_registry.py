"""The model registry on a real (embedded) broker, driven through the CLI as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from spotbatch.rollouts import Registry, digest_of_ref
from tests.integration.helpers import REPO_ROOT


def _cli(bootstrap: str, topic: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spotbatch", "models", *args, "--bootstrap", bootstrap,
                           "--models-topic", topic], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})  # a table narrower than this wraps its cells


def test_register_alias_list_show_round_trip(kafka_bootstrap, tmp_path):
    topic = f"models-{uuid.uuid4().hex[:8]}"
    model = tmp_path / "m.pt"
    model.write_bytes(b"not really torchscript, but files are what the digest covers")
    first = _cli(kafka_bootstrap, topic, "register", "embedder", "--version", "1", "--ref", "tiny", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["digest"] == digest_of_ref("tiny")
    second = _cli(kafka_bootstrap, topic, "register", "embedder", "--version", "2", "--ref", f"torchscript:{model}",
                  "--notes", "retrained")
    assert second.returncode == 0, second.stderr

    again = _cli(kafka_bootstrap, topic, "register", "embedder", "--version", "2", "--ref", "tiny")
    assert again.returncode == 2 and "immutable: register 3 instead" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    assert _cli(kafka_bootstrap, topic, "alias", "embedder", "challenger", "2").returncode == 0
    listed = json.loads(_cli(kafka_bootstrap, topic, "list", "--json").stdout)
    assert listed == [{"name": "embedder", "versions": [1, 2], "aliases": {"challenger": 2, "champion": 1}}]

    shown = json.loads(_cli(kafka_bootstrap, topic, "show", "embedder", "--json").stdout)
    v2 = shown["versions"][1]
    assert v2["ref"] == f"torchscript:{model}" and v2["notes"] == "retrained" and v2["aliases"] == ["challenger"]
    assert v2["digest"] == digest_of_ref(f"torchscript:{model}") != shown["versions"][0]["digest"]

    table = _cli(kafka_bootstrap, topic, "show", "embedder")
    assert table.returncode == 0 and "challenger" in table.stdout and "retrained" in table.stdout

    # Aliases move; a removed alias is gone; the state survives in the topic for any reader.
    assert _cli(kafka_bootstrap, topic, "alias", "embedder", "champion", "2").returncode == 0
    assert _cli(kafka_bootstrap, topic, "alias", "embedder", "challenger", "--remove").returncode == 0
    state = Registry(kafka_bootstrap, topic).state()
    assert state.aliases["embedder"] == {"champion": 2}
    assert state.resolve("embedder").version == 2 and state.resolve("embedder", "1").ref == "tiny"


def test_bad_input_gets_one_line_errors(kafka_bootstrap, tmp_path):
    topic = f"models-{uuid.uuid4().hex[:8]}"
    missing = _cli(kafka_bootstrap, topic, "register", "embedder", "--version", "1", "--ref", f"st:{tmp_path}/nope")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unknown = _cli(kafka_bootstrap, topic, "show", "ghost")
    assert unknown.returncode == 2 and "not in the registry" in unknown.stderr
    assert _cli(kafka_bootstrap, topic, "register", "embedder", "--version", "1", "--ref", "tiny").returncode == 0
    no_version = _cli(kafka_bootstrap, topic, "alias", "embedder", "champion", "7")
    assert no_version.returncode == 2 and "no version 7 (versions: 1)" in no_version.stderr
    bad_precision = _cli(kafka_bootstrap, topic, "register", "embedder", "--version", "2", "--ref", "tiny",
                         "--precision", "int4")
    assert bad_precision.returncode == 2 and "fp32, int8" in bad_precision.stderr
