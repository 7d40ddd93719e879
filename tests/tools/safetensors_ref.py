#!/usr/bin/env python3
"""Independent reference checks for metaload's tests, written against the specs, not our C++.

  safetensors_ref.py dump FILE          JSON summary of a safetensors file (read with torch)
  safetensors_ref.py check-synth DIR    recomputes every weight of a `metaload synth` mlp
                                        checkpoint from its seed and compares bit for bit

Exit 0 on success, 1 with a message on stderr on any mismatch.
"""
import json
import math
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import float8_ref  # noqa: E402

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          # torch 1.13 has no float8: the bytes (float8_ref.py decodes them)
          "F8_E4M3": torch.uint8, "F8_E5M2": torch.uint8}
M64 = (1 << 64) - 1


def read_safetensors(path, dtype_names=None):
    """name -> tensor, the metadata, the header's size; `dtype_names` (a dict) gets each
    tensor's safetensors dtype."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n:]
    tensors = {}
    covered = 0
    for name, e in header.items():
        b, end = e["data_offsets"]
        dtype = DTYPES[e["dtype"]]
        if dtype_names is not None:
            dtype_names[name] = e["dtype"]
        if end > b:
            raw = torch.frombuffer(bytearray(body[b:end]), dtype=torch.uint8)
            t = raw.view(dtype).reshape(e["shape"])
        else:
            t = torch.empty(e["shape"], dtype=dtype)
        tensors[name] = t
        covered += end - b
    if covered != len(body):
        raise ValueError(f"{path}: tensors cover {covered} of {len(body)} data bytes")
    return tensors, meta, n


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def synth_values(seed, tensor, count, scale):
    base = splitmix64(seed ^ ((tensor << 40) & M64))
    out = []
    for i in range(count):
        bits = splitmix64((base + i) & M64)
        unit = (bits >> 11) * (1.0 / 9007199254740992.0)
        out.append((2.0 * unit - 1.0) * scale)
    return torch.tensor(out, dtype=torch.float64).to(torch.float32)


def check_synth(directory, seed=0):
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") != "mlp":
        raise ValueError("only mlp checkpoints are checked here")
    float8 = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}.get(config["torch_dtype"])
    dtype = torch.uint8 if float8 else {"float32": torch.float32, "float16": torch.float16,
                                        "bfloat16": torch.bfloat16}[config["torch_dtype"]]
    index_path = os.path.join(directory, "model.safetensors.index.json")
    tensors, names = {}, {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        for shard in sorted(set(weight_map.values())):
            t, _, _ = read_safetensors(os.path.join(directory, shard), names)
            for name in t:
                if weight_map.get(name) != shard:
                    raise ValueError(f"{name} is in {shard} but the index says {weight_map.get(name)}")
            tensors.update(t)
        if set(weight_map) != set(tensors):
            raise ValueError("index and shards disagree on the key set")
    else:
        tensors, _, _ = read_safetensors(os.path.join(directory, "model.safetensors"), names)
    sizes = config["layer_sizes"]
    expected_names = []
    for i in range(len(sizes) - 1):
        expected_names += [f"layers.{i}.weight", f"layers.{i}.bias"]
    if sorted(expected_names) != sorted(tensors):
        raise ValueError(f"keys {sorted(tensors)} != {sorted(expected_names)}")
    checked = 0
    for t_index, name in enumerate(expected_names):
        layer = t_index // 2
        fan_in, fan_out = sizes[layer], sizes[layer + 1]
        shape = [fan_out, fan_in] if name.endswith("weight") else [fan_out]
        t = tensors[name]
        # float8 checkpoints: the weights in float8, the biases (one dimension) float16.
        want_dtype = torch.float16 if float8 and len(shape) < 2 else dtype
        if list(t.shape) != shape or t.dtype != want_dtype:
            raise ValueError(f"{name}: {t.dtype} {list(t.shape)}, expected {want_dtype} {shape}")
        if float8 and len(shape) >= 2 and names[name] != float8:
            raise ValueError(f"{name}: stored as {names[name]}, expected {float8}")
        n = min(t.numel(), 4096)
        want = synth_values(seed, t_index, n, 1.0 / math.sqrt(fan_in))
        if want_dtype == torch.uint8:
            want = torch.from_numpy(float8_ref.encode(want.numpy(), config["torch_dtype"]))
        else:
            want = want.to(want_dtype)
        got = t.reshape(-1)[:n]
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].item()
            raise ValueError(f"{name}[{bad}] = {got[bad].item()}, expected {want[bad].item()}")
        checked += n
    return {"tensors": len(tensors), "checked_values": checked, "dtype": config["torch_dtype"]}


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        if sys.argv[1] == "dump":
            tensors, meta, n = read_safetensors(sys.argv[2])
            out = {"header_bytes": n, "metadata": meta, "tensors": {
                k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                    "sum": float(v.double().sum()) if v.numel() else 0.0}
                for k, v in tensors.items()}}
        elif sys.argv[1] == "check-synth":
            seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
            out = check_synth(sys.argv[2], seed)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Exception as e:  # a test failure, reported as one line
        print(f"safetensors_ref: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
