#!/usr/bin/env python3
"""Rebuilds tests/data/ from the project's fixtures folder, as MANIFEST says (stdlib only).

    tests/data/refresh.py [FIXTURES]

FIXTURES defaults to $SDCAP_FIXTURES, else the project's fixtures folder: `fixtures` inside the first
folder named `shared` found beside the crate or above it.
Refreshes each data folder of the workspace that has a MANIFEST: tests/data/ and quant/tests/data/.
Every file of such a folder except MANIFEST, README.md and this script is deleted and written again, so
the folder holds exactly what MANIFEST names. See README.md for the MANIFEST syntax and the .delta format.
"""

import fnmatch
import hashlib
import json
import os
import shutil
import struct
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
CRATE = os.path.dirname(os.path.dirname(HERE))
DATA_DIRS = [HERE, os.path.join(CRATE, "quant", "tests", "data")]
KEEP = {"MANIFEST", "README.md", "refresh.py"}
DELTA_FORMAT = "sdcap test-data delta 1"
OPTIONS = ("from", "delta", "keys", "skip", "rows", "ids")
# What a dropped row of a `rows=` table holds: float32 quiet NaN (0x7fc00000, little-endian), so that a
# test which looks such a row up gets non-finite numbers instead of plausible wrong ones.
NAN32 = struct.pack("<I", 0x7FC00000)
# The shortest run of NAN32 words a delta stores as a `fill` segment rather than literally.
MIN_FILL = 16 * len(NAN32)


def die(msg):
    sys.exit(f"refresh: {msg}")


def fixtures_dir(argv):
    if len(argv) > 1:
        return argv[1]
    if os.environ.get("SDCAP_FIXTURES"):
        return os.environ["SDCAP_FIXTURES"]
    d = CRATE
    while True:
        cand = os.path.join(d, "shared", "fixtures")
        if os.path.isdir(cand):
            return cand
        parent = os.path.dirname(d)
        if parent == d:
            die("no fixtures folder: pass it or set SDCAP_FIXTURES")
        d = parent


# ---- containers: where each tensor's bytes lie -------------------------------------------------


def safetensors_parts(b):
    """(header, {name: (dtype, shape, start, end)}) with absolute byte ranges."""
    (n,) = struct.unpack_from("<Q", b, 0)
    header = json.loads(b[8 : 8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[k] = (v["dtype"], v["shape"], 8 + n + s, 8 + n + e)
    return header, out


# ggml type -> (block elements, block bytes), for the types the fixtures use.
GGML_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 30: (1, 2)}


def gguf_ranges(b):
    """Absolute (start, end) of every tensor's data in a GGUF file."""
    p = 4
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def rd(fmt):
        nonlocal p
        v = struct.unpack_from("<" + fmt, b, p)[0]
        p += struct.calcsize("<" + fmt)
        return v

    def rstr():
        nonlocal p
        n = rd("Q")
        p += n
        return b[p - n : p].decode("utf-8", "replace")

    def rval(t):
        if t == 8:
            return rstr()
        if t == 9:
            at, n = rd("I"), rd("Q")
            return [rval(at) for _ in range(n)]
        return rd(scalar[t])

    if b[:4] != b"GGUF":
        die("not a GGUF file")
    rd("I")
    n_tensors, n_kv = rd("Q"), rd("Q")
    meta = {}
    for _ in range(n_kv):
        k = rstr()
        meta[k] = rval(rd("I"))
    infos = []
    for _ in range(n_tensors):
        rstr()
        dims = [rd("Q") for _ in range(rd("I"))]
        ty, off = rd("I"), rd("Q")
        infos.append((dims, ty, off))
    align = meta.get("general.alignment", 32)
    start = (p + align - 1) // align * align
    ranges = []
    for dims, ty, off in infos:
        if ty not in GGML_SIZES:
            continue
        per, size = GGML_SIZES[ty]
        count = 1
        for d in dims:
            count *= d
        ranges.append((start + off, start + off + count // per * size))
    return ranges


def tensor_ranges(path, b):
    if b[:4] == b"GGUF":
        return gguf_ranges(b)
    if path.endswith(".safetensors"):
        return [(s, e) for (_, _, s, e) in safetensors_parts(b)[1].values()]
    die(f"{path}: delta= needs a .safetensors or .gguf file")


# ---- entries -----------------------------------------------------------------------------------


def read_base(base):
    """A base file's bytes: `base` (relative to the crate root), or, where the crate holds `base.delta`
    instead (a file of tests/data stored as a delta, written earlier in MANIFEST), its rebuild."""
    path = os.path.join(CRATE, base)
    if not os.path.isfile(path) and os.path.isfile(path + ".delta"):
        return rebuild(path + ".delta")
    return open(path, "rb").read()


def write_delta(b, src, dst, bases):
    """dst + '.delta': the bytes `b` (of `src`, perhaps with rows dropped) as literal bytes, runs of
    NAN32 and byte ranges of the base files (paths relative to the crate root), found by matching whole
    tensors of `b` against the tensors of the bases."""
    index = {}
    for base in bases:
        bb = read_base(base)
        for s, e in tensor_ranges(base, bb):
            index.setdefault((e - s, hashlib.sha256(bb[s:e]).digest()), (base, s))
    segments, literal = [], bytearray()
    pos = 0

    def literal_bytes(start, end):
        if end > start:
            if segments and "literal" in segments[-1]:
                segments[-1]["literal"][1] += end - start
            else:
                segments.append({"literal": [len(literal), end - start]})
            literal.extend(b[start:end])

    def lit(upto):
        # Literal bytes, but runs of at least MIN_FILL bytes of NAN32 (dropped rows) as fill segments.
        start = pos
        while start < upto:
            run = b.find(NAN32 * (MIN_FILL // len(NAN32)), start, upto)
            if run < 0:
                break
            end = run + MIN_FILL
            while end + len(NAN32) <= upto and b[end : end + len(NAN32)] == NAN32:
                end += len(NAN32)
            literal_bytes(start, run)
            segments.append({"fill": NAN32.hex(), "len": end - run})
            start = end
        literal_bytes(start, upto)

    for s, e in sorted(tensor_ranges(src, b)):
        hit = index.get((e - s, hashlib.sha256(b[s:e]).digest())) if e > s else None
        if hit is None or s < pos:
            continue
        lit(s)
        segments.append({"base": hit[0], "at": hit[1], "len": e - s})
        pos = e
    lit(len(b))
    header = {
        "format": DELTA_FORMAT,
        "size": len(b),
        "crc32": zlib.crc32(b),
        "segments": segments,
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(dst + ".delta", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(literal))
    # Check: the delta rebuilds the source exactly (the tests check size and CRC-32 again).
    if rebuild(dst + ".delta") != b:
        die(f"{dst}.delta does not rebuild {src}")
    fills = sum(s["len"] for s in segments if "fill" in s)
    if fills:
        print(f"{dst}.delta: {fills:,} bytes of dropped rows (NaN)")


def rebuild(delta):
    d = open(delta, "rb").read()
    (n,) = struct.unpack_from("<Q", d, 0)
    header = json.loads(d[8 : 8 + n])
    lit = d[8 + n :]
    out = bytearray()
    for seg in header["segments"]:
        if "literal" in seg:
            at, length = seg["literal"]
            out += lit[at : at + length]
        elif "fill" in seg:
            pattern = bytes.fromhex(seg["fill"])
            out += (pattern * (seg["len"] // len(pattern) + 1))[: seg["len"]]
        else:
            out += read_base(seg["base"])[seg["at"] : seg["at"] + seg["len"]]
    return bytes(out)


def token_ids(files, fixtures):
    """Every token id the files hold: the integer tensors of a .safetensors file, every integer of a list
    in a .json file (paths relative to the fixtures folder)."""
    ids = set()
    for rel in files:
        path = os.path.join(fixtures, rel)
        if not os.path.isfile(path):
            die(f"ids= {path} is not a file")
        if rel.endswith(".safetensors"):
            b = open(path, "rb").read()
            for dtype, _, s, e in safetensors_parts(b)[1].values():
                fmt = {"I64": "q", "I32": "i"}.get(dtype)
                if fmt:
                    ids.update(struct.unpack(f"<{(e - s) // struct.calcsize(fmt)}{fmt}", b[s:e]))
        elif rel.endswith(".json"):

            def walk(v, in_list):
                if isinstance(v, list):
                    for x in v:
                        walk(x, True)
                elif isinstance(v, dict):
                    for x in v.values():
                        walk(x, False)
                elif in_list and isinstance(v, int) and not isinstance(v, bool):
                    ids.add(v)

            walk(json.load(open(path)), False)
        else:
            die(f"ids= {rel}: a .safetensors or .json file")
    return ids


def drop_rows(b, src, tables, ids):
    """`b` (a .safetensors file) with every row of the float32 tables whose index is not in `ids` set to
    NAN32."""
    _, parts = safetensors_parts(b)
    out = bytearray(b)
    for name in tables:
        if name not in parts:
            die(f"{src}: no tensor {name} (rows=)")
        dtype, shape, s, e = parts[name]
        if dtype != "F32" or len(shape) != 2:
            die(f"{src}: rows= needs a 2-D F32 tensor, {name} is {dtype} {shape}")
        rows, row = shape[0], (e - s) // shape[0]
        bad = sorted(i for i in ids if not 0 <= i < rows)
        if bad:
            die(f"{src}: token ids {bad[:5]} outside {name}'s {rows} rows")
        for i in range(rows):
            if i not in ids:
                out[s + i * row : s + (i + 1) * row] = NAN32 * (row // 4)
        print(f"{src}: {name}: {len(ids)} of {rows} rows kept")
    return bytes(out)


def write_subset(src, dst, patterns):
    """A safetensors file with only the keys matching `patterns` (names or globs; same dtypes, shapes
    and bytes, in the file's order)."""
    b = open(src, "rb").read()
    header, parts = safetensors_parts(b)
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in parts)]
    if missing:
        die(f"{src}: no keys {missing}")
    keys = [k for k in parts if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    new, data = {}, bytearray()
    if "__metadata__" in header:
        new["__metadata__"] = header["__metadata__"]
    for k in keys:
        dtype, shape, s, e = parts[k]
        new[k] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + e - s]}
        data += b[s:e]
    raw = json.dumps(new, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(data))


def parse_manifest(data):
    entries = []
    for no, line in enumerate(open(os.path.join(data, "MANIFEST")), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        path, *opts = line.split()
        entry = {"path": path, "line": no}
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep or key not in OPTIONS:
                die(f"MANIFEST line {no}: unknown option {opt!r}")
            entry[key] = value.split(",") if key != "from" else value
        if ("rows" in entry) != ("ids" in entry):
            die(f"MANIFEST line {no}: rows= and ids= go together")
        entries.append(entry)
    return entries


def files_of(entry, fixtures):
    """(source, destination relative to tests/data) pairs of one manifest entry."""
    src = os.path.normpath(os.path.join(fixtures, entry.get("from", entry["path"])))
    rel = entry["path"].rstrip("/")
    if entry["path"].endswith("/"):
        if not os.path.isdir(src):
            die(f"MANIFEST line {entry['line']}: {src} is not a folder")
        pairs = []
        for root, _, names in os.walk(src):
            for name in sorted(names):
                if any(fnmatch.fnmatch(name, g) for g in entry.get("skip", [])):
                    continue
                full = os.path.join(root, name)
                pairs.append((full, os.path.join(rel, os.path.relpath(full, src))))
        return sorted(pairs, key=lambda p: p[1])
    if not os.path.isfile(src):
        die(f"MANIFEST line {entry['line']}: {src} is not a file")
    return [(src, rel)]


def refresh(data, fixtures):
    entries = parse_manifest(data)
    for name in os.listdir(data):
        if name not in KEEP:
            full = os.path.join(data, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    for entry in entries:
        for src, rel in files_of(entry, fixtures):
            dst = os.path.join(data, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if "delta" in entry or "rows" in entry:
                b = open(src, "rb").read()
                if "rows" in entry:
                    b = drop_rows(b, src, entry["rows"], token_ids(entry["ids"], fixtures))
                write_delta(b, src, dst, entry.get("delta", []))
            elif "keys" in entry:
                write_subset(src, dst, entry["keys"])
            else:
                shutil.copyfile(src, dst)
                shutil.copymode(src, dst)
    sizes = {}
    for root, _, names in os.walk(data):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), data)
            top = rel.split(os.sep)[0] if os.sep in rel else "."
            sizes[top] = sizes.get(top, 0) + os.path.getsize(os.path.join(root, name))
    print(os.path.relpath(data, CRATE))
    for top, size in sorted(sizes.items()):
        print(f"{size:>12,}  {top}")
    print(f"{sum(sizes.values()):>12,}  total")


def main():
    fixtures = fixtures_dir(sys.argv)
    for data in DATA_DIRS:
        if os.path.isfile(os.path.join(data, "MANIFEST")):
            refresh(data, fixtures)


if __name__ == "__main__":
    main()
