"""Load pickled annotation files without running code from them.

A pickle is a small program: any GLOBAL / STACK_GLOBAL / INST / OBJ opcode imports a callable
(e.g. `os.system`) through `Unpickler.find_class`, and REDUCE calls it. Annotation pickles such as
REFER's `refs(unc).p` only hold plain containers and scalars, which the opcodes build directly, so
this loader refuses EVERY global: only dict, list, tuple, set, str, bytes, int, float, bool and
None can come out, and a pickle that names anything else fails with `UnsafePickleError` naming
the file and the refused global before anything is called.

Python 2 pickles (REFER was written by Python 2, protocol 2) store `str` as byte strings. They are
loaded as bytes and then decoded as UTF-8 with `surrogateescape`, like `text.loads_json` does for
JSON: invalid bytes survive as lone surrogates, so one bad sentence does not sink the file, and the
reader's `text.clean_text` quarantines the record that holds it, naming the field.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from xsam.data.errors import SourceError


class UnsafePickleError(SourceError):
    """The pickle references a global (a class or function): refused, nothing was executed."""

    def __init__(self, file: str, module: str, name: str):
        self.global_name = f"{module}.{name}"
        super().__init__(f"refusing to load pickle: it references the global {self.global_name!r} "
                         f"(only plain containers and scalars are allowed)", file=file)


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler whose every attempt to import a global is refused."""

    def __init__(self, data: bytes, file: str, encoding: str):
        super().__init__(io.BytesIO(data), encoding=encoding)
        self._file = file

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(self._file, module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"persistent id {pid!r} is not supported")


def _decode_bytes(obj: Any, memo: dict[int, Any]) -> Any:
    """Recursively turn bytes (dict keys included) into str, keeping shared references shared
    (a pickle can reuse one object many times: expanding copies could blow up memory)."""
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).decode("utf-8", errors="surrogateescape")
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, list):
        out: Any = []
        memo[key] = out
        out.extend(_decode_bytes(v, memo) for v in obj)
    elif isinstance(obj, dict):
        out = {}
        memo[key] = out
        for k, v in obj.items():
            out[_decode_bytes(k, memo)] = _decode_bytes(v, memo)
    elif isinstance(obj, tuple):
        out = tuple(_decode_bytes(v, memo) for v in obj)
        memo[key] = out
    elif isinstance(obj, (set, frozenset)):
        out = type(obj)(_decode_bytes(v, memo) for v in obj)
        memo[key] = out
    else:  # cannot happen without a global, kept as a guard
        raise TypeError(f"unexpected {type(obj).__name__} in a plain pickle")
    return out


def loads(data: bytes, file: str, *, decode_bytes: bool = True) -> Any:
    """Unpickle plain data from `data` (read from `file`, named in errors).

    decode_bytes: decode Python 2 byte strings (and any bytes) to str with surrogateescape.
    Raises UnsafePickleError for any global, SourceError for anything else that is not a valid
    plain pickle (truncated, bad opcode, unhashable key, too deep)."""
    try:
        obj = _PlainUnpickler(data, file, encoding="bytes").load()
        return _decode_bytes(obj, {}) if decode_bytes else obj
    except UnsafePickleError:
        raise
    except RecursionError as e:
        raise SourceError("pickle is nested too deeply", file=file) from e
    except Exception as e:  # the unpickler raises many types for corrupt input
        raise SourceError(f"not a valid plain pickle: {type(e).__name__}: {e}", file=file) from e
