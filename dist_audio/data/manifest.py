"""The shards' ``manifest.json``: reading it from a directory or URL, and checking a run config against it.

``data_prep.shard`` writes the manifest last, so a location without one is an unfinished (or foreign)
shard set and is refused.
"""

from __future__ import annotations

import json
from typing import Any

from dist_audio.config import ConfigError, RunConfig, TFSWAConfig
from dist_audio.storage import Store

__all__ = ["MANIFEST_NAME", "check_data_compatible", "read_manifest"]

MANIFEST_NAME = "manifest.json"


def read_manifest(shards: str | Store, timeout_s: float = 60.0) -> dict[str, Any]:
    """The manifest of a shard directory or URL; ``ConfigError`` at ``data.shards`` if it is absent or bad."""
    try:
        store = shards if isinstance(shards, Store) else Store(str(shards), timeout_s)
    except ValueError as err:
        raise ConfigError("data.shards", str(err)) from None
    if not store.is_container():
        raise ConfigError("data.shards", f"directory not found: {store.url}")
    try:
        text = store.read(MANIFEST_NAME)
    except FileNotFoundError:
        raise ConfigError("data.shards", f"{store.url} has no {MANIFEST_NAME} "
                                         "(incomplete or not made by data_prep.shard)") from None
    except PermissionError as err:
        raise ConfigError("data.shards", f"{store.path(MANIFEST_NAME)}: access denied ({err}); check the "
                                         "AWS_* variables or ~/.aws") from None
    except OSError as err:
        raise ConfigError("data.shards", f"cannot read {store.path(MANIFEST_NAME)}: {err}") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("data.shards", f"{store.path(MANIFEST_NAME)} is not valid JSON: {err}") from None


def check_data_compatible(cfg: RunConfig) -> dict[str, Any]:
    """Check the config against the shards' manifest; returns the manifest."""
    manifest = read_manifest(cfg.data.shards, cfg.data.remote_timeout_s)
    chunk = manifest.get("options", {}).get("chunk_seconds")
    train_split = manifest.get("splits", {}).get("train", {})
    shortest = train_split.get("min_seconds", chunk)
    if shortest is not None and cfg.data.segment_seconds > float(shortest) + 1e-9:
        raise ConfigError("data.segment_seconds",
                          f"{cfg.data.segment_seconds} s is longer than the shortest training chunk "
                          f"({shortest} s) in {cfg.data.shards}; re-shard with a larger --chunk-seconds")
    if not train_split.get("samples"):
        raise ConfigError("data.shards", f"{cfg.data.shards} has no training samples")
    _check(manifest.get("sample_rate") == cfg.model.sample_rate, "model.sample_rate",
           f"the shards hold {manifest.get('sample_rate')} Hz audio, the model expects {cfg.model.sample_rate} Hz")
    if isinstance(cfg.model, TFSWAConfig):
        stems = manifest.get("stems") or []
        missing = [s for s in cfg.model.sources if s not in stems]
        _check(manifest.get("layout") == "musdb", "data.shards",
               "separation needs stem shards (data_prep.shard --layout musdb)")
        _check(not missing, "model.sources", f"{missing} not among the shards' stems {stems}")
        _check(manifest.get("channels") == cfg.model.channels, "model.channels",
               f"the shards hold {manifest.get('channels')}-channel audio")
    return manifest


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)
