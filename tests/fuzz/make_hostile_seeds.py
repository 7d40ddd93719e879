#!/usr/bin/env python3
"""Writes the hostile seeds of tests/fuzz/corpus/{pickle,safetensors_header}: small versions of
the shapes whose memory once grew faster than their size (issue 17), so the fuzzers start from
them (run.sh's -max_len reaches them). Usage: tests/fuzz/make_hostile_seeds.py (from anywhere)."""
import json
import os
import struct

corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
SIZE = 64 << 10  # each seed; run.sh's -max_len is 128 KiB
PROTO = b"\x80\x02"


def write(target, name, data):
    assert len(data) < 100 << 10, name
    with open(os.path.join(corpus, target, name), "wb") as f:
        f.write(data)


def fill(head, unit, tail):
    return head + unit * ((SIZE - len(head) - len(tail)) // len(unit)) + tail


# REDUCE of a memoised class on a memoised tuple, again and again (each once copied the tuple).
tuple_8k = b"(" + b"N" * 8192 + b"tq\x00" + b"0" + b"c__main__\nX\nq\x01" + b"0"
write("pickle", "hostile_memo_reduce_chain", fill(PROTO + tuple_8k, b"h\x01h\x00R0", b"N."))
# REDUCE then APPEND onto the object: the shared argument run must be copied, and is charged.
write("pickle", "hostile_append_to_shared_args", fill(PROTO + tuple_8k, b"h\x01h\x00RNa0", b"N."))
# NONE flood (once ~110 bytes of memory per byte, kept after the failure).
write("pickle", "hostile_none_flood", fill(PROTO, b"N", b"."))
# EMPTY_LIST flood: distinct mutable values, more memory per byte than the bound allows.
write("pickle", "hostile_empty_list_flood", fill(PROTO, b"]", b"."))
# STACK_GLOBAL of two memoised 8 KiB strings: each 5-byte opcode makes a 16 KiB name.
big = b"X" + struct.pack("<I", 8192) + b"a" * 8192 + b"q\x00" + b"0"
write("pickle", "hostile_stack_global_memo", fill(PROTO + big, b"h\x00h\x00\x93" + b"0", b"N."))
# MARK flood and a DUP/MEMOIZE flood: the machine's own stacks.
write("pickle", "hostile_mark_flood", fill(PROTO, b"(", b"."))
write("pickle", "hostile_memoize_flood", fill(PROTO + b"N", b"\x94", b"."))


def safetensors(tensors, gap):
    header = {"__metadata__": {"format": "pt"}}
    at = 0
    for i in range(tensors):
        if gap and i + 1 == tensors:
            at += 4
        header[f"model.layers.{i}.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [at, at + 4]}
        at += 4
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * at


# Many small legal-looking entries (a 96 MB header of this shape once kept ~220 MB per thread).
write("safetensors_header", "hostile_many_tensors", safetensors(300, gap=False))
write("safetensors_header", "hostile_many_tensors_gap_at_end", safetensors(300, gap=True))
