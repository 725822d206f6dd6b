"""One output folder belongs to one run.

`maskcma train`, `predict`, `evaluate` and `demo` write into an output folder. A folder records which run wrote
it in a manifest, ``maskcma_run.json``::

    {"command": "predict", "fingerprint": {...}, "package_version": "0.1.0", "created": "2026-...",
     "files": ["mask_0.png", "overlay.png"]}

Rules (`RunFolder.claim`):

- an absent or empty folder is claimed: the manifest is written before any work, which also proves the folder is
  writable (a folder holding only a manifest with no recorded file, left by a run that failed before writing, counts
  as empty);
- a folder whose manifest names the same command and fingerprint is continued with ``resume=True`` (``--resume``)
  and refused otherwise;
- a folder whose manifest names another command or fingerprint is refused, naming every key that differs (old
  value vs new value);
- a non-empty folder without a manifest is refused (it is not a run of this package);
- ``overwrite=True`` (``--overwrite``) removes exactly the files and folders the manifest recorded (never any
  other file) and claims the folder afresh.

Every refusal is a `RunFolderError` naming the folder, what differs and the ways out (``--resume``,
``--overwrite`` or another folder).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "maskcma_run.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class RunFolderError(ValueError):
    """An output folder cannot be used for this run; the message names the folder, what differs and the way out
    (``--resume``, ``--overwrite`` or another folder)."""


def _package_version() -> str:
    from . import __version__

    return __version__


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key in sorted(value, key=str):
            flat.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        if not value and prefix:
            flat[prefix] = {}
        return flat
    return {prefix: value}


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """``"key: old vs new"`` for every flattened key whose value differs between two fingerprints."""
    old_flat, new_flat = _flatten(_jsonable(old)), _flatten(_jsonable(new))
    lines = []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
        if before != after:
            lines.append(f"{key}: {_short(before)} vs {_short(after)}")
    return lines


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, paths strings), so comparisons are stable."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _atomic_write_json(path: Path, content: dict) -> None:
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(content, stream, indent=2, sort_keys=True)
            stream.write("\n")
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise


def _ways_out(resume_possible: bool) -> str:
    ways = ["pass --overwrite to replace it", "choose another output folder"]
    if resume_possible:
        ways.insert(0, "pass --resume to continue it")
    return "; ".join(ways)


@dataclass
class RunFolder:
    """An output folder claimed by one run (see the module docstring for the rules).

    Args:
        path: the folder.
        command: the command that owns it (``"train"``, ``"predict"``, ``"evaluate"``, ``"demo"``, ...).
        fingerprint: what identifies the run (model, data, settings); JSON-serialisable.
        files: the files and folders (relative to `path`) the run recorded as written.
    """

    path: Path
    command: str
    fingerprint: dict
    files: list[str] = field(default_factory=list)
    created: str = ""

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    # -- claiming --------------------------------------------------------------------------------------------

    @classmethod
    def claim(
        cls,
        path: str | os.PathLike,
        *,
        command: str,
        fingerprint: dict,
        resume: bool = False,
        overwrite: bool = False,
    ) -> RunFolder:
        """Create or take over `path` for this run; checks it is writable before any work.

        - absent or empty folder: claimed (manifest written).
        - folder with our manifest, same command and fingerprint: ``resume=True`` continues it; ``resume=False``
          refuses unless ``overwrite=True``.
        - manifest with a different command or fingerprint: refused naming each differing key (old vs new),
          unless ``overwrite=True``.
        - non-empty folder without a manifest: refused (not a run of ours) unless ``overwrite=True``.
        - ``overwrite=True`` removes only the files the manifest recorded (never other files), then claims the
          folder afresh.

        Raises:
            RunFolderError: the folder belongs to another run, or cannot be created or written.
        """
        path = Path(path).expanduser()
        fingerprint = _jsonable(fingerprint)
        if resume and overwrite:
            raise RunFolderError(f"output folder {path}: --resume and --overwrite exclude each other; pass one")
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"output folder {path} is a file, not a folder; choose another output folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFolderError(
                f"output folder {path} cannot be created ({error.strerror or error}); choose a writable folder"
            ) from None
        _check_writable(path)

        manifest = cls._read_manifest(path)
        others = [entry.name for entry in path.iterdir() if entry.name != MANIFEST_NAME]
        if manifest is None:
            if others and not overwrite:
                listing = ", ".join(sorted(others)[:5]) + (", ..." if len(others) > 5 else "")
                raise RunFolderError(
                    f"output folder {path} is not empty ({listing}) and holds no {MANIFEST_NAME}, so it is not a "
                    f"maskcma run folder; choose another output folder, or pass --overwrite to write into it "
                    "anyway (its files are kept)"
                )
            return cls._fresh(path, command, fingerprint)

        if not others and not manifest.get("files"):
            return cls._fresh(path, command, fingerprint)  # a claim that wrote nothing (e.g. a run that failed early)
        same_command = manifest.get("command") == command
        differences = fingerprint_differences(manifest.get("fingerprint") or {}, fingerprint)
        if not same_command:
            differences.insert(0, f"command: {_short(manifest.get('command'))} vs {_short(command)}")
        if overwrite:
            cls._remove_recorded(path, manifest.get("files") or [])
            return cls._fresh(path, command, fingerprint)
        if differences:
            shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
            raise RunFolderError(
                f"output folder {path} holds another run ({shown}); pass --overwrite to replace it, or choose "
                "another output folder"
            )
        if resume:
            folder = cls(
                path=path,
                command=command,
                fingerprint=fingerprint,
                files=list(manifest.get("files") or []),
                created=str(manifest.get("created", "")),
            )
            return folder
        raise RunFolderError(
            f"output folder {path} holds a finished or earlier `{command}` run with the same settings; "
            f"{_ways_out(command == 'train')}"
        )

    @classmethod
    def _fresh(cls, path: Path, command: str, fingerprint: dict) -> RunFolder:
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        folder = cls(path=path, command=command, fingerprint=fingerprint, files=[], created=created)
        folder._write_manifest()
        return folder

    @staticmethod
    def _read_manifest(path: Path) -> dict | None:
        manifest_path = Path(path) / MANIFEST_NAME
        if not manifest_path.is_file():
            return None
        try:
            content = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RunFolderError(
                f"{manifest_path} cannot be read ({error}); delete it by hand if the folder is yours, or choose "
                "another output folder"
            ) from None
        if not isinstance(content, dict) or "command" not in content:
            raise RunFolderError(
                f"{manifest_path} is not a maskcma run manifest; choose another output folder"
            )
        return content

    @staticmethod
    def _remove_recorded(path: Path, files: list[str]) -> None:
        """Delete the recorded files and folders, then folders left empty by that, never anything else."""
        root = path.resolve()
        parents: set[Path] = set()
        for name in files:
            target = (root / name).resolve()
            if target == root or root not in target.parents:
                continue  # a manifest never records paths outside its folder; ignore a hand-edited one
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            parents.update(p for p in target.parents if root in p.parents)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()

    def _write_manifest(self) -> None:
        content = {
            "command": self.command,
            "fingerprint": self.fingerprint,
            "package_version": _package_version(),
            "created": self.created,
            "files": sorted(set(self.files)),
        }
        try:
            _atomic_write_json(self.manifest_path, content)
        except OSError as error:
            raise RunFolderError(
                f"output folder {self.path} is not writable ({error.strerror or error}); choose a writable folder"
            ) from None

    # -- recording ------------------------------------------------------------------------------------------

    def record(self, *relative_paths: str | os.PathLike) -> None:
        """Add written files or folders (relative to `path`, or absolute paths inside it) to the manifest, so that
        ``--overwrite`` can remove exactly them."""
        root = self.path.resolve()
        for item in relative_paths:
            candidate = Path(item)
            absolute = (candidate if candidate.is_absolute() else root / candidate).resolve()
            if absolute == root or root not in absolute.parents:
                raise ValueError(f"RunFolder.record: {item} is not inside the run folder {self.path}")
            self.files.append(absolute.relative_to(root).as_posix())
        self._write_manifest()

    @staticmethod
    def read_fingerprint(path: str | os.PathLike) -> dict | None:
        """The fingerprint stored in a folder's manifest (None when there is none)."""
        manifest = RunFolder._read_manifest(Path(path))
        return None if manifest is None else manifest.get("fingerprint")


def _check_writable(path: Path) -> None:
    try:
        handle, name = tempfile.mkstemp(prefix=".maskcma_write_check.", dir=path)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise RunFolderError(
            f"output folder {path} is not writable ({error.strerror or error}); choose a writable folder"
        ) from None


# -- fingerprints ------------------------------------------------------------------------------------------------


def _safetensors_header_sha256(path: Path) -> str | None:
    """SHA-256 of a safetensors file's JSON header (names, dtypes, shapes and offsets); None when the file is too
    short to hold one. Reads only the header."""
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            return None
        (length,) = struct.unpack("<Q", prefix)
        if length > path.stat().st_size - 8:
            return None
        return hashlib.sha256(stream.read(length)).hexdigest()


class WeightsFileError(ValueError):
    """A weights file is truncated or corrupt; the message names the file."""


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Check a safetensors file is whole, reading only its header: the header parses and the file holds every
    tensor's bytes (a truncated copy or download fails here with the file named, instead of deep inside loading).

    Raises:
        WeightsFileError: the file is truncated or its header is corrupt.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = "copy or download it again"
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise WeightsFileError(f"weights file {path} is truncated ({size} bytes, no safetensors header); {fix}")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise WeightsFileError(
                f"weights file {path} is truncated: its header needs {length} bytes, the file holds {size - 8} after "
                f"the length; {fix}"
            )
        try:
            header = json.loads(stream.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise WeightsFileError(f"weights file {path} has a corrupt safetensors header ({error}); {fix}") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"weights file {path} has a corrupt safetensors header (not a mapping); {fix}")
    ends = [
        int(entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    needed = 8 + length + (max(ends) if ends else 0)
    if size < needed:
        raise WeightsFileError(
            f"weights file {path} is truncated: its tensors need {needed} bytes, the file holds {size}; {fix}"
        )


def check_weight_files(folder: str | os.PathLike) -> None:
    """`check_safetensors_file` on every ``*.safetensors`` file of a model folder (headers only; cheap)."""
    folder = Path(folder)
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            check_safetensors_file(path)


def model_fingerprint(path_or_repo: str | os.PathLike) -> dict:
    """What identifies a model folder, cheaply: its config's SHA-256 and every weight file's name, size and (for
    safetensors) header hash. No weight is read. A name that is not a local folder (a Hub repo id) is fingerprinted
    by its name."""
    path = Path(path_or_repo).expanduser()
    if not path.is_dir():
        return {"repo": str(path_or_repo)}
    result: dict[str, Any] = {}
    config = path / "config.json"
    if config.is_file():
        result["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
    weights = {}
    for weight in sorted(path.iterdir()):
        if weight.is_file() and weight.name.endswith(_WEIGHT_SUFFIXES):
            entry: dict[str, Any] = {"size": weight.stat().st_size}
            if weight.suffix == ".safetensors":
                entry["header_sha256"] = _safetensors_header_sha256(weight)
            weights[weight.name] = entry
    result["weights"] = weights
    return result


__all__ = [
    "MANIFEST_NAME",
    "RunFolder",
    "RunFolderError",
    "WeightsFileError",
    "check_safetensors_file",
    "check_weight_files",
    "fingerprint_differences",
    "model_fingerprint",
]
