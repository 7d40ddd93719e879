#!/usr/bin/env python3
"""An independent float8 (OCP E4M3 "fn" and E5M2) codec with numpy bit operations, for the tests.

torch 1.13 has no float8 type, so metaload's tests hold its C++ codec (server/core/float8.h) to
this one: round to nearest, ties to even, on the float32 bit pattern (integer shifts and masks,
not the C++ code's float-addition trick); finite overflow and +-inf saturate to the largest
finite value (E5M2 keeps infinities); NaN stays NaN (0x7f with the sign).

  float8_ref.py OUT_DIR   writes OUT_DIR/source.safetensors (F32, F16 and BF16 tensors with
                          the formats' edge cases) and OUT_DIR/expected.safetensors (U8: the
                          float8 bytes of each, "<name>.e4m3" and "<name>.e5m2").
"""
import json
import os
import struct
import sys

import numpy as np

FORMATS = {
    # name: (mantissa bits, bias, largest finite code, has infinity)
    "float8_e4m3fn": (3, 7, 0x7E, False),
    "float8_e5m2": (2, 15, 0x7B, True),
}


def encode(values, fmt):
    """float32 array -> uint8 array of float8 codes."""
    mantissa, bias, max_code, has_inf = FORMATS[fmt]
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)
    sign = (bits >> 24) & 0x80
    absbits = bits & 0x7FFFFFFF
    exponent = (absbits >> 23) - 127  # unbiased float32 exponent (-127 for zero/subnormal)
    frac = (absbits & 0x7FFFFF) | np.where(absbits >= 0x800000, 0x800000, 0)  # 24-bit significand
    exponent = np.where(absbits >= 0x800000, exponent, -126)
    # The float8 code counts steps of 2^(e_min - mantissa) below the smallest normal and of
    # 2^(e - mantissa) above it: shift the significand right by the difference, rounding the
    # dropped bits half to even.
    emin = 1 - bias
    e8 = np.maximum(exponent, emin)
    shift = 23 - mantissa + (e8 - exponent)
    shift = np.minimum(shift, 40)
    kept = frac >> shift
    dropped = frac & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))
    kept = kept + up
    # kept is 1.m (with the implicit bit) for normals and 0.m for subnormals.
    code = np.where(kept >= (1 << mantissa), ((e8 + bias) << mantissa) + kept - (1 << mantissa),
                    kept)
    code = np.minimum(code, max_code)
    is_inf = absbits == 0x7F800000
    is_nan = absbits > 0x7F800000
    if has_inf:
        code = np.where(is_inf, 0x7C, code)
    code = np.where(is_nan, 0x7F, code)
    return (code | sign).astype(np.uint8)


def decode(codes, fmt):
    """uint8 array of float8 codes -> float32 values (exact)."""
    mantissa, bias, _, has_inf = FORMATS[fmt]
    c = np.asarray(codes, dtype=np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e = (c & 0x7F) >> mantissa
    m = c & ((1 << mantissa) - 1)
    value = np.where(e == 0, np.ldexp(m.astype(np.float64), 1 - bias - mantissa),
                     np.ldexp(((1 << mantissa) + m).astype(np.float64), e - bias - mantissa))
    value = sign * value
    top = 0x7F >> mantissa
    if has_inf:
        value = np.where((e == top) & (m == 0), sign * np.inf, value)
        value = np.where((e == top) & (m != 0), np.nan, value)
    else:
        value = np.where((c & 0x7F) == 0x7F, np.nan, value)
    return value.astype(np.float32)


def round_trip(values, fmt):
    """float32 array -> the float32 values of its float8 codes."""
    return decode(encode(values, fmt), fmt)


ST = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint8): "U8"}


def write_safetensors(path, tensors):
    """name -> (safetensors dtype, shape, raw bytes)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def edge_values():
    """float32 values around every boundary of both formats, plus random ones."""
    v = [0.0, -0.0, 1.0, -1.0, 1.0625, 1.1875, 1.125, 1.375, 448.0, 449.0, 464.0, 480.0, 1e9,
         -1e9, np.inf, -np.inf, np.nan, 57344.0, 61440.0, 65536.0, 3.4e38]
    for e in range(-20, -4):
        for k in (1.0, 1.5, 1.25, 1.75, 0.75, 3.0):
            v += [k * 2.0 ** e, -k * 2.0 ** e]
    rng = np.random.default_rng(7)
    v += list(rng.standard_normal(3000) * np.exp2(rng.integers(-18, 17, 3000)))
    a = np.array(v, dtype=np.float32)
    return a[: len(a) // 64 * 64]


def main(out):
    np.seterr(over="ignore", invalid="ignore")  # the edge cases overflow float16 on purpose
    os.makedirs(out, exist_ok=True)
    base = edge_values()
    sources = {
        "f32.weight": (base, "F32"),
        "f16.weight": (base.astype(np.float16).astype(np.float32), "F16"),
        # bfloat16: the top half of float32, rounded to nearest even on the bit pattern.
        "bf16.weight": (None, "BF16"),
    }
    b = base.view(np.uint32).astype(np.uint64)
    bf = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    bf = np.where(np.isnan(base), np.uint16(0x7FC0), bf)
    sources["bf16.weight"] = ((bf.astype(np.uint32) << 16).view(np.float32), "BF16")
    rows = base.size // 64
    src, expected = {}, {}
    for name, (values, st) in sources.items():
        if st == "F32":
            raw = values.astype(np.float32).tobytes()
        elif st == "F16":
            raw = values.astype(np.float16).tobytes()
        else:
            raw = bf.tobytes()
        src[name] = (st, (rows, 64), raw)
        for fmt, suffix in (("float8_e4m3fn", "e4m3"), ("float8_e5m2", "e5m2")):
            expected[f"{name}.{suffix}"] = ("U8", (rows, 64), encode(values, fmt).tobytes())
    write_safetensors(os.path.join(out, "source.safetensors"), src)
    write_safetensors(os.path.join(out, "expected.safetensors"), expected)


if __name__ == "__main__":
    main(sys.argv[1])
