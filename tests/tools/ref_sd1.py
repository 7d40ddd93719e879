#!/usr/bin/env python3
"""An independent Python reference for metaload's sd1 architecture: small Stable Diffusion 1.x
networks written the way ldm and transformers write them (nn.Module attributes give the real
LDM key names), random weights, the four entries run on fixed inputs.

  ref_sd1.py OUT_DIR [--ckpt] [--short-clip] [--ema] [--in-channels N]
             [--round DTYPE [--keep P,..]] [--store float16]

Writes OUT_DIR/model.safetensors (or OUT_DIR/model.ckpt, a torch.save of {"state_dict": ...}
like the original releases), OUT_DIR/<entry>.<input>.bin inputs and OUT_DIR/<entry>.out.bin
outputs (float32 or int64, row-major) with every shape in OUT_DIR/cases.json.
  --short-clip   text encoder keys without "text_model." (older transformers)
  --ema          adds model_ema.* keys, as unpruned checkpoints have
  --round DTYPE  outputs of the weights rounded as metaload stores them when it loads with dtype
                 DTYPE (prefixes P kept), computed in float32: ref_models.round_weights
  --store float16  writes the floating tensors as float16 (use with --round float16)
  --vae-files    also OUT_DIR/vae.safetensors (prefixed keys) and OUT_DIR/vae.ckpt (bare keys and
                 loss.logvar), the VAE alone as VAE files are shared
"""
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ref_models import round_weights, write_safetensors  # F32, F16, I64: an independent writer

# Small, with SD1's topology: 4 levels, attention on the first three, 8 heads.
UNET = dict(model_channels=32, mult=(1, 2, 2, 2), res_blocks=2, attention=(True, True, True, False),
            heads=8, context=128)
VAE = dict(ch=32, mult=(1, 2, 2, 2), res_blocks=1, z=4)
CLIP = dict(vocab=1000, positions=77, width=128, layers=2, heads=2, ffn=512)


# ---- UNet (ldm.modules.diffusionmodules.openaimodel) ----
class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(GroupNorm32(32, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb, context):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        h = self.heads
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, d = q.shape
        # b n (h d) -> (b h) n d
        q, k, v = (t.reshape(b, t.shape[1], h, d // h).permute(0, 2, 1, 3).reshape(b * h, t.shape[1], d // h)
                   for t in (q, k, v))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * (d // h) ** -0.5
        out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
        out = out.reshape(b, h, n, d // h).permute(0, 2, 1, 3).reshape(b, n, d)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch, heads, context_dim):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, heads, context_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, emb, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.reshape(b, c, h * w).transpose(1, 2)  # b c h w -> b (h w) c
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        return self.proj_out(y) + x


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb, context):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stem(nn.Conv2d):
    def forward(self, x, emb, context):
        return super().forward(x)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            x = layer(x, emb, context)
        return x


class UNetModel(nn.Module):
    # `transformer(ch, context, level)`: the attention layer of a level (None: the middle block's;
    # SD1's SpatialTransformer with `heads` heads by default; ref_sd2.py and ref_sdxl.py pass
    # theirs). `adm_in_channels`: sgm's label_emb for SDXL's class vector y.
    def __init__(self, in_channels, model_channels, mult, res_blocks, attention, heads, context, transformer=None,
                 adm_in_channels=0):
        super().__init__()
        transformer = transformer or (lambda ch, ctx, level: SpatialTransformer(ch, heads, ctx))
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb), nn.SiLU(),
                                                         nn.Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Stem(in_channels, model_channels, 3, padding=1))])
        chans, ch = [model_channels], model_channels
        for level, m in enumerate(mult):
            for _ in range(res_blocks):
                layers = [ResBlock(ch, m * model_channels, emb)]
                ch = m * model_channels
                if attention[level]:
                    layers.append(transformer(ch, context, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, ch, emb), transformer(ch, context, None),
                                                    ResBlock(ch, ch, emb))
        self.output_blocks = nn.ModuleList([])
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), model_channels * m, emb)]
                ch = model_channels * m
                if attention[level]:
                    layers.append(transformer(ch, context, level))
                if level and i == res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(ch, 4, 3, padding=1))

    def forward(self, x, timesteps, context, y=None):
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
        args = timesteps[:, None].float() * freqs[None]
        t_emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


# ---- AutoencoderKL (ldm.modules.diffusionmodules.model) ----
def Normalize(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm = Normalize(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        k = k.reshape(b, c, h * w)
        w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
        w_ = F.softmax(w_, dim=2)
        v = v.reshape(b, c, h * w)
        h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class Down(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


def middle(ch):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch, mult, res_blocks, z):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        in_mult = (1,) + tuple(mult)
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(ch * (in_mult[i] if r == 0 else m), ch * m)
                                         for r in range(res_blocks)])
            if i != len(mult) - 1:
                level.downsample = Down(ch * m)
            self.down.append(level)
        block_in = ch * mult[-1]
        self.mid = middle(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, mult, res_blocks, z):
        super().__init__()
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(z, block_in, 3, padding=1)
        self.mid = middle(block_in)
        self.up = nn.ModuleList()
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[i]))
                block_in = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            self.up.insert(0, level)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, ch, mult, res_blocks, z):
        super().__init__()
        self.encoder = Encoder(ch, mult, res_blocks, z)
        self.decoder = Decoder(ch, mult, res_blocks, z)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode_mean(self, x):
        return torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)[0]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


# ---- CLIP text model (transformers' CLIPTextTransformer) ----
class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, t, w = x.shape
        hd = w // self.heads
        shape = lambda y: y.view(b, t, self.heads, hd).transpose(1, 2)
        q, k, v = shape(self.q_proj(x) * hd ** -0.5), shape(self.k_proj(x)), shape(self.v_proj(x))
        scores = q @ k.transpose(-1, -2)
        causal = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)
        probs = (scores + causal).softmax(-1)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(b, t, w))


class CLIPLayer(nn.Module):
    def __init__(self, width, heads, ffn):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))


class CLIPTextTransformer(nn.Module):
    def __init__(self, vocab, positions, width, layers, heads, ffn):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(vocab, width)
        self.embeddings.position_embedding = nn.Embedding(positions, width)
        self.embeddings.register_buffer("position_ids", torch.arange(positions).expand((1, -1)))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([CLIPLayer(width, heads, ffn) for _ in range(layers)])
        self.final_layer_norm = nn.LayerNorm(width)

    def forward(self, ids):
        x = self.embeddings.token_embedding(ids)
        x = x + self.embeddings.position_embedding(self.embeddings.position_ids[:, :ids.shape[1]])
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


def schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    var = betas * (1.0 - prev) / (1.0 - ac)
    s = {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev,
         "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
         "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
         "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": var,
         "posterior_log_variance_clipped": var.clamp(min=1e-20).log(),
         "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - ac),
         "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - ac)}
    return {k: v.float() for k, v in s.items()}


def randomize(module, g):
    with torch.no_grad():
        for name, p in module.named_parameters():
            u = torch.rand(p.shape, generator=g) * 2 - 1
            if p.dim() >= 2:
                p.copy_(u / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * u)  # norms
            else:
                p.copy_(0.1 * u)


def main():
    out, flags = sys.argv[1], sys.argv[2:]
    in_channels = int(flags[flags.index("--in-channels") + 1]) if "--in-channels" in flags else 4
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(20261129)
    unet = UNetModel(in_channels, UNET["model_channels"], UNET["mult"], UNET["res_blocks"], UNET["attention"],
                     UNET["heads"], UNET["context"])
    vae = AutoencoderKL(VAE["ch"], VAE["mult"], VAE["res_blocks"], VAE["z"])
    clip = CLIPTextTransformer(**CLIP)
    clip_prefix = "cond_stage_model.transformer." + ("" if "--short-clip" in flags else "text_model.")
    extra = {}
    if "--ema" in flags:
        extra["model_ema.decay"] = torch.tensor(0.9999)
        extra["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int64)
    write_reference(out, flags, g, unet, vae, (clip_prefix, clip), in_channels, UNET["context"], CLIP["vocab"],
                    extra)


def write_reference(out, flags, g, unet, vae, text, in_channels, context, vocab, extra=None, tweak=None):
    """Randomizes the networks, writes the checkpoint (with the schedule and `extra` keys; `tweak(sd)` may
    change it before the networks take the values back), the inputs, the outputs and cases.json.
    `text`: (key prefix, text encoder module)."""
    text_prefix, text_encoder = text
    for m in (unet, vae, text_encoder):
        randomize(m, g)
        m.eval()
    sd = {}
    sd.update({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    sd.update({text_prefix + k: v for k, v in text_encoder.state_dict().items()})
    sd.update(schedule())
    if extra:
        sd.update(extra)
        if "--ema" in flags:
            sd["model_ema.diffusion_modelout2weight"] = sd["model.diffusion_model.out.2.weight"].clone()
    if tweak:
        tweak(sd)
    sd = {k: v.contiguous() for k, v in sd.items()}
    rounded = round_weights(sd, flags)
    if "--store" in flags:
        store = getattr(torch, flags[flags.index("--store") + 1])
        sd = {k: v.to(store) if v.is_floating_point() else v for k, v in rounded.items()}
    for prefix, m in (("model.diffusion_model.", unet), ("first_stage_model.", vae), (text_prefix, text_encoder)):
        m.load_state_dict({k[len(prefix):]: v for k, v in rounded.items() if k.startswith(prefix)})
    if "--ckpt" in flags:
        torch.save({"epoch": 1, "global_step": 1000, "state_dict": sd}, os.path.join(out, "model.ckpt"))
    else:
        write_safetensors(os.path.join(out, "model.safetensors"), sd)
    if "--vae-files" in flags:
        # The VAE alone, as VAE files are shared: vae.safetensors with the keys as the checkpoint
        # has them, vae.ckpt (a torch.save of {"state_dict": ...}) without the prefix and with the
        # training loss's key the released VAE files keep.
        vae_sd = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
        write_safetensors(os.path.join(out, "vae.safetensors"), vae_sd)
        bare = {k[len("first_stage_model."):]: v for k, v in vae_sd.items()}
        bare["loss.logvar"] = torch.zeros(())
        torch.save({"state_dict": bare}, os.path.join(out, "vae.ckpt"))

    b, hw = 2, 8
    inputs = {
        "unet": {"x": torch.randn(b, in_channels, hw, hw, generator=g),
                 "timesteps": torch.tensor([999, 17]),
                 "context": torch.randn(b, 77, context, generator=g)},
        "text_encoder": {"input_ids": torch.randint(0, vocab, (b, 77), generator=g)},
        "vae_decode": {"latents": torch.randn(1, 4, hw, hw, generator=g)},
        "vae_encode": {"image": torch.rand(1, 3, 8 * hw, 8 * hw, generator=g) * 2 - 1},
    }
    with torch.no_grad():
        outputs = {"unet": unet(**inputs["unet"]),
                   "text_encoder": text_encoder(inputs["text_encoder"]["input_ids"]),
                   "vae_decode": vae.decode(inputs["vae_decode"]["latents"]),
                   "vae_encode": vae.encode_mean(inputs["vae_encode"]["image"])}
    write_cases(out, inputs, outputs)
    print(json.dumps({"tensors": len(sd), "parameters": sum(v.numel() for v in sd.values())}))


def write_cases(out, inputs, outputs):
    """OUT/<case>.<input>.bin, OUT/<case>.out.bin and cases.json for each case: an entry's name, or
    "entry@output" for an output other than its first (the inputs are the entry's)."""
    cases = {}
    for entry, feed in inputs.items():
        cases[entry] = {"inputs": {}, "output": list(outputs[entry].shape)}
        for name, t in feed.items():
            with open(os.path.join(out, f"{entry}.{name}.bin"), "wb") as f:
                f.write(t.contiguous().numpy().tobytes())
            cases[entry]["inputs"][name] = {"shape": list(t.shape), "dtype": str(t.dtype).split(".")[1]}
        with open(os.path.join(out, f"{entry}.out.bin"), "wb") as f:
            f.write(outputs[entry].contiguous().float().numpy().tobytes())
    for case in outputs:
        if "@" in case:
            entry = case.split("@")[0]
            cases[case] = {"inputs": cases[entry]["inputs"], "output": list(outputs[case].shape)}
            with open(os.path.join(out, f"{case}.out.bin"), "wb") as f:
                f.write(outputs[case].contiguous().float().numpy().tobytes())
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main()
