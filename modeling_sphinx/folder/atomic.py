"""Output folders that appear only when complete: a failed or interrupted write leaves nothing behind.

Kept free of heavy imports so that light commands (`sphinx-mllm mix`) start fast.
"""

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

STAGING_SUFFIX = ".partial"


def published_name(folder: Path) -> str:
    """The name `folder` has, or will have once `atomic_output_dir` publishes it (for files that name their
    folder while it is still being written)."""
    staged = re.fullmatch(rf"\.(.+)\.[^.]+{re.escape(STAGING_SUFFIX)}", folder.name)
    return staged.group(1) if staged else folder.name


# what a write into a full filesystem raises: no space, over a quota, or over the process's file-size limit
FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# safetensors' Rust writer raises its own error, which quotes the OS error: "... (os error 28)"
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def human_size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def is_full_disk(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
        return True
    quoted = RUST_OS_ERROR.search(str(error)) if type(error).__name__ == "SafetensorError" else None
    return quoted is not None and int(quoted.group(1)) in FULL_DISK_ERRNOS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_abandoned_staging(out_dir: Path):
    """Remove what a killed writer of `out_dir` left: its staging folders whose process is gone."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(\d+)-[^/]*{re.escape(STAGING_SUFFIX)}")
    if not out_dir.parent.is_dir():
        return
    for sibling in out_dir.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and sibling.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _written(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def staging_sibling(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: a hidden sibling, `.NAME.partial`."""
    return path.with_name(f".{path.name}{STAGING_SUFFIX}")


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(path)` that a crash cannot leave half-written: `write` fills a sibling temporary file, then a rename."""
    staging = staging_sibling(path)
    write(staging)
    os.replace(staging, path)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`path.write_text(text)`, atomically (`write_atomic`)."""
    return write_atomic(path, lambda staging: staging.write_text(text))


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def refuse_non_empty(out_dir: str | Path) -> Path:
    """`out_dir`, or a `ValueError` if it exists and holds anything: long commands call this before their work."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {str(out_dir)!r} is a file; choose a new path")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output folder {str(out_dir)!r} exists and is not empty; choose a new path")
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"output folder {str(out_dir)!r}: {str(parent)!r} is a file, not a folder")
    return out_dir


def staging_folder(out_dir: str | Path, label: str = "", needed_bytes: int | None = None) -> Path:
    """A new hidden folder next to `out_dir` for what becomes it (`.OUT.PID-LABEL….partial`, removed by the next
    writer of `out_dir` if this process dies), once `out_dir` is free and, with `needed_bytes`, the space is there."""
    out_dir = refuse_non_empty(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if needed_bytes and (free := shutil.disk_usage(out_dir.parent).free) < needed_bytes:
        raise ValueError(
            f"{out_dir}: not enough space: it needs about {human_size(needed_bytes)} and {out_dir.parent} has "
            f"{human_size(free)} free"
        )
    remove_abandoned_staging(out_dir)
    prefix = f".{out_dir.name}.{os.getpid()}-{label}"
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=STAGING_SUFFIX, dir=out_dir.parent))


@contextmanager
def atomic_output_dir(out_dir: str | Path, needed_bytes: int | None = None):
    """Yield a temporary folder next to `out_dir` that becomes `out_dir` only if the block completes.

    `needed_bytes`, the size of what will be written, is checked against the free space first; a filesystem
    that fills up anyway ends in a `ValueError` naming `out_dir` and the space needed, with nothing left behind.
    """
    out_dir = Path(out_dir)
    needs = f"about {human_size(needed_bytes)}" if needed_bytes else "more"
    staging = staging_folder(out_dir, needed_bytes=needed_bytes)
    staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the model from other users (a server's)
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException as error:
        written = _written(staging)
        shutil.rmtree(staging, ignore_errors=True)
        if is_full_disk(error):
            raise ValueError(
                f"{out_dir}: the filesystem is full after {human_size(written)} written; it needs {needs} "
                "(nothing was kept; free space and run again)"
            ) from None
        raise
