"""Inputs that can be read only once: stdin (`-`), `/dev/stdin`, a pipe, a FIFO, bash's `<(...)`.

Telling a format apart reads a file's first bytes and the JSON reader rewinds, so a reader must be able
to read its input again. A stream cannot: its bytes are read whole into memory the first time anything
asks for them and kept for this process, so the format sniffing, the reader and any later pass (compare
reads its data to validate it, then to split it) all see the same bytes. A regular file or a directory
is read from disk as before. Errors name a stream as `<stdin>` (for `-`) or as the path given.
"""

from __future__ import annotations

import io
import os
import stat
import sys
from typing import BinaryIO

STDIN = "-"
STDIN_NAME = "<stdin>"
_READ: dict[str, bytes] = {}  # path as given -> its bytes, for the streams read so far


def source_name(path: str | os.PathLike[str]) -> str:
    """How errors and reports name an input: `<stdin>` for `-`, else the path as given."""
    text = os.fspath(path)
    return STDIN_NAME if text == STDIN else text


def is_stream(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is stdin (`-`) or names something that is neither a regular file nor a directory
    (a pipe, a FIFO, a character device such as a terminal); a path that does not exist is none."""
    text = os.fspath(path)
    if text == STDIN or text in _READ:
        return True
    try:
        mode = os.stat(os.path.expanduser(text)).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def stream_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole content of the stream `path`, read on the first call and kept for the later ones."""
    text = os.fspath(path)
    if text not in _READ:
        if text == STDIN:
            stdin = sys.stdin
            buffer = getattr(stdin, "buffer", None)
            _READ[text] = buffer.read() if buffer is not None else (stdin.read() if stdin else "").encode("utf-8")
        else:
            with open(os.path.expanduser(text), "rb") as f:
                _READ[text] = f.read()
    return _READ[text]


def open_binary(path: str | os.PathLike[str]) -> BinaryIO:
    """`path` opened for reading bytes, seekable: a stream's kept bytes, or the file on disk (`~` expanded).
    OSError as `open` raises it."""
    if is_stream(path):
        return io.BytesIO(stream_bytes(path))
    return open(os.path.expanduser(os.fspath(path)), "rb")
