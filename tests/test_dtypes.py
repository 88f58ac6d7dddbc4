"""dtypes: row codecs match torch's own conversions bit for bit; FP8 follows spec section 7."""

import doctest

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engram_edit import dtypes
from engram_edit.dtypes import (
    E4M3_TABLE,
    ROW_DTYPES,
    decode,
    decode_torch,
    dtype_from_safetensors,
    e4m3_encode,
    e8m0_decode,
    encode,
    encode_torch,
    row_dtype,
    row_dtype_from_storage,
    scale_to_torch,
    storage_from_torch,
    storage_to_torch,
    torch_dtype,
)
from engram_edit.errors import BadInputError

ALL_BYTES = np.arange(256, dtype=np.uint8)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    return a.shape == b.shape and np.array_equal(nan, np.isnan(b)) and np.array_equal(
        bits(a)[~nan], bits(b)[~nan])


def torch_e4m3(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.asarray(x, np.float32)).clamp(-448, 448)
    return t.to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def e4m3_test_values() -> np.ndarray:
    """Every E4M3 value, every midpoint (a tie) and its float32 neighbours, a dense sweep of
    float32 bit patterns (subnormals and past-448 values included), and random values."""
    grid = np.unique(np.abs(E4M3_TABLE[~np.isnan(E4M3_TABLE)]).astype(np.float64))
    mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)  # exact in float32
    sweep = np.arange(0, 0x44000000, 97, dtype=np.uint32).view(np.float32)  # 0 .. 512
    rng = np.random.default_rng(0)
    rand = (rng.standard_normal(200_000) * np.exp2(rng.uniform(-16, 10, 200_000)))
    x = np.concatenate([grid.astype(np.float32), mids, np.nextafter(mids, np.float32(0)),
                        np.nextafter(mids, np.float32(1e9)), sweep, rand.astype(np.float32),
                        np.float32([1e-30, 2**-10, 3 * 2**-11, 460, 464, 1e30])])
    return np.concatenate([x, -x])


# --- the dtype table --------------------------------------------------------------------------

def test_dtype_names_codes_numpy_and_torch_types_map_both_ways():
    expect = {"float32": ("F32", "<f4", torch.float32), "bfloat16": ("BF16", "<u2", torch.bfloat16),
              "float16": ("F16", "<f2", torch.float16),
              "float8_e4m3": ("F8_E4M3", "u1", torch.float8_e4m3fn)}
    assert list(ROW_DTYPES) == list(expect)
    for name, (code, storage, tdt) in expect.items():
        d = row_dtype(name)
        assert (d.code, d.storage, torch_dtype(name)) == (code, np.dtype(storage), tdt)
        assert dtype_from_safetensors(code) == name
        assert row_dtype_from_storage(np.dtype(storage), d.scaled) is d
    with pytest.raises(BadInputError, match="unknown row dtype 'int8'"):
        row_dtype("int8")
    with pytest.raises(BadInputError, match="'I64' is not a row dtype"):
        dtype_from_safetensors("I64")


# --- element codecs ---------------------------------------------------------------------------

def test_e4m3_decode_table_equals_torch_for_all_256_bytes():
    ref = torch.from_numpy(ALL_BYTES).view(torch.float8_e4m3fn).float().numpy()
    assert same_floats(E4M3_TABLE, ref)
    assert np.flatnonzero(np.isnan(E4M3_TABLE)).tolist() == [0x7F, 0xFF]
    assert E4M3_TABLE[0x7E] == 448 and E4M3_TABLE[0x01] == 2.0**-9
    assert np.signbit(E4M3_TABLE[0x80])


def test_e8m0_decode_equals_torch_for_all_256_bytes():
    ref = torch.from_numpy(ALL_BYTES).view(torch.float8_e8m0fnu).float().numpy()
    assert same_floats(e8m0_decode(ALL_BYTES), ref)
    assert e8m0_decode(np.uint8([0]))[0] == np.float32(2.0**-127)
    assert e8m0_decode(np.uint8([127]))[0] == 1.0 and np.isnan(e8m0_decode(np.uint8([255]))[0])


def test_e4m3_encode_equals_torch_on_ties_subnormals_and_random_values():
    x = e4m3_test_values()
    assert np.array_equal(e4m3_encode(x), torch_e4m3(x))


def test_e4m3_ties_round_to_the_even_mantissa():
    # 432 -> 448 (not 416), 17 -> 16 (not 18), 2^-10 -> 0, 3 * 2^-10 -> 2 * 2^-9 (subnormal)
    assert e4m3_encode(np.float32([432.0, 17.0, 2.0**-10, 3 * 2.0**-10])).tolist() == [
        0x7E, 0x58, 0x00, 0x02]


def test_e4m3_encode_then_decode_is_identity_on_every_finite_byte():
    finite = ALL_BYTES[~np.isnan(E4M3_TABLE)]
    assert np.array_equal(e4m3_encode(E4M3_TABLE[finite]), finite)


# --- row codecs: FP8 --------------------------------------------------------------------------

def random_rows(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """Rows whose 32-column blocks span very different magnitudes, some all zero or tiny."""
    magnitude = np.exp2(rng.uniform(-30, 30, (n, width // 32, 1)))
    x = rng.standard_normal((n, width // 32, 32)) * magnitude
    x[0, 0] = 0
    x[-1, -1] = 1e-6
    return x.reshape(n, width).astype(np.float32)


def test_fp8_numpy_encode_equals_torch_twin_bit_for_bit():
    x = random_rows(np.random.default_rng(1), 500, 256)
    data, scale = encode("float8_e4m3", x)
    tdata, tscale = encode_torch("float8_e4m3", torch.from_numpy(x))
    assert np.array_equal(data, storage_from_torch(tdata))
    assert np.array_equal(scale, storage_from_torch(tscale))


def test_fp8_codes_equal_torch_cast_of_the_scaled_block():
    x = random_rows(np.random.default_rng(2), 200, 64)
    data, scale = encode("float8_e4m3", x)
    s = np.exp2(scale.astype(np.float64) - 127).astype(np.float32)
    blocks = x.reshape(200, 2, 32) / s[..., None]
    assert np.array_equal(data, torch_e4m3(blocks).reshape(200, 64))


def test_fp8_scale_is_the_smallest_power_of_two_that_fits_the_block_max():
    x = random_rows(np.random.default_rng(3), 300, 128)
    _, scale = encode("float8_e4m3", x)
    amax = np.maximum(np.abs(x.reshape(300, 4, 32)).max(-1).astype(np.float64), np.float32(1e-4))
    s = np.exp2(scale.astype(np.float64) - 127)
    assert (amax <= 448 * s).all() and (amax > 224 * s).all()


@pytest.mark.parametrize("k", [-22, -7, 0, 1, 50, 119])
def test_fp8_scale_at_exact_power_of_two_boundaries(k):
    edge = np.float32(448 * 2.0**k)
    for amax, byte in [(edge, k + 127), (np.nextafter(edge, np.float32(np.inf)), k + 128)]:
        row = np.zeros((1, 32), np.float32)
        row[0, 5] = -amax
        assert encode("float8_e4m3", row)[1][0, 0] == byte
        tscale = encode_torch("float8_e4m3", torch.from_numpy(row))[1]
        assert storage_from_torch(tscale)[0, 0] == byte


def test_fp8_blocks_below_the_floor_use_the_floor_scale():
    row = np.zeros((1, 64), np.float32)
    row[0, 33] = 1e-7
    _, scale = encode("float8_e4m3", row)
    assert scale.tolist() == [[127 - 22, 127 - 22]]  # 448 * 2^-22 is the first >= 1e-4


def test_requantizing_dequantized_fp8_rows_gives_the_same_values():
    x = random_rows(np.random.default_rng(4), 400, 256)
    once = decode("float8_e4m3", *encode("float8_e4m3", x))
    twice = decode("float8_e4m3", *encode("float8_e4m3", once))
    assert np.array_equal(once, twice)


finite_rows = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])),
    elements=st.floats(-(2.0**120), 2.0**120, allow_nan=False, width=32))


@settings(max_examples=300, deadline=None)
@given(finite_rows)
def test_property_fp8_requantize_is_value_stable_and_twins_agree(x):
    data, scale = encode("float8_e4m3", x)
    once = decode("float8_e4m3", data, scale)
    assert np.array_equal(once, decode("float8_e4m3", *encode("float8_e4m3", once)))
    tdata, tscale = encode_torch("float8_e4m3", torch.from_numpy(x))
    assert np.array_equal(data, storage_from_torch(tdata))
    assert np.array_equal(scale, storage_from_torch(tscale))
    # error bound: half a step of E4M3's 3-bit mantissa, or half the subnormal step
    s = np.repeat(np.exp2(scale.astype(np.float64) - 127), 32, axis=1)
    err = np.abs(once.astype(np.float64) - x)
    assert (err <= np.maximum(np.abs(x) / 16, 2.0**-10 * s)).all()


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 3), st.just(64))),
       hnp.arrays(np.uint8, (3, 2), elements=st.integers(105, 200)))
def test_property_stored_fp8_rows_decode_alike_and_requantize_to_the_same_values(data, scale):
    data = np.where((data & 0x7F) == 0x7F, 0, data).astype(np.uint8)  # no NaN codes
    scale = scale[: len(data)]
    values = decode("float8_e4m3", data, scale)
    torch_values = decode_torch("float8_e4m3", storage_to_torch(data), scale_to_torch(scale))
    assert same_floats(values, torch_values.numpy())
    assert np.array_equal(values, decode("float8_e4m3", *encode("float8_e4m3", values)))


# --- row codecs: bfloat16, float16, float32 ---------------------------------------------------

def finite_f32_patterns(n: int, seed: int) -> np.ndarray:
    u = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    ties = (u & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exactly half a bf16 step
    x = np.concatenate([u, ties, ties + np.uint32(1), ties - np.uint32(1)]).view(np.float32)
    return x[np.isfinite(x) & (np.abs(x) < 3.38e38)]  # below bf16's overflow to inf


def test_bf16_encode_equals_torch_bitwise_including_ties():
    x = finite_f32_patterns(300_000, 5)
    data, scale = encode("bfloat16", x)
    ref = torch.from_numpy(x).to(torch.bfloat16)
    assert scale is None and np.array_equal(data, storage_from_torch(ref))
    twin = encode_torch("bfloat16", torch.from_numpy(x))[0]
    assert np.array_equal(data, storage_from_torch(twin))
    assert same_floats(decode("bfloat16", data), ref.float().numpy())


def test_f16_encode_equals_torch_including_subnormals_and_ties():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(300_000) * np.exp2(rng.uniform(-26, 14, 300_000))).astype(np.float32)
    x = x[np.abs(x) < 65504]
    grid = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
    x = np.concatenate([x, mids, -mids])
    data, _ = encode("float16", x)
    assert np.array_equal(data.view(np.uint16),
                          torch.from_numpy(x).to(torch.float16).view(torch.int16).numpy().view(
                              np.uint16))
    assert np.array_equal(data, storage_from_torch(encode_torch("float16", torch.from_numpy(x))[0]))


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_unscaled_decode_numpy_equals_torch_on_random_bit_patterns(name):
    d = row_dtype(name)
    raw = np.random.default_rng(7).integers(0, 256, (50, 32 * d.itemsize), dtype=np.uint8)
    data = raw.view(d.storage)
    assert same_floats(decode(name, data), decode_torch(name, storage_to_torch(data)).numpy())


def test_float64_input_is_rounded_to_float32_first():
    x = np.random.default_rng(8).standard_normal((4, 64))
    for name in ROW_DTYPES:
        a, b = encode(name, x), encode(name, x.astype(np.float32))
        assert np.array_equal(a[0], b[0])


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ROW_DTYPES))
def test_nan_and_inf_are_refused_by_both_backends(name):
    x = np.ones((2, 32), np.float32)
    x[1, 3], x[0, 0] = np.nan, np.inf
    with pytest.raises(BadInputError, match="2 non-finite value"):
        encode(name, x)
    with pytest.raises(BadInputError, match="2 non-finite value"):
        encode_torch(name, torch.from_numpy(x))


@pytest.mark.parametrize("name, big", [("float16", 65520.0), ("bfloat16", 3.4e38),
                                       ("float32", 1e39), ("float8_e4m3", 3.4028235e38)])
def test_values_that_would_round_to_inf_are_refused(name, big):
    x = np.full((1, 32), big, np.float64)
    with pytest.raises(BadInputError, match="too large for"):
        encode(name, x)
    with pytest.raises(BadInputError, match="too large for"):
        encode_torch(name, torch.from_numpy(x))


def test_fp8_width_must_be_a_multiple_of_32():
    with pytest.raises(BadInputError, match="divisible by 32"):
        encode("float8_e4m3", np.ones((1, 40), np.float32))


def test_decode_refuses_wrong_storage_and_missing_scales():
    with pytest.raises(BadInputError, match="bfloat16 rows are stored as uint16, got float32"):
        decode("bfloat16", np.ones((1, 4), np.float32))
    with pytest.raises(BadInputError, match="need their F8_E8M0 scales"):
        decode("float8_e4m3", np.ones((1, 32), np.uint8))
    with pytest.raises(BadInputError, match=r"scales must be uint8 of shape \(1, 2\)"):
        decode("float8_e4m3", np.ones((1, 64), np.uint8), np.ones((1, 1), np.uint8))
    with pytest.raises(BadInputError, match="no scales"):
        decode("float16", np.ones((1, 32), np.float16), np.ones((1, 1), np.uint8))


def test_docstring_examples_run():
    assert doctest.testmod(dtypes).failed == 0
