#!/usr/bin/env python3
"""Write the first COUNT rows of little-endian .npy arrays as raw bytes, for the C tests.

Usage: npy_rows.py COUNT OUT.bin=IN.npy [OUT.bin=IN.npy ...]

The same files `sdk-c/tests/c_api.rs` writes for the host C tests (the C side has no
.npy parser). Standard library only: C-order arrays of little-endian dtypes, format
versions 1-3.
"""
import ast
import struct
import sys


def rows(path, count):
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        raise SystemExit(f"{path}: not a .npy file")
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", data, 8)
        start = 10
    elif major in (2, 3):
        (hlen,) = struct.unpack_from("<I", data, 8)
        start = 12
    else:
        raise SystemExit(f"{path}: unsupported .npy version {major}")
    header = ast.literal_eval(data[start : start + hlen].decode("latin1"))
    if header["fortran_order"] or header["descr"][0] not in "<|":
        raise SystemExit(f"{path}: need a C-order little-endian array, got {header}")
    body = data[start + hlen :]
    shape = header["shape"]
    if not shape or shape[0] < count:
        raise SystemExit(f"{path}: shape {shape} has fewer than {count} rows")
    row = len(body) // shape[0]
    return body[: count * row]


def main(argv):
    if len(argv) < 3:
        raise SystemExit(__doc__)
    count = int(argv[1])
    for pair in argv[2:]:
        out, src = pair.split("=", 1)
        with open(out, "wb") as f:
            f.write(rows(src, count))


if __name__ == "__main__":
    main(sys.argv)
