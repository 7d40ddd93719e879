#!/usr/bin/env python3
"""Writes the checkpoint fixtures the C++ reader tests check, with Python PyTorch and an
independent safetensors writer (json + struct, not metaload's code).

  make_checkpoints.py OUT_DIR

For every tensor a reader must return, OUT_DIR/expected/<file>/<tensor>.bin holds its bytes
(contiguous, little-endian), so the C++ side compares element by element.
"""
import json
import os
import struct
import sys

import zipfile

import torch

ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
            torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def raw_bytes(t):
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def write_safetensors(path, tensors, metadata=None):
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    blobs = []
    for name, t in tensors.items():
        b = raw_bytes(t)
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def expect(out, fixture, tensors):
    d = os.path.join(out, "expected", fixture)
    os.makedirs(d, exist_ok=True)
    for name, t in tensors.items():
        with open(os.path.join(d, name + ".bin"), "wb") as f:
            f.write(raw_bytes(t))


class Callback:
    """Stands for a pytorch_lightning object: a class the reader has never heard of."""

    def __init__(self):
        self.monitor = "val_loss"


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(1234)

    mixed = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 4, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f64": torch.randn(2, 3, generator=g).double(),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    write_safetensors(os.path.join(out, "mixed.safetensors"), mixed, {"format": "pt"})
    expect(out, "mixed.safetensors", mixed)

    # A torch.save state dict with the shapes real ones have: parameters, tied weights (one
    # storage, two keys), a view into the middle of a storage, and non-tensor entries.
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
    sd = {k: v for k, v in model.named_parameters()}  # Parameters, not plain tensors
    sd["tied.weight"] = sd["0.weight"]
    base = torch.arange(12, dtype=torch.float32)
    sd["view"] = base[3:9].view(2, 3)
    sd["steps"] = torch.tensor([7], dtype=torch.int64)
    sd["flags"] = torch.tensor([False, True])
    sd["half"] = torch.randn(5, generator=g).half()
    sd["bf16"] = torch.randn(5, generator=g).bfloat16()
    sd["version"] = 3
    sd["note"] = "not a tensor"
    torch.save(sd, os.path.join(out, "state_dict.pt"))
    expect(out, "state_dict.pt", {k: v for k, v in sd.items() if torch.is_tensor(v)})

    one = {"only": torch.randn(2, 2, generator=g)}  # one-entry dicts pickle with SETITEM
    torch.save(one, os.path.join(out, "one_entry.pt"))
    expect(out, "one_entry.pt", one)

    inner = {"model.diffusion_model.w": torch.randn(3, generator=g),
             "first_stage_model.b": torch.randn(2, generator=g).half()}
    ckpt = {"epoch": 3, "global_step": 1000, "state_dict": inner,
            "callbacks": {"cb": Callback()}, "hparams": {"lr": 1e-4}}
    torch.save(ckpt, os.path.join(out, "lightning.ckpt"))
    expect(out, "lightning.ckpt", inner)

    torch.save(model, os.path.join(out, "module.pt"))
    torch.save({"w": torch.randn(2, 3, generator=g).t()}, os.path.join(out, "transposed.pt"))
    torch.save({"w": torch.randn(2, generator=g)}, os.path.join(out, "legacy.pt"),
               _use_new_zipfile_serialization=False)
    torch.jit.script(torch.nn.Linear(3, 2)).save(os.path.join(out, "scripted.pt"))

    with zipfile.ZipFile(os.path.join(out, "plain.zip"), "w") as z:
        z.writestr("hello.txt", "a zip that is not a checkpoint")

    # A sharded Hugging Face directory.
    hf = os.path.join(out, "hf_sharded")
    os.makedirs(hf, exist_ok=True)
    shard_a = {"embed.weight": torch.randn(10, 4, generator=g), "layers.0.w": torch.randn(4, 4, generator=g)}
    shard_b = {"layers.1.w": torch.randn(4, 4, generator=g), "norm.weight": torch.ones(4)}
    write_safetensors(os.path.join(hf, "model-00001-of-00002.safetensors"), shard_a)
    write_safetensors(os.path.join(hf, "model-00002-of-00002.safetensors"), shard_b)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard_a}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in shard_b})
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump({"model_type": "toy", "hidden_size": 4}, f)
    expect(out, "hf_sharded", {**shard_a, **shard_b})
    print(json.dumps({"fixtures": sorted(os.listdir(out))}))


if __name__ == "__main__":
    main()
