"""Row dtypes: names, storage types, and exact codecs between stored rows and float32.

numpy is the reference and the ``*_torch`` twins (torch imported inside) give the same bits;
FP8 rows follow docs/engram.md section 7. Where rows live is memory.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engram_edit.errors import BadInputError

if TYPE_CHECKING:
    import torch

SCALE_BLOCK = 32  # columns that share one E8M0 scale byte
FP8_MAX = 448.0  # largest finite E4M3FN value
AMAX_FLOOR = 1e-4  # a block's max |x| is raised to this before picking its scale (spec section 7)
SCALE_CODE = "F8_E8M0"  # safetensors code of the scale tensor
SCALE_TORCH = "float8_e8m0fnu"  # torch dtype of the scale tensor


@dataclass(frozen=True)
class RowDtype:
    """One row dtype under its four names."""

    name: str  # ours: float32, bfloat16, float16, float8_e4m3
    code: str  # safetensors header code
    storage: np.dtype  # numpy dtype of the stored elements (bits, not values, for bf16 and fp8)
    torch_name: str  # attribute of the torch module
    scaled: bool  # True: one E8M0 scale byte per SCALE_BLOCK columns rides along

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


ROW_DTYPES: dict[str, RowDtype] = {d.name: d for d in (
    RowDtype("float32", "F32", np.dtype("<f4"), "float32", False),
    RowDtype("bfloat16", "BF16", np.dtype("<u2"), "bfloat16", False),
    RowDtype("float16", "F16", np.dtype("<f2"), "float16", False),
    RowDtype("float8_e4m3", "F8_E4M3", np.dtype("u1"), "float8_e4m3fn", True),
)}


def row_dtype(name: str) -> RowDtype:
    """The row dtype called ``name`` (one of ``ROW_DTYPES``); BadInputError for any other."""
    if name not in ROW_DTYPES:
        raise BadInputError(f"unknown row dtype {name!r}; expected one of "
                            f"{', '.join(ROW_DTYPES)}")
    return ROW_DTYPES[name]


def dtype_from_safetensors(code: str) -> str:
    """Our name of the row dtype stored under safetensors code ``code`` (F32, BF16, F16,
    F8_E4M3); BadInputError for any other code."""
    for d in ROW_DTYPES.values():
        if d.code == code:
            return d.name
    raise BadInputError(f"safetensors dtype {code!r} is not a row dtype; expected one of "
                        f"{', '.join(d.code for d in ROW_DTYPES.values())}")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of the row dtype ``name`` (float8_e4m3 is torch.float8_e4m3fn)."""
    import torch

    return getattr(torch, row_dtype(name).torch_name)


def row_dtype_from_storage(storage: np.dtype, scaled: bool) -> RowDtype:
    """The row dtype whose numpy storage is ``storage`` (uint8 storage is FP8 only if scaled)."""
    for d in ROW_DTYPES.values():
        if d.storage == storage and d.scaled == scaled:
            return d
    raise BadInputError(f"numpy dtype {storage} {'with' if scaled else 'without'} scales is not "
                        f"the storage of a row dtype")


# --- element codecs (numpy) -----------------------------------------------------------------

def _e4m3_table() -> np.ndarray:
    b = np.arange(256)
    exp, man = (b >> 3) & 0xF, (b & 7).astype(np.float64)
    value = np.where(exp == 0, man * 2.0**-9, (1 + man / 8) * np.exp2(exp - 7.0))
    value[(b & 0x7F) == 0x7F] = np.nan  # E4M3FN has no inf; S.1111.111 is NaN
    return np.where(b & 0x80, -value, value).astype(np.float32)


E4M3_TABLE = _e4m3_table()  # float32 value of every E4M3FN byte


def e4m3_decode(data: np.ndarray) -> np.ndarray:
    """float32 values of E4M3FN bytes (0x7F and 0xFF are NaN; the largest value is 448)."""
    return E4M3_TABLE[np.asarray(data, dtype=np.uint8)]


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """E4M3FN bytes of float32 values: saturate to +-448, round to nearest, ties to even.

    Subnormals (multiples of 2^-9 below 2^-6) are rounded like normals; the sign of a value that
    rounds to zero is kept; NaN becomes 0x7F (with its sign).
    """
    x = np.asarray(x, dtype=np.float32)
    a = np.minimum(np.abs(x.astype(np.float64)), FP8_MAX)
    nan = np.isnan(a)
    a = np.where(nan, 0.0, a)
    _, e = np.frexp(a)  # a = m * 2^e with m in [0.5, 1): floor(log2 a) = e - 1
    exp = np.where(a < 2.0**-6, -6, e - 1)  # subnormals share the smallest binade's step
    n = np.rint(np.ldexp(a, 3 - exp))  # a in steps of 2^(exp-3), exact; rint ties to even
    # (exp + 7) is the biased exponent, n - 8 the mantissa; n = 16 carries into the next
    # binade and a subnormal (exp = -6) gives byte n, so one formula covers every case.
    code = ((exp + 6) * 8 + n).astype(np.int64)
    code = np.where(nan, 0x7F, code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def e8m0_decode(scale: np.ndarray) -> np.ndarray:
    """float32 values of E8M0 bytes: byte e is 2^(e - 127) (byte 0 is the subnormal 2^-127),
    byte 255 is NaN."""
    e = np.asarray(scale, dtype=np.uint8).astype(np.int32)
    out = np.ldexp(np.float32(1.0), np.minimum(e, 254) - 127).astype(np.float32)
    return np.where(e == 255, np.float32(np.nan), out)


def _bf16_encode(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16  # add half an ulp, ties to even
    quiet_nan = (u >> 16) | 0x40
    return np.where(np.isnan(x), quiet_nan, rounded).astype("<u2")


def _bf16_decode(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


# --- row codecs -------------------------------------------------------------------------------

def _fp8_block_exponents(amax: np.ndarray) -> np.ndarray:
    """k per block, with 2^k the smallest power of two such that amax <= 448 * 2^k.

    amax = m * 2^e (m in [0.5, 1)) and 448 = 0.875 * 2^9, so amax / 448 = (m / 0.875) 2^(e-9),
    where m / 0.875 lies in (0.57, 1.15): k = e - 9, plus one when m > 0.875. Exact, no log.
    """
    m, e = np.frexp(amax)
    return e.astype(np.int32) - 9 + (m > 0.875)


def _check_values(dtype: RowDtype, values: np.ndarray) -> None:
    if not np.issubdtype(values.dtype, np.floating):
        raise BadInputError(f"values to encode as {dtype.name} must be floating point, got "
                            f"{values.dtype}")
    if values.ndim < 1 or values.shape[-1] == 0:
        raise BadInputError(f"values to encode must have a non-empty last (column) axis, got "
                            f"shape {values.shape}")
    if dtype.scaled and values.shape[-1] % SCALE_BLOCK:
        raise BadInputError(f"{dtype.name} rows need a width divisible by {SCALE_BLOCK}, got "
                            f"{values.shape[-1]}")


def _not_finite(dtype: RowDtype, count: int) -> BadInputError:
    return BadInputError(f"cannot encode {count} non-finite value(s) (NaN or inf) as "
                         f"{dtype.name}")


def _overflow(dtype: RowDtype, count: int) -> BadInputError:
    return BadInputError(f"{count} value(s) are too large for {dtype.name} (they would round "
                         f"to inf)")


def encode(dtype: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Quantize float rows to their stored form.

    Values are first rounded to float32. bfloat16 and float16 round to nearest even. float8_e4m3
    follows docs/engram.md section 7 per block of 32 columns: ``amax = max(max|x|, 1e-4)``, the
    scale ``s`` is the smallest power of two with ``amax <= 448 * s`` (stored as the E8M0 byte
    ``log2(s) + 127``), and ``q = e4m3(clamp(x / s, -448, 448))`` rounds to nearest even.

    Args:
        dtype (`str`): a row dtype name (``ROW_DTYPES``).
        values (`np.ndarray`): floats, shape ``[..., width]``.

    Returns:
        `tuple[np.ndarray, np.ndarray | None]`: the stored elements, shape ``[..., width]`` in
        the dtype's numpy storage type, and for float8_e4m3 the uint8 scale bytes, shape
        ``[..., width / 32]`` (None for other dtypes).

    Raises:
        BadInputError: unknown dtype, NaN or inf in ``values``, a value too large for
            bfloat16/float16, or an FP8 width that is not a multiple of 32.

    Example:
        >>> data, scale = encode("float8_e4m3", np.full((1, 32), 3.0, np.float32))
        >>> int(data[0, 0]), int(scale[0, 0])  # 3 = 384 * 2^-7; 384 is E4M3 byte 124
        (124, 120)
    """
    d = row_dtype(dtype)
    values = np.asarray(values)
    _check_values(d, values)
    finite = np.isfinite(values)
    if not finite.all():
        raise _not_finite(d, int((~finite).sum()))
    with np.errstate(over="ignore"):
        x = values.astype(np.float32)
    if d.name == "float32":
        too_big = np.isinf(x)
        data = x.astype(d.storage)
    elif d.name == "bfloat16":
        data = _bf16_encode(x)
        too_big = np.isinf(_bf16_decode(data))
    elif d.name == "float16":
        with np.errstate(over="ignore"):
            data = x.astype(d.storage)
        too_big = np.isinf(data)
    else:
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // SCALE_BLOCK, SCALE_BLOCK)
        amax = np.maximum(np.abs(blocks).max(axis=-1), np.float32(AMAX_FLOOR))
        k = _fp8_block_exponents(amax)  # in [-22, 120] for finite float32 input
        inverse = np.ldexp(np.float32(1.0), -k).astype(np.float32)  # 1/s, exact
        scaled = blocks * inverse[..., None]  # exact wherever the result is a normal float32
        q = e4m3_encode(np.clip(scaled, -FP8_MAX, FP8_MAX)).reshape(x.shape)
        scale = (k + 127).astype(np.uint8)
        # A block max within an E4M3 step of float32's largest value can round up to inf.
        too_big = np.isinf(decode(d.name, q, scale))
        if too_big.any():
            raise _overflow(d, int(too_big.sum()))
        return q, scale
    if too_big.any():
        raise _overflow(d, int(too_big.sum()))
    return data, None


def _check_stored(d: RowDtype, data_dtype: str, data_shape: tuple, scale_dtype: str | None,
                  scale_shape: tuple | None, want_data: str, want_scale: str) -> None:
    p: list[str] = []
    if data_dtype != want_data:
        p.append(f"{d.name} rows are stored as {want_data}, got {data_dtype}")
    if len(data_shape) < 1:
        p.append(f"{d.name} rows need a column axis, got shape {data_shape}")
    elif d.scaled:
        width = data_shape[-1]
        want = (*data_shape[:-1], width // SCALE_BLOCK)
        if width % SCALE_BLOCK:
            p.append(f"{d.name} rows need a width divisible by {SCALE_BLOCK}, got {width}")
        if scale_shape is None:
            p.append(f"{d.name} rows need their {SCALE_CODE} scales")
        elif scale_dtype != want_scale or tuple(scale_shape) != want:
            p.append(f"{d.name} scales must be {want_scale} of shape {want}, got {scale_dtype} "
                     f"of shape {tuple(scale_shape)}")
    elif scale_shape is not None:
        p.append(f"{d.name} rows have no scales, but scales were given")
    if p:
        raise BadInputError(p)


def decode(dtype: str, data: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Exact float32 values of stored rows.

    Args:
        dtype (`str`): a row dtype name (``ROW_DTYPES``).
        data (`np.ndarray`): stored elements, shape ``[..., width]``, in the dtype's numpy
            storage type (uint16 bits for bfloat16, uint8 bytes for float8_e4m3).
        scale (`np.ndarray`, optional): for float8_e4m3 only, uint8 E8M0 bytes of shape
            ``[..., width / 32]``.

    Returns:
        `np.ndarray`: float32 of shape ``[..., width]``; FP8 values are ``e4m3(q) * 2^(e-127)``
        computed in float32.

    Raises:
        BadInputError: unknown dtype, or data/scale of the wrong type or shape.

    Example:
        >>> decode("bfloat16", np.array([[0x3F80, 0xC000]], np.uint16))
        array([[ 1., -2.]], dtype=float32)
    """
    d = row_dtype(dtype)
    data = np.asarray(data)
    _check_stored(d, str(data.dtype), data.shape, None if scale is None else str(scale.dtype),
                  None if scale is None else scale.shape, str(d.storage), "uint8")
    if d.name == "bfloat16":
        return _bf16_decode(data)
    if not d.scaled:
        return data.astype(np.float32)
    w = data.shape[-1]
    blocks = e4m3_decode(data).reshape(*data.shape[:-1], w // SCALE_BLOCK, SCALE_BLOCK)
    with np.errstate(over="ignore"):  # large codes under scale bytes near 254 are inf
        return (blocks * e8m0_decode(scale)[..., None]).reshape(data.shape)


# --- torch twins ------------------------------------------------------------------------------

def storage_to_torch(data: np.ndarray) -> torch.Tensor:
    """View numpy storage as the torch storage type (bfloat16 for uint16 bits, float8_e4m3fn for
    uint8 rows; use ``scale_to_torch`` for scales). Shares memory with ``data``."""
    import torch

    data = np.ascontiguousarray(data)
    if data.dtype == np.uint16:
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    if data.dtype == np.uint8:
        return torch.from_numpy(data).view(torch.float8_e4m3fn)
    return torch.from_numpy(data)


def scale_to_torch(scale: np.ndarray) -> torch.Tensor:
    """View uint8 E8M0 bytes as a torch float8_e8m0fnu tensor (shares memory)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(scale, dtype=np.uint8)).view(torch.float8_e8m0fnu)


def storage_from_torch(t: torch.Tensor) -> np.ndarray:
    """numpy storage (uint16 bits for bfloat16, uint8 for float8 types) of a torch tensor."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu):
        return t.view(torch.uint8).numpy()
    return t.numpy()


def decode_torch(dtype: str, data: torch.Tensor, scale: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """torch twin of ``decode``: same values, bit for bit, on the device of ``data``.

    ``data`` is in the dtype's torch type (float32, bfloat16, float16, float8_e4m3fn) and
    ``scale`` is float8_e8m0fnu; see ``storage_to_torch``.
    """
    import torch

    d = row_dtype(dtype)
    _check_stored(d, str(data.dtype), tuple(data.shape),
                  None if scale is None else str(scale.dtype),
                  None if scale is None else tuple(scale.shape), str(torch_dtype(d.name)),
                  str(getattr(torch, SCALE_TORCH)))
    x = data.to(torch.float32)
    if not d.scaled:
        return x
    w = data.shape[-1]
    blocks = x.reshape(*data.shape[:-1], w // SCALE_BLOCK, SCALE_BLOCK)
    return (blocks * scale.to(torch.float32).unsqueeze(-1)).reshape(data.shape)


def encode_torch(dtype: str, values: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch twin of ``encode``: same bits, on the device of ``values``.

    Returns the stored elements in the dtype's torch type and, for float8_e4m3, float8_e8m0fnu
    scales (None otherwise).
    """
    import torch

    d = row_dtype(dtype)
    if not values.is_floating_point():
        raise BadInputError(f"values to encode as {d.name} must be floating point, got "
                            f"{values.dtype}")
    if values.dim() < 1 or values.shape[-1] == 0:
        raise BadInputError(f"values to encode must have a non-empty last (column) axis, got "
                            f"shape {tuple(values.shape)}")
    if d.scaled and values.shape[-1] % SCALE_BLOCK:
        raise BadInputError(f"{d.name} rows need a width divisible by {SCALE_BLOCK}, got "
                            f"{values.shape[-1]}")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        raise _not_finite(d, int((~finite).sum()))
    x = values.to(torch.float32)
    if bool(torch.isinf(x).any()):
        raise _overflow(row_dtype("float32"), int(torch.isinf(x).sum()))
    if not d.scaled:
        data = x.to(torch_dtype(d.name))
        too_big = torch.isinf(data)
        if bool(too_big.any()):
            raise _overflow(d, int(too_big.sum()))
        return data, None
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // SCALE_BLOCK, SCALE_BLOCK)
    amax = blocks.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    m, e = torch.frexp(amax)
    k = e.to(torch.int32) - 9 + (m > 0.875).to(torch.int32)
    inverse = ((127 - k) << 23).view(torch.float32)  # 2^-k from its bits: exact
    q = (blocks * inverse.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    scale = (k + 127).to(torch.uint8).view(getattr(torch, SCALE_TORCH))
    q = q.reshape(x.shape)
    too_big = torch.isinf(decode_torch(d.name, q, scale))
    if bool(too_big.any()):
        raise _overflow(d, int(too_big.sum()))
    return q, scale
