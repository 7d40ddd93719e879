#!/usr/bin/env python3
"""Independent Python references for metaload's architectures, keyed by the Hugging Face names.

  ref_models.py ARCH OUT_DIR [--unprefixed] [--shards N] [--tied] [--round DTYPE [--keep P,..]]

Writes OUT_DIR/config.json and random weights as safetensors (sharded with an index when asked,
by an independent writer), then OUT_DIR/inputs.json (input_ids, attention_mask) and the
reference outputs OUT_DIR/expected.bin (float32, row-major) with their shape in
OUT_DIR/expected.json. ARCH: mlp, gpt2, llama. With --round, the outputs are those of the
weights rounded as metaload stores them under that dtype policy, computed in float32 (the
checkpoint itself stays float32).
"""
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import float8_ref  # noqa: E402

ST = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# The embedding tables of every architecture here: a float8 policy leaves them as stored.
EMBEDDINGS = ("wte.", "wpe.", "embed_tokens.", "token_embedding.", "position_embedding.")


def round_weights(sd, flags):
    """--round DTYPE [--keep P1,P2]: `sd` with every floating tensor rounded to DTYPE and back,
    except those under a kept prefix: the values metaload stores when it loads the checkpoint
    with dtype DTYPE and those prefixes kept. float8_e4m3fn / float8_e5m2 (float8_ref.py's
    codec) round the weights of matmuls and convolutions only: tensors of two or more
    dimensions that are not embedding tables."""
    if "--round" not in flags:
        return sd
    name = flags[flags.index("--round") + 1]
    keep = flags[flags.index("--keep") + 1].split(",") if "--keep" in flags else []

    def rounded(k, v):
        if not v.is_floating_point() or any(k.startswith(p) for p in keep):
            return v
        if name.startswith("float8"):
            if v.dim() < 2 or any(e in k for e in EMBEDDINGS):
                return v
            return torch.from_numpy(float8_ref.round_trip(v.float().numpy(), name)).to(v.dtype)
        return v.to(getattr(torch, name)).to(v.dtype)

    return {k: rounded(k, v) for k, v in sd.items()}


def save(out, sd, shards):
    names = list(sd)
    if shards <= 1:
        write_safetensors(os.path.join(out, "model.safetensors"), sd)
        return
    weight_map = {}
    for s in range(shards):
        part = names[s * len(names) // shards:(s + 1) * len(names) // shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(out, fname), {k: sd[k] for k in part})
        weight_map.update({k: fname for k in part})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def rand(g, *shape, scale=None):
    fan_in = shape[-1] if scale is None else None
    s = scale if scale is not None else 1.0 / math.sqrt(fan_in)
    return (torch.rand(*shape, generator=g) * 2 - 1) * s


def norm_weight(g, n):
    return 1.0 + 0.1 * (torch.rand(n, generator=g) * 2 - 1)


def causal_attention(q, k, v, mask):
    # q, k, v: [B, H, T, hd]; mask: [B, T] of 1/0 or None
    low = torch.finfo(torch.float32).min
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, low)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], low)
    return scores.softmax(-1) @ v


def make_mlp(g, cfg):
    s = cfg["layer_sizes"]
    sd = {}
    for i in range(len(s) - 1):
        sd[f"layers.{i}.weight"] = rand(g, s[i + 1], s[i])
        sd[f"layers.{i}.bias"] = rand(g, s[i + 1], scale=0.1)
    return sd


def run_mlp(sd, cfg, x):
    n = len(cfg["layer_sizes"]) - 1
    for i in range(n):
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
        if i + 1 < n:
            x = F.gelu(x)
    return x


def make_gpt2(g, cfg, prefix):
    n, v, p = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    sd = {prefix + "wte.weight": rand(g, v, n, scale=0.5), prefix + "wpe.weight": rand(g, p, n, scale=0.1)}
    for i in range(cfg["n_layer"]):
        h = f"{prefix}h.{i}."
        sd.update({h + "ln_1.weight": norm_weight(g, n), h + "ln_1.bias": rand(g, n, scale=0.1),
                   h + "attn.c_attn.weight": rand(g, n, 3 * n, scale=n ** -0.5),
                   h + "attn.c_attn.bias": rand(g, 3 * n, scale=0.1),
                   h + "attn.c_proj.weight": rand(g, n, n, scale=n ** -0.5),
                   h + "attn.c_proj.bias": rand(g, n, scale=0.1),
                   h + "ln_2.weight": norm_weight(g, n), h + "ln_2.bias": rand(g, n, scale=0.1),
                   h + "mlp.c_fc.weight": rand(g, n, 4 * n, scale=n ** -0.5),
                   h + "mlp.c_fc.bias": rand(g, 4 * n, scale=0.1),
                   h + "mlp.c_proj.weight": rand(g, 4 * n, n, scale=(4 * n) ** -0.5),
                   h + "mlp.c_proj.bias": rand(g, n, scale=0.1)})
    sd[prefix + "ln_f.weight"] = norm_weight(g, n)
    sd[prefix + "ln_f.bias"] = rand(g, n, scale=0.1)
    return sd


def run_gpt2(sd, cfg, ids, mask):
    p = "transformer." if "transformer.wte.weight" in sd else ""
    n, heads, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    b, t = ids.shape
    x = sd[p + "wte.weight"][ids] + sd[p + "wpe.weight"][torch.arange(t)]
    split = lambda y: y.view(b, t, heads, n // heads).transpose(1, 2)
    for i in range(cfg["n_layer"]):
        h = f"{p}h.{i}."
        y = F.layer_norm(x, (n,), sd[h + "ln_1.weight"], sd[h + "ln_1.bias"], eps)
        q, k, v = (y @ sd[h + "attn.c_attn.weight"] + sd[h + "attn.c_attn.bias"]).split(n, -1)
        a = causal_attention(split(q), split(k), split(v), mask).transpose(1, 2).reshape(b, t, n)
        x = x + a @ sd[h + "attn.c_proj.weight"] + sd[h + "attn.c_proj.bias"]
        y = F.layer_norm(x, (n,), sd[h + "ln_2.weight"], sd[h + "ln_2.bias"], eps)
        y = F.gelu(y @ sd[h + "mlp.c_fc.weight"] + sd[h + "mlp.c_fc.bias"], approximate="tanh")
        x = x + y @ sd[h + "mlp.c_proj.weight"] + sd[h + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (n,), sd[p + "ln_f.weight"], sd[p + "ln_f.bias"], eps)
    return x @ sd[p + "wte.weight"].T


def make_llama(g, cfg):
    hs, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = hs // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    sd = {"model.embed_tokens.weight": rand(g, v, hs, scale=0.5)}
    for i in range(cfg["num_hidden_layers"]):
        l = f"model.layers.{i}."
        sd.update({l + "input_layernorm.weight": norm_weight(g, hs),
                   l + "self_attn.q_proj.weight": rand(g, hs, hs), l + "self_attn.k_proj.weight": rand(g, kv, hs),
                   l + "self_attn.v_proj.weight": rand(g, kv, hs), l + "self_attn.o_proj.weight": rand(g, hs, hs),
                   l + "post_attention_layernorm.weight": norm_weight(g, hs),
                   l + "mlp.gate_proj.weight": rand(g, inter, hs), l + "mlp.up_proj.weight": rand(g, inter, hs),
                   l + "mlp.down_proj.weight": rand(g, hs, inter)})
    sd["model.norm.weight"] = norm_weight(g, hs)
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = rand(g, v, hs)
    return sd


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def run_llama(sd, cfg, ids, mask):
    hs, heads, kvh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = hs // heads, cfg["rms_norm_eps"]
    b, t = ids.shape
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = lambda y: torch.cat([-y[..., hd // 2:], y[..., :hd // 2]], -1)
    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        l = f"model.layers.{i}."
        y = rms(x, sd[l + "input_layernorm.weight"], eps)
        q = (y @ sd[l + "self_attn.q_proj.weight"].T).view(b, t, heads, hd).transpose(1, 2)
        k = (y @ sd[l + "self_attn.k_proj.weight"].T).view(b, t, kvh, hd).transpose(1, 2)
        v = (y @ sd[l + "self_attn.v_proj.weight"].T).view(b, t, kvh, hd).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(heads // kvh, 1), v.repeat_interleave(heads // kvh, 1)
        a = causal_attention(q, k, v, mask).transpose(1, 2).reshape(b, t, hs)
        x = x + a @ sd[l + "self_attn.o_proj.weight"].T
        y = rms(x, sd[l + "post_attention_layernorm.weight"], eps)
        gate = F.silu(y @ sd[l + "mlp.gate_proj.weight"].T)
        x = x + (gate * (y @ sd[l + "mlp.up_proj.weight"].T)) @ sd[l + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"], eps)
    head = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return x @ head.T


def main():
    arch, out = sys.argv[1], sys.argv[2]
    flags = sys.argv[3:]
    shards = int(flags[flags.index("--shards") + 1]) if "--shards" in flags else 1
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(20261129)
    inputs = {}
    with torch.no_grad():
        if arch == "mlp":
            cfg = {"model_type": "mlp", "layer_sizes": [12, 24, 24, 5], "activation": "gelu"}
            sd = make_mlp(g, cfg)
            x = torch.randn(3, 12, generator=g)
            inputs = {"input": x.tolist()}
            y = run_mlp(round_weights(sd, flags), cfg, x)
        else:
            if arch == "gpt2":
                cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32,
                       "n_layer": 2, "n_head": 4, "n_positions": 16, "vocab_size": 97,
                       "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
                sd = make_gpt2(g, cfg, "" if "--unprefixed" in flags else "transformer.")
                run = run_gpt2
            else:
                cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                       "intermediate_size": 56, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                       "max_position_embeddings": 16, "vocab_size": 97,
                       "tie_word_embeddings": "--tied" in flags}
                sd = make_llama(g, cfg)
                run = run_llama
            ids = torch.randint(0, cfg["vocab_size"], (2, 7), generator=g)
            mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
            inputs = {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
            y = run(round_weights(sd, flags), cfg, ids, mask)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f)
        save(out, sd, shards)
    with open(os.path.join(out, "inputs.json"), "w") as f:
        json.dump(inputs, f)
    with open(os.path.join(out, "expected.bin"), "wb") as f:
        f.write(y.contiguous().float().numpy().tobytes())
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"shape": list(y.shape), "max_abs": float(y.abs().max())}, f)
    print(json.dumps({"arch": arch, "shape": list(y.shape)}))


if __name__ == "__main__":
    main()
