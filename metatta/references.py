"""Which adapter and which tuned settings an experiment's rows use: pinned, then recorded.

A row may name `models:/<name>@<alias>`, an alias that can move while or after
the experiment runs. Before any row runs, `pin_references` resolves each such
reference once to its version, points the row at `models:/<name>/<N>` (what
the row then loads, whatever the alias does meanwhile), and hashes the files;
each row's Result protocol records its `adapter` and `settings` as

    {"ref": "models:/mgg@champion", "name": "mgg", "alias": "champion", "version": "3",
     "uri": "models:/mgg/3", "sha256": "<sha256 of weights.pt>", "files": {"weights.pt": ..., ...}}

(a local path: {"ref", "path", "sha256", "files"}). `sha256` is the weights
file of an adapter, the YAML of tuned settings. The files are read safely on
the way (`metatta.safe_files`): a truncated or hostile weights file or YAML
fails before any row runs, with a ValueError naming it.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from metatta import tracking
from metatta.safe_files import read_json_file, read_state_dict, sha256_file

MAIN_FILE = {"adapter": tracking.ADAPTER_WEIGHTS, "settings": tracking.SETTINGS_FILE}


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of a file, or of each file directly in a directory, by name."""
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}


def check_local(path: Path, kind: str) -> None:
    """Read a local adapter's or settings' files safely before any row runs: a damaged or hostile
    file fails here, naming it (a registered one is checked when downloaded)."""
    if kind == "settings":
        tracking.load_settings(path)
        return
    weights = path / tracking.ADAPTER_WEIGHTS if path.is_dir() else path
    if weights.is_file():
        read_state_dict(weights, f"adapter {path}:")
    if path.is_dir() and (path / tracking.ADAPTER_CONFIG).is_file():
        read_json_file(path / tracking.ADAPTER_CONFIG, f"adapter {path}:")


def reference_record(ref: str, kind: str) -> dict[str, Any]:
    """What `ref` (an adapter or tuned settings: models:/... or a path) is now: version and hashes."""
    if kind not in MAIN_FILE:
        raise ValueError(f"reference kind must be one of {', '.join(MAIN_FILE)}, got {kind!r}")
    if ref.startswith("models:/"):
        name, _, alias = tracking.parse_model_uri(ref)
        version = tracking.resolve_version(ref)
        pinned = f"models:/{name}/{version}"
        path = tracking.download_adapter(pinned) if kind == "adapter" else tracking.download_registered(pinned)[1]
        record: dict[str, Any] = {"ref": ref, "name": name, "alias": alias, "version": version, "uri": pinned}
    else:
        path = Path(ref)
        if not path.exists():
            raise FileNotFoundError(f"{kind} {ref!r}: no such file or directory")
        check_local(path, kind)
        record = {"ref": ref, "path": str(path.resolve())}
    files = file_hashes(path)
    record["sha256"] = files.get(MAIN_FILE[kind]) if path.is_dir() else files[path.name]
    record["files"] = files
    return record


def pin_references(methods: list[Any]) -> tuple[list[Any], list[dict[str, Any]]]:
    """(method specs pointed at pinned versions, one {"adapter": record, "settings": record} per spec,
    holding only the kinds the spec uses). Each distinct reference is resolved and hashed once."""
    records: dict[tuple[str, str], dict[str, Any]] = {}
    pinned_specs, per_spec = [], []
    for spec in methods:
        changes, used = {}, {}
        for kind in MAIN_FILE:
            ref = getattr(spec, kind)
            if ref is None:
                continue
            key = (kind, str(ref))
            if key not in records:
                records[key] = reference_record(str(ref), kind)
            used[kind] = copy.deepcopy(records[key])
            changes[kind] = records[key].get("uri", ref)
        pinned_specs.append(dataclasses.replace(spec, **changes))
        per_spec.append(used)
    return pinned_specs, per_spec
