"""Text and JSON from sources that may hold invalid UTF-8."""

from __future__ import annotations

import json
from typing import Any

from xsam.data.errors import SampleError, SourceError


def loads_json(data: bytes, file: str) -> Any:
    """Parse a JSON source. Invalid UTF-8 bytes survive as lone surrogates (so one bad record
    does not sink the file) and are caught per sample by `clean_text`; bad JSON fails the source."""
    try:
        return json.loads(data.decode("utf-8-sig", errors="surrogateescape"))  # tolerate a BOM
    except json.JSONDecodeError as e:
        raise SourceError(f"not valid JSON: {e}", file=file) from e
    except ValueError as e:  # e.g. an integer over Python's 4300-digit limit
        raise SourceError(f"unreadable JSON value: {e}", file=file) from e
    except RecursionError as e:
        raise SourceError("JSON nested too deeply to read", file=file) from e


def clean_text(value: Any, field: str, file: str | None = None) -> str:
    """Return `value` as a str of valid Unicode, or raise SampleError naming the field."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError(f"non-UTF-8 text: {e}", field=field, file=file) from e
    if not isinstance(value, str):
        raise SampleError(f"expected text, got {type(value).__name__}", field=field, file=file)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SampleError("non-UTF-8 text (invalid byte sequence in source)", field=field, file=file) from e
    return value
