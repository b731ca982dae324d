"""The record of what a ``hope-hf`` command wrote into an output folder, so that nothing else is ever removed.

Every command that writes into a folder (``train --output_dir``, ``eval --task ... --output_dir``) lists the files it
wrote in ``hope-hf-outputs.json`` there, each with its size and SHA-256. A later run of the same command removes a
stale file of its own only when the file is listed and still holds exactly what was written (a file the user put
there, or changed since, is never removed), and a folder that holds this record is recognised as a run of that
command (an interrupted ``train`` is resumed, not refused).
"""

from __future__ import annotations

import hashlib
import json
import os

__all__ = ["MANIFEST_NAME", "SUITE_COMMAND", "TRAIN_COMMAND", "is_run_of", "read_manifest", "record_outputs",
           "remove_own_files"]

MANIFEST_NAME = "hope-hf-outputs.json"
TRAIN_COMMAND = "train"  # the command names in the record
SUITE_COMMAND = "eval --task"


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str) -> dict | None:
    """The record of ``folder`` (``{"command": ..., "files": {name: {"size", "sha256"}}}``), None if it has none or
    it cannot be read (a damaged record counts as none: nothing is then removed)."""
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def is_run_of(folder: str, command: str) -> bool:
    """Whether ``folder`` holds the record of a run of ``command`` (e.g. "train", "eval --task")."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("command") == command


def record_outputs(folder: str, command: str, names, *, replace: bool = False) -> None:
    """Add ``names`` (paths relative to ``folder``, files that ``command`` has just written) to the record; with
    ``replace`` the record lists exactly these. A name that is not a file (a folder such as a checkpoint) is
    recorded without a digest."""
    manifest = read_manifest(folder)
    files = {} if replace or manifest is None or manifest.get("command") != command else dict(manifest["files"])
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            files[name] = {"size": os.path.getsize(path), "sha256": _digest(path)}
        elif os.path.isdir(path):
            files[name] = {"folder": True}
    tmp = os.path.join(folder, MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"command": command, "files": dict(sorted(files.items()))}, f, indent=1)
    os.replace(tmp, os.path.join(folder, MANIFEST_NAME))  # never a half-written record


def remove_own_files(folder: str, command: str, names) -> list[str]:
    """Remove those of ``names`` that the record of ``command`` lists and that still hold what was written; returns
    the names removed. Anything else (not recorded, changed since, another command's) is left where it is."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("command") != command:
        return []
    removed = []
    for name in names:
        entry = manifest["files"].get(name)
        path = os.path.join(folder, name)
        if not entry or "sha256" not in entry or not os.path.isfile(path):
            continue
        if os.path.getsize(path) == entry["size"] and _digest(path) == entry["sha256"]:
            os.remove(path)
            removed.append(name)
    return removed
