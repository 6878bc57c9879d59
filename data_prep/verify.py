"""Check a shard directory against its manifest: every shard opens, every audio member decodes, and
counts and durations agree.

    python -m data_prep.verify OUT

OUT is a directory or a URL (``s3://``, ``gs://``, ``http(s)://``; every shard is downloaded once, into
memory). Exit code 0 only if everything agrees; otherwise each problem is printed on its own line and the exit
code is 1. A directory without ``manifest.json`` (an interrupted ``data_prep.shard``) never passes.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import soundfile as sf

from data_prep.shard import FORMAT_VERSION, JOB_NAME, MANIFEST_NAME, SHARD_NAME, TEMP_NAME
from dist_audio.storage import SourceUnavailable, Store

__all__ = ["main", "verify"]


def verify(out: str | Path) -> list[str]:
    """All problems found in ``out`` (an empty list means the shards are complete and consistent)."""
    try:
        store = Store(str(out))
        return _verify(store)
    except (ValueError, SourceUnavailable) as err:
        return [str(err)]
    except OSError as err:  # e.g. access denied
        return [f"cannot read {out}: {err}"]


def _verify(store: Store) -> list[str]:
    manifest_path = store.path(MANIFEST_NAME)
    try:
        manifest = json.loads(store.read(MANIFEST_NAME))
    except (FileNotFoundError, NotADirectoryError):
        return [f"{store.url} has no {MANIFEST_NAME}: sharding did not finish (or this is not a shard directory)"]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [f"{manifest_path} is not valid JSON: {err}"]
    if manifest.get("format_version") != FORMAT_VERSION:
        return [f"unsupported format_version {manifest.get('format_version')!r} (expected {FORMAT_VERSION})"]

    problems: list[str] = []
    listed = set()
    for split_name, split in manifest["splits"].items():
        all_frames: list[int] = []
        for name, expected, short in zip(split["shards"], split["shard_samples"], split["shard_short_chunks"]):
            listed.add(name)
            counts = _check_shard(store, name, manifest, problems)
            if counts is None:
                continue
            samples, frames, short_found = counts
            all_frames += frames
            if samples != expected:
                problems.append(f"{name}: {samples} samples, manifest says {expected}")
            if sorted(short_found) != sorted(short):
                problems.append(f"{name}: short chunks {sorted(short_found)}, manifest says {sorted(short)}")
        if sum(split["shard_samples"]) != split["samples"]:
            problems.append(f"{split_name}: shard sample counts add up to {sum(split['shard_samples'])}, "
                            f"manifest says {split['samples']}")
        seconds = sum(all_frames) / manifest["sample_rate"]
        shortest = min(all_frames, default=None)
        if abs(seconds - split["seconds"]) > 1e-3:
            problems.append(f"{split_name}: shards hold {seconds:.3f} s, manifest says {split['seconds']} s")
        if shortest is not None and abs(shortest / manifest["sample_rate"] - split["min_seconds"]) > 1e-3:
            problems.append(f"{split_name}: shortest chunk {shortest / manifest['sample_rate']:.3f} s, "
                            f"manifest says {split['min_seconds']} s")
    for name in store.list() if store.writable else []:  # an http(s) location cannot be listed
        if TEMP_NAME.match(name) or name == JOB_NAME:
            problems.append(f"leftover {name} (interrupted run?)")
        elif SHARD_NAME.match(name) and name not in listed:
            problems.append(f"{name} is not listed in the manifest")
    return problems


def _check_shard(store: Store, name: str, manifest: dict[str, Any],
                 problems: list[str]) -> tuple[int, list[int], list[int]] | None:
    """Decode every sample of one shard; returns (samples, frames per sample, frames of short chunks)."""
    try:
        data = store.read(name)
    except (FileNotFoundError, IsADirectoryError):
        problems.append(f"{name}: missing")
        return None
    path = Path(name)
    codec = manifest["codec"]
    signals = ["mixture", *manifest["stems"]] if manifest["layout"] == "musdb" else [""]
    expected_suffixes = {"json"} | {f"{s}.{codec}" if s else codec for s in signals}
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    problems.append(f"{path.name}: {member.name} is not a regular file")
                    continue
                key, _, suffix = member.name.partition(".")
                if suffix not in expected_suffixes:
                    problems.append(f"{path.name}: unexpected member {member.name}")
                    continue
                file = tar.extractfile(member)
                assert file is not None
                groups.setdefault(key, {})[suffix] = file.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{path.name}: cannot read the tar file ({err})")
        return None

    frames_list, short = [], []
    for key, members in groups.items():
        missing = sorted(expected_suffixes - set(members))
        if missing:
            problems.append(f"{path.name}: sample {key} lacks {', '.join(missing)}")
            continue
        try:
            meta = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            problems.append(f"{path.name}: {key}.json is not valid JSON")
            continue
        for suffix in sorted(expected_suffixes - {"json"}):
            problems.extend(f"{path.name}: {key}.{suffix}: {p}" for p in _check_audio(members[suffix], meta, manifest))
        frames = int(meta.get("frames", 0))
        frames_list.append(frames)
        if frames < manifest["chunk_frames"]:
            short.append(frames)
    return len(groups), frames_list, short


def _check_audio(data: bytes, meta: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        return [f"does not decode ({err})"]
    found = []
    if rate != manifest["sample_rate"]:
        found.append(f"sample rate {rate}, manifest says {manifest['sample_rate']}")
    if audio.shape[1] != manifest["channels"]:
        found.append(f"{audio.shape[1]} channels, manifest says {manifest['channels']}")
    if len(audio) != meta.get("frames"):
        found.append(f"{len(audio)} frames, its JSON says {meta.get('frames')}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="shard directory or URL made by python -m data_prep.shard")
    args = parser.parse_args(argv)
    problems = verify(args.out)
    if problems:
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        print(f"{args.out}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    manifest = json.loads(Store(args.out).read(MANIFEST_NAME))
    summary = "; ".join(f"{name}: {s['samples']} samples, {s['seconds']:.1f} s, {len(s['shards'])} shard(s)"
                        for name, s in manifest["splits"].items())
    print(f"OK {args.out}: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
