"""The batch manifest (JSONL or CSV) as a list of edit items, and the results file (JSONL) it fills.

JSONL, one clip per line: {"clip": "a.mp4", "source_prompt": "...", "edits": ["...", {"prompt": "...",
"seed": 3}], ...settings}; "edit_prompt": "..." instead of "edits" for one edit; "id" optional.
CSV, one edit per row: columns clip, source_prompt, edit_prompt, optional id and settings columns (empty
= not set); rows with the same id (or, without ids, the same clip and source prompt) are edits of one
clip, which is tuned once. Relative clip paths are relative to the manifest's folder.
Settings: frames, width, height, fps, tune_steps, precision (per clip) and negative, seed, cfg, steps
(per clip, or per edit).
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

CLIP_SETTINGS = {"frames": int, "width": int, "height": int, "fps": float, "tune_steps": int, "precision": str}
EDIT_SETTINGS = {"negative": str, "seed": int, "cfg": float, "steps": int}
SETTINGS = {**CLIP_SETTINGS, **EDIT_SETTINGS}
FIELDS = {"id", "clip", "source_prompt", "edits", "edit_prompt", "settings"}


class ManifestError(Exception):
    """The manifest cannot be read; says which line and what to fix."""


def _typed(where: str, values: dict, allowed: dict) -> dict:
    out = {}
    for key, value in values.items():
        if key not in allowed:
            raise ManifestError(f"{where}: unknown setting {key!r} (known: {', '.join(allowed)})")
        if value is None or value == "":
            continue
        try:
            out[key] = allowed[key](value)
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: {key} = {value!r} is not a {allowed[key].__name__}") from None
    return out


def _rows_jsonl(path: Path):
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ManifestError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: expected an object per line")
        settings = dict(row.get("settings") or {}, **{k: v for k, v in row.items() if k not in FIELDS})
        edits = row.get("edits", [row["edit_prompt"]] if "edit_prompt" in row else [])
        yield where, row, _typed(where, settings, SETTINGS), edits if isinstance(edits, list) else [edits]


def _rows_csv(path: Path):
    groups: dict[tuple, list] = {}
    with path.open(newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            where = f"{path}:{n}"
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            settings = {k: v for k, v in row.items() if k not in FIELDS}
            edit = {"prompt": row.get("edit_prompt", ""), **_typed(where, {
                k: v for k, v in settings.items() if k in EDIT_SETTINGS}, EDIT_SETTINGS)}
            clip = _typed(where, {k: v for k, v in settings.items() if k not in EDIT_SETTINGS}, CLIP_SETTINGS)
            group = row.get("id") or (row.get("clip"), row.get("source_prompt"), json.dumps(clip, sort_keys=True))
            if group not in groups:
                groups[group] = [where, row, clip, []]
            groups[group][3].append(edit)
    yield from (tuple(g) for g in groups.values())


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "clip"


def read_manifest(path: Path) -> list[dict]:
    """Every edit of every clip as an item: id (clip_id#n), key (hash of all its inputs), clip_id, clip
    (absolute path), source_prompt, edit {prompt, negative?, seed?, cfg?, steps?}, settings (per clip)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    reader = _rows_csv if path.suffix.lower() == ".csv" else _rows_jsonl
    items, ids = [], set()
    for where, row, settings, edits in reader(path):
        if not row.get("clip"):
            raise ManifestError(f"{where}: no clip (the source video's path)")
        if not str(row.get("source_prompt") or "").strip():
            raise ManifestError(f"{where}: no source_prompt (the clip's description, what it is tuned on)")
        if not edits:
            raise ManifestError(f"{where}: no edits (give \"edits\": [...] or \"edit_prompt\")")
        clip = (path.parent / Path(row["clip"]).expanduser()).resolve()
        clip_settings = {k: v for k, v in settings.items() if k in CLIP_SETTINGS}
        basis = json.dumps([str(clip), row["source_prompt"], clip_settings], sort_keys=True)
        clip_id = _safe(str(row.get("id") or f"{clip.stem}-{hashlib.sha1(basis.encode()).hexdigest()[:6]}"))
        if clip_id in ids:
            raise ManifestError(f"{where}: id {clip_id!r} is used by an earlier row; ids must be unique")
        ids.add(clip_id)
        for n, edit in enumerate(edits, 1):
            edit = {"prompt": edit} if isinstance(edit, str) else dict(edit or {})
            if not str(edit.get("prompt") or "").strip():
                raise ManifestError(f"{where}: edit {n} has no prompt")
            defaults = {k: v for k, v in settings.items() if k in EDIT_SETTINGS}
            edit = {"prompt": edit["prompt"], **defaults,
                    **_typed(f"{where} edit {n}", {k: v for k, v in edit.items() if k != "prompt"}, EDIT_SETTINGS)}
            item = {"id": f"{clip_id}#{n}", "clip_id": clip_id, "clip": str(clip),
                    "source_prompt": row["source_prompt"], "edit": edit, "settings": clip_settings}
            item["key"] = hashlib.sha1(json.dumps(item, sort_keys=True).encode()).hexdigest()[:16]
            items.append(item)
    return items


def read_results(path: Path) -> dict[str, dict]:
    """The last record of each item key in a results file (a missing file is an empty one; a torn last
    line, from a run that was killed while writing, is ignored)."""
    found = {}
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("key"):
                found[record["key"]] = record
    return found


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(record) + "\n")
        f.flush()
