"""Lossless packing of the float32 tensors in a training state, so that two states fit where 1.7 did.

A float32's high byte is its sign and the top seven bits of its exponent. Weights, momenta and Adam moments
span a few octaves, so that byte takes a handful of values (2.6–3.3 bits of entropy in the default study's
states) and Huffman coding (zlib, ``Z_HUFFMAN_ONLY``) shrinks it to about a third; the other three bytes are
stored as they are. A packed tensor is a plain dict of uint8 tensors, so ``torch.load(weights_only=True)``
reads it, and unpacking gives back the very same bits. A tensor that shares storage with another (tied
embeddings) is packed once and unpacked into one tensor again.

Segment state files and resume states are packed (qkrank.train); snapshots kept for users stay plain
``torch.save`` files of the model's state dict.
"""

from __future__ import annotations

import math
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

MARKER = "__qkrank_packed_float32__"
FORMAT = 1
MIN_NUMEL = 1 << 12  # smaller tensors are not worth a dict and a zlib stream
CHUNK = 1 << 24  # high-byte chunk compressed on its own, so chunks compress in parallel (zlib frees the GIL)


class PackingError(ValueError):
    """A packed tensor that does not unpack to its recorded size: the file is corrupt."""


def _check_byteorder() -> None:
    if sys.byteorder != "little":  # the byte split below assumes the high byte is the fourth
        raise RuntimeError("qkrank.state_packing needs a little-endian machine")


def _workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _compress(chunk: bytes) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return packer.compress(chunk) + packer.flush()


def pack_tensor(tensor: torch.Tensor, pool: ThreadPoolExecutor) -> dict:
    """One float32 tensor (any device) → ``{MARKER, shape, low (n×3 bytes), high (zlib chunks)}``."""
    flat = tensor.detach().contiguous().view(torch.uint8).view(-1, 4)
    low = flat[:, :3].contiguous().cpu()  # contiguous first: torch.save writes a view's whole storage
    high = flat[:, 3].contiguous().cpu().numpy()
    chunks = list(pool.map(_compress, (high[i:i + CHUNK].tobytes() for i in range(0, len(high), CHUNK))))
    return {MARKER: FORMAT, "shape": list(tensor.shape), "low": low,
            "high": [torch.frombuffer(bytearray(c), dtype=torch.uint8) for c in chunks]}


def unpack_tensor(packed: dict, pool: ThreadPoolExecutor) -> torch.Tensor:
    """The float32 CPU tensor ``pack_tensor`` was given, bit for bit."""
    if packed.get(MARKER) != FORMAT:
        raise PackingError(f"packed tensor of format {packed.get(MARKER)!r}; this qkrank reads format {FORMAT}")
    try:
        low, shape, chunks = packed["low"], [int(n) for n in packed["shape"]], packed["high"]
        high = b"".join(pool.map(zlib.decompress, (c.numpy().tobytes() for c in chunks)))
    except zlib.error as e:
        raise PackingError(f"packed tensor: corrupt high bytes ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PackingError(f"packed tensor: malformed ({type(e).__name__}: {e})") from None
    n = math.prod(shape)
    if not (isinstance(low, torch.Tensor) and low.dtype == torch.uint8 and tuple(low.shape) == (n, 3)):
        raise PackingError(f"packed tensor: low bytes {getattr(low, 'shape', None)} do not fit shape {shape}")
    if len(high) != n:
        raise PackingError(f"packed tensor: {len(high)} high bytes for {n} values")
    joined = torch.empty((n, 4), dtype=torch.uint8)
    joined[:, :3] = low
    joined[:, 3] = torch.frombuffer(bytearray(high), dtype=torch.uint8)
    return joined.view(torch.float32).view(shape)


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()))


def pack(obj):
    """``obj`` (nested dicts, lists and tuples) with every float32 tensor of at least MIN_NUMEL values packed."""
    _check_byteorder()
    done: dict[tuple, dict] = {}
    with ThreadPoolExecutor(_workers()) as pool:
        def walk(node):
            if isinstance(node, torch.Tensor):
                if node.dtype != torch.float32 or node.numel() < MIN_NUMEL:
                    return node
                key = _storage_key(node)
                if key not in done:
                    done[key] = pack_tensor(node, pool)
                return done[key]
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, (list, tuple)):
                return type(node)(walk(v) for v in node)
            return node
        return walk(obj)


def unpack(obj):
    """The inverse of ``pack``; anything not packed (a plain snapshot, a small tensor) comes back as it is."""
    _check_byteorder()
    done: dict[int, torch.Tensor] = {}
    with ThreadPoolExecutor(_workers()) as pool:
        def walk(node):
            if isinstance(node, dict):
                if MARKER in node:
                    if id(node) not in done:
                        done[id(node)] = unpack_tensor(node, pool)
                    return done[id(node)]
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, (list, tuple)):
                return type(node)(walk(v) for v in node)
            return node
        return walk(obj)
