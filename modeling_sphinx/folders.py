"""Output folders that appear only when complete: a failed or interrupted write leaves nothing behind.

Kept free of heavy imports so that light commands (`sphinx-mllm mix`) start fast.
"""

import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

STAGING_SUFFIX = ".partial"


def published_name(folder: Path) -> str:
    """The name `folder` has, or will have once `atomic_output_dir` publishes it (for files that name their
    folder while it is still being written)."""
    staged = re.fullmatch(rf"\.(.+)\.[^.]+{re.escape(STAGING_SUFFIX)}", folder.name)
    return staged.group(1) if staged else folder.name


@contextmanager
def atomic_output_dir(out_dir: str | Path):
    """Yield a temporary folder next to `out_dir` that becomes `out_dir` only if the block completes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output folder {str(out_dir)!r} exists and is not empty; choose a new path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=STAGING_SUFFIX, dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
