"""The logit lens of a DeepSeek-V4.1 directory: what Engram rows say through the value part of
``wkv``, the final RMSNorm and the LM head, each read by offset. numpy only, no torch, no model.

The same definition as ``inspect.decode_rows`` (rows in their columns, every other column zero,
gate 1), with V4.1's pieces: the value is the last ``hidden`` outputs of ``wkv`` (no bias, no
ShortConv, v4.wkv_rows), and the streams, all equal to ``v``, collapse to a positive multiple of
``v`` (assumed: V4.1 collapses with the last layer's sigmoid pre-mix), which the final RMSNorm
removes up to its eps. docs/engram.md section 7.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import numpy as np

from engram_edit import dtypes
from engram_edit.errors import BadInputError
from engram_edit.layouts import v4
from engram_edit.tensorfile import TensorLocation, pread_into, read_range

HEAD_CHUNK_BYTES = 16 << 20  # LM head bytes per read: the V4.1 head is 1.3 GB of bf16
assert sys.byteorder == "little", "safetensors data is little-endian; so must the host be"


def _floats(loc: TensorLocation, first: int, count: int) -> np.ndarray:
    """Rows ``first .. first+count`` of a float (BF16/F16/F32) matrix as float32, or all of a
    vector as ``[1, n]``; read straight into the result (bf16 bits land in the high halves of
    the float32 words, which is their exact value)."""
    width = loc.shape[1] if len(loc.shape) > 1 else loc.shape[0]
    count = count if len(loc.shape) > 1 else 1
    name = dtypes.dtype_from_safetensors(loc.dtype)
    size = dtypes.row_dtype(name).itemsize
    fd = os.open(loc.path, os.O_RDONLY)
    try:
        if name == "bfloat16":
            out = np.zeros((count, width, 2), np.uint16)
            bits = np.empty((count, width), np.uint16)
            pread_into(fd, memoryview(bits.reshape(-1).view(np.uint8)),
                       loc.offset + first * width * size, loc.path)
            out[..., 1] = bits  # little-endian: the second uint16 is the high half
            return out.view(np.float32).reshape(count, width)
        raw = np.empty((count, width), dtypes.row_dtype(name).storage)
        pread_into(fd, memoryview(raw.reshape(-1).view(np.uint8)),
                   loc.offset + first * width * size, loc.path)
        return dtypes.decode(name, raw)
    finally:
        os.close(fd)


def _need(files, name: str) -> TensorLocation:
    loc = files.tensors.get(name)
    if loc is None:
        raise BadInputError(f"{files.path}: the logit lens needs tensor {name}, which this "
                            f"directory does not have")
    return loc


def value_projection(files, layer_id: int, columns: list[int] | None = None) -> np.ndarray:
    """W_v of one Engram layer, float32 ``[hidden, len(columns) * head_dim]`` (every column
    when None): the value rows of ``wkv.weight``, FP8 blocks dequantized with ``wkv.scale``
    (e4m3 * 2^(e - 127) per 32 x 32 block; the indexing ``scale[r // 32, c // 32]`` is assumed
    from the shapes). Only those rows are read, only those columns decoded."""
    config = files.config
    w = config.engram_head_dim
    columns = list(range(config.engram_columns)) if columns is None else columns
    inputs = np.concatenate([np.arange(k * w, (k + 1) * w) for k in columns])
    prefix = v4.LAYER_PREFIX.format(i=layer_id)
    wkv = _need(files, prefix + "wkv.weight")
    first, last = v4.wkv_rows(config)["value"]
    rows, cols = last - first, wkv.shape[1]
    if wkv.dtype != v4.TABLE_DTYPE:
        return _floats(wkv, first, rows)[:, inputs]
    scale = _need(files, prefix + "wkv.scale")
    if first % v4.FP8_BLOCK or rows % v4.FP8_BLOCK:
        raise BadInputError(f"{wkv.path}: {wkv.name}: the value rows {first}..{last} do not "
                            f"start on a {v4.FP8_BLOCK}-row scale block")
    q = np.frombuffer(read_range(wkv, first * cols, rows * cols), np.uint8).reshape(rows, cols)
    b = v4.blocks(cols)
    s = np.frombuffer(read_range(scale, first // v4.FP8_BLOCK * b, rows // v4.FP8_BLOCK * b),
                      np.uint8).reshape(rows // v4.FP8_BLOCK, b)
    factor = np.repeat(dtypes.e8m0_decode(s)[:, inputs // v4.FP8_BLOCK], v4.FP8_BLOCK, 0)
    return dtypes.e4m3_decode(q[:, inputs]) * factor


def lens_probs(files, layer_id: int, columns: list[int], rows: np.ndarray) -> np.ndarray:
    """Next-token probabilities of rows alone in their columns, float32 ``[N, vocab]``.

    Args:
        files (`ModelFiles`): a V4.1 directory (``layout`` "v4") opened by ``open_model``.
        layer_id (`int`): an Engram layer.
        columns (`list[int]`): the column of each row, distinct.
        rows (`np.ndarray`): float ``[N, len(columns), head_dim]``.

    Returns:
        `np.ndarray`: softmax over the LM head of RMSNorm(W_v e), one row per N.

    Raises:
        BadInputError: a missing tensor, a bad column, rows of the wrong shape.

    Example:
        >>> rows = files.table().read_rows(1, np.array([7]))  # doctest: +SKIP
        >>> lens_probs(files, 1, [0], rows[:, None, :]).argmax(-1)  # doctest: +SKIP
    """
    config = files.config
    c, w = config.engram_columns, config.engram_head_dim
    if layer_id not in config.engram_layer_ids:
        raise BadInputError(f"layer {layer_id} is not an Engram layer "
                            f"({config.engram_layer_ids})")
    if len(set(columns)) != len(columns) or any(not 0 <= k < c for k in columns):
        raise BadInputError(f"layer {layer_id}: columns {columns} must be distinct and within "
                            f"0..{c - 1}")
    x = np.asarray(rows, dtype=np.float32)
    if x.ndim != 3 or x.shape[1:] != (len(columns), w):
        raise BadInputError(f"layer {layer_id}: rows must be [N, {len(columns)}, {w}], got "
                            f"shape {list(x.shape)}")
    weight = value_projection(files, layer_id, columns)  # [hidden, len(columns) * w]
    h = normed(files, x.reshape(len(x), -1) @ weight.T)
    logits = np.empty((len(x), config.vocab_size), np.float32)
    for first, chunk in head_chunks(files):
        logits[:, first:first + len(chunk)] = h @ chunk.T
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def final_norm(files) -> np.ndarray:
    """The final RMSNorm's weight, float32 ``[hidden]``."""
    return _floats(_need(files, "norm.weight"), 0, 1)[0]


def normed(files, v: np.ndarray) -> np.ndarray:
    """``v [..., hidden]`` through the final RMSNorm (eps ``rms_norm_eps``)."""
    rms = np.sqrt(np.mean(np.square(v), axis=-1, keepdims=True) + files.config.rms_norm_eps)
    return v / rms * final_norm(files)


def head_rows(files, ids: list[int]) -> np.ndarray:
    """The LM head's rows (unembeddings) of token ids, float32 ``[len(ids), hidden]``; only
    those rows are read."""
    head = _need(files, "lm_head.weight")
    bad = [i for i in ids if not 0 <= i < head.shape[0]]
    if bad:
        raise BadInputError(f"token id {bad[0]} is outside the LM head's {head.shape[0]} rows")
    return np.concatenate([_floats(head, i, 1) for i in ids]) if ids else \
        np.zeros((0, head.shape[1]), np.float32)


def head_chunks(files) -> Iterator[tuple[int, np.ndarray]]:
    """The whole LM head, ``HEAD_CHUNK_BYTES`` at a time: (first row, float32 rows)."""
    head = _need(files, "lm_head.weight")
    step = max(1, HEAD_CHUNK_BYTES // (head.shape[1] * 2))
    for first in range(0, head.shape[0], step):
        yield first, _floats(head, first, min(step, head.shape[0] - first))
