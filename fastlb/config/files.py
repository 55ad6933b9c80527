"""Files the configuration names, checked when it is read, so a typo is one line of error naming the
flag or file:line, not a traceback from the first worker."""
from __future__ import annotations

import os


def check_readable(path: str, what: str) -> str:
    """Config-time check of a file option (certificates, keys, CAs), named by `what` in the message."""
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"{what} file {path!r} does not exist or is not readable")
    return path


def unwritable_file(path: str) -> str:
    """Why fastlb could not append to the file at path ("" when it could): checked at --check-config and
    at start, so a typo is one line of error, not a traceback from the first worker."""
    if os.path.isdir(path):
        return "it is a directory"
    if os.path.exists(path):
        return "" if os.access(path, os.W_OK) else "permission denied"
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return f"no directory {parent}"
    return "" if os.access(parent, os.W_OK | os.X_OK) else f"permission denied in {parent}"


def read_token(path: str) -> str:
    """The admin bearer token: the file's content without surrounding whitespace; at least 16 characters."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise OSError(f"cannot read token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ValueError(f"token file {path} must hold a token of at least 16 characters")
    return token
