"""Registry state folding, model selectors, digests and routing (no broker)."""

from __future__ import annotations

import json

import pytest

from spotbatch.rollouts import ModelVersion, RegistryState, bucket_of, parse_model_ref, routes_to_challenger
from spotbatch.rollouts.digest import digest_of_path
from spotbatch.rollouts.records import alias_key, version_key


def _state() -> RegistryState:
    state = RegistryState()
    for v in (1, 2):
        entry = ModelVersion(name="embedder", version=v, ref="tiny", digest=f"sha256:{v}")
        state.apply(version_key("embedder", v), json.dumps(entry.to_json()).encode())
    state.apply(alias_key("embedder", "champion"), b'{"version": 1}')
    state.apply(alias_key("embedder", "challenger"), b'{"version": 2}')
    return state


def test_selectors_resolve_and_tombstones_remove_aliases():
    state = _state()
    assert state.resolve("embedder").version == 1
    assert state.resolve("embedder", "2").version == 2
    assert state.resolve("embedder", "challenger").version == 2
    state.apply(alias_key("embedder", "challenger"), None)
    with pytest.raises(ValueError, match="no alias 'challenger'"):
        state.resolve("embedder", "challenger")
    with pytest.raises(ValueError, match="no version 9"):
        state.resolve("embedder", "9")
    assert parse_model_ref("embedder@champion") == ("embedder", "champion")
    assert parse_model_ref("embedder") == ("embedder", None)


def test_routing_is_stable_nested_and_matches_the_fraction():
    ids = [f"job-{i}" for i in range(4000)]
    assert [bucket_of(i) for i in ids] == [bucket_of(i) for i in ids]  # same answer every time, any process
    share = sum(routes_to_challenger(i, 0.1) for i in ids) / len(ids)
    assert abs(share - 0.1) < 4 * (0.1 * 0.9 / len(ids)) ** 0.5  # within 4 binomial standard errors
    assert all(routes_to_challenger(i, 0.5) for i in ids if routes_to_challenger(i, 0.1))  # a step keeps its jobs


def test_folder_digest_covers_names_and_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"\x00\x01")
    before = digest_of_path(tmp_path)
    (tmp_path / "a" / "w.bin").write_bytes(b"\x00\x02")
    assert digest_of_path(tmp_path) != before
    (tmp_path / "a" / "w.bin").write_bytes(b"\x00\x01")
    assert digest_of_path(tmp_path) == before
    (tmp_path / "a" / "w.bin").rename(tmp_path / "a" / "v.bin")
    assert digest_of_path(tmp_path) != before
