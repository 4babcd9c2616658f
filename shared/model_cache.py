"""The models' cache on disk ($CONVEYOR_CACHE_DIR/models): where the generated default model
lives, and how a model directory is written there (a GGUF file's conversion, a generated
model) so that a process reading it never sees half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from shared.config import CacheSettings

if TYPE_CHECKING:  # transformers takes seconds to import: only its writers' callers load it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DIR_NOT_EMPTY = (errno.ENOTEMPTY, errno.EEXIST)  # what rename() onto a full directory raises


def cache_root() -> Path:
    """CONVEYOR_CACHE_DIR, default ~/.cache/conveyor."""
    return CacheSettings().cache_dir.expanduser()


def default_model_dir() -> Path:
    """Where the default model lives: $CONVEYOR_CACHE_DIR/models/tiny."""
    return cache_root() / "models" / "tiny"


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Writes a model and its tokenizer as a Hugging Face directory at `out_dir`, published
    whole (see _publish): a reader sees the old directory or the new one, never half of one."""
    out_dir = Path(out_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)  # template in tokenizer_config.json
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _publish(tmp: Path, out_dir: Path) -> None:
    """Moves a finished model directory into place, so no reader ever sees half of one.
    NOTE: two processes racing to build it write identical models; the last to land stays."""
    try:
        os.rename(tmp, out_dir)  # atomic; succeeds when out_dir is absent or empty
        return
    except OSError as e:
        if e.errno not in _DIR_NOT_EMPTY:
            raise
    # out_dir holds a model already: move it aside, then put ours in its place.
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        with contextlib.suppress(FileNotFoundError):  # a racing writer moved it aside first
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError as e:  # a racing writer published in between; its model is complete
            if e.errno not in _DIR_NOT_EMPTY:
                raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
