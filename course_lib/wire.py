"""The plain-data wire format between the course's judge and a grading kernel.

A message is one byte string: a magic tag, the length of a JSON header, the header, then the tensors it
refers to as one safetensors blob. Nothing is ever pickled, so decoding cannot run code, and everything
decoded is a plain Python value or a plain ``torch.Tensor``: an object that lies in ``__eq__`` or
``__torch_function__`` cannot cross. The JSON side spells every non-JSON value as an object with one
``$`` key:

==========================  ==============================================================
``{"$tensor": "t0"}``       a tensor stored in the safetensors part (``"complex": true`` for
                            complex tensors sent as their real view, ``"numpy": true`` for arrays)
``{"$tuple": [...]}``       a tuple (a JSON array is a list)
``{"$dict": [[k, v], ...]}``  a dict (keys: str, int, float, bool, None or tuples of those)
``{"$dtype": "float32"}``   a ``torch.dtype``;  ``{"$device": "cpu"}`` a ``torch.device``
``{"$float": "nan"}``       a non-finite float;  ``{"$slice": [a, b, c]}`` a slice
``{"$ns": {...}}``          a dataclass or named tuple, as its type name and fields
``{"$handle": {"id": 3}}``  an object left where it lives (a module, a cache): see ``course_lib.agent``
``{"$ref": {...}}``         a reference the other side resolves (a global name, an import, a handle)
==========================  ==============================================================

Both sides import this file; the judge imports its own trusted copy, so what a kernel does to its copy
changes nothing on the judge's side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable
from typing import Any

MAGIC = b"CRSW1\n"
MAX_DEPTH = 64
MAX_BYTES = 256 << 20


class WireError(ValueError):
    """A message that is not well-formed plain data (too big, too deep, unknown markers)."""


@dataclasses.dataclass(frozen=True)
class Namespace:
    """A dataclass or named tuple that crossed as data: its type name and fields (read-only)."""

    type: str
    fields: dict

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(f"{self.__dict__.get('type', 'object')} has no field {name!r}") from None


def _torch():
    import torch

    return torch


def dumps(value: Any, *, on_object: Callable[[Any], dict] | None = None) -> bytes:
    """Encode ``value``; objects that are not plain data go through ``on_object`` (default: an error)."""
    torch = _torch()
    tensors: dict[str, Any] = {}

    def enc(v: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError(f"value nested deeper than {MAX_DEPTH} levels")
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {"$float": repr(float(v))}
        if isinstance(v, torch.Tensor):
            return _enc_tensor(v, tensors)
        if isinstance(v, torch.dtype):
            return {"$dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        if isinstance(v, torch.Size):
            return {"$tuple": [int(s) for s in v]}
        if isinstance(v, slice):
            return {"$slice": [enc(v.start, depth + 1), enc(v.stop, depth + 1), enc(v.step, depth + 1)]}
        if type(v).__module__ == "numpy":
            import numpy as np

            if isinstance(v, np.ndarray):
                out = _enc_tensor(torch.from_numpy(np.ascontiguousarray(v)), tensors)
                out["numpy"] = True
                return out
            if isinstance(v, np.generic):
                return enc(v.item(), depth)
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return {"$ns": {"type": type(v).__name__, "fields": {f: enc(getattr(v, f), depth + 1) for f in v._fields}}}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            fields = {f.name: enc(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v)}
            return {"$ns": {"type": type(v).__name__, "fields": fields}}
        if isinstance(v, Namespace):
            return {"$ns": {"type": v.type, "fields": {k: enc(x, depth + 1) for k, x in v.fields.items()}}}
        if isinstance(v, tuple):
            return {"$tuple": [enc(x, depth + 1) for x in v]}
        if isinstance(v, list):
            return [enc(x, depth + 1) for x in v]
        if isinstance(v, dict):
            return {"$dict": [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in v.items()]}
        if on_object is not None:
            return on_object(v)
        raise WireError(f"cannot send a {type(v).__name__} as data")

    header = json.dumps(enc(value, 0), allow_nan=False, separators=(",", ":")).encode()
    blob = b""
    if tensors:
        from safetensors.torch import save

        blob = save(tensors)
    return MAGIC + struct.pack("<Q", len(header)) + header + blob


def _enc_tensor(t, tensors: dict) -> dict:
    torch = _torch()
    t = torch.Tensor.detach(t)
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_quantized or t.device.type == "meta":
        raise WireError("cannot send a quantized or meta tensor")
    t = t.resolve_conj().resolve_neg().cpu()
    name = f"t{len(tensors)}"
    out: dict = {"$tensor": name}
    if t.is_complex():
        t = torch.view_as_real(t)
        out["complex"] = True
    tensors[name] = torch.Tensor._make_subclass(torch.Tensor, t.contiguous().clone())
    return out


def loads(data: bytes, *, on_ref: Callable[[dict], Any] | None = None, on_handle: Callable[[dict], Any] | None = None,
          max_bytes: int = MAX_BYTES) -> Any:
    """Decode a message written by :func:`dumps`, safely: JSON plus safetensors, nothing executable."""
    torch = _torch()
    if not isinstance(data, (bytes, bytearray)):
        raise WireError(f"a message is bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes is over the {max_bytes}-byte limit")
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise WireError("not a course wire message")
    (n,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    if n > len(data) - start:
        raise WireError("truncated message header")
    try:
        tree = json.loads(bytes(data[start:start + n]).decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise WireError(f"unreadable message header: {str(e)[:100]}") from None
    rest = bytes(data[start + n:])
    tensors: dict = {}
    if rest:
        from safetensors.torch import load

        try:
            tensors = load(rest)
        except Exception as e:  # noqa: BLE001 - any parse failure means "not data"
            raise WireError(f"unreadable tensors: {str(e)[:100]}") from None

    def key(k: Any) -> Any:
        if k is None or isinstance(k, (str, int, float, bool)):
            return k
        if isinstance(k, tuple) and all(key(x) == x for x in k):
            return k
        raise WireError("dict keys must be plain values")

    def dec(v: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise WireError(f"value nested deeper than {MAX_DEPTH} levels")
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [dec(x, depth + 1) for x in v]
        if not isinstance(v, dict) or not v:
            raise WireError("malformed value")
        tag = next(iter(v))
        body = v[tag]
        if tag == "$tensor":
            if body not in tensors:
                raise WireError(f"message refers to a missing tensor {body!r}")
            t = tensors[body]
            if v.get("complex"):
                t = torch.view_as_complex(t)
            return t.numpy() if v.get("numpy") else t
        if len(v) != 1:
            raise WireError(f"malformed {tag} value")
        if tag == "$tuple" and isinstance(body, list):
            return tuple(dec(x, depth + 1) for x in body)
        if tag == "$dict" and isinstance(body, list):
            out = {}
            for item in body:
                if not (isinstance(item, list) and len(item) == 2):
                    raise WireError("malformed dict entry")
                out[key(dec(item[0], depth + 1))] = dec(item[1], depth + 1)
            return out
        if tag == "$float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "$dtype" and isinstance(body, str):
            dt = getattr(torch, body, None)
            if not isinstance(dt, torch.dtype):
                raise WireError(f"unknown dtype {body!r}")
            return dt
        if tag == "$device" and isinstance(body, str):
            return torch.device(body)
        if tag == "$slice" and isinstance(body, list) and len(body) == 3:
            return slice(*(dec(x, depth + 1) for x in body))
        if tag == "$ns" and isinstance(body, dict) and isinstance(body.get("fields"), dict):
            return Namespace(str(body.get("type", "object"))[:100], {str(k): dec(x, depth + 1) for k, x in body["fields"].items()})
        if tag == "$handle" and isinstance(body, dict) and isinstance(body.get("id"), int) and on_handle is not None:
            return on_handle(body)
        if tag == "$ref" and isinstance(body, dict) and on_ref is not None:
            return on_ref(body)
        raise WireError(f"unexpected {tag} value")

    return dec(tree, 0)
