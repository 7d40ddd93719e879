#!/usr/bin/env python3
"""An independent Python reference for metaload's sd2 architecture: small Stable Diffusion 2.x
networks written the way ldm (SD2's openaimodel with use_linear_in_transformer and
num_head_channels) and open_clip (the text tower as SD2's FrozenOpenCLIPEmbedder holds it) write
them, so nn.Module attributes give the real keys; random weights; the four entries on fixed
inputs. The UNet and VAE blocks are ref_sd1.py's (ldm shares them); the output is as ref_sd1.py's.

  ref_sd2.py OUT_DIR [--in-channels N] [--v] [--round DTYPE [--keep P,..]] [--store float16]
             [--vae-files]

  --v   the last output block's norm1 bias drawn wider (population std about 0.17, above the
        0.09 that tells a v-prediction file; the default draw has about 0.058)
"""
import math
import os
import sys
from collections import OrderedDict

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_sd1  # noqa: E402
from ref_sd1 import BasicTransformerBlock  # noqa: E402

# Small, with SD2's topology: 4 levels, attention on the first three, heads of 64 channels (so 1
# and 2 heads at 64 and 128 channels), linear projections in the transformers.
UNET = dict(model_channels=64, mult=(1, 2, 2, 2), res_blocks=2, attention=(True, True, True, False),
            head_channels=64, context=128)
VAE = dict(ch=32, mult=(1, 2, 2, 2), res_blocks=1, z=4)
TEXT = dict(vocab=1000, positions=77, width=128, layers=3, heads=2, ffn=512)


# ---- SD2's SpatialTransformer (ldm.modules.attention, use_linear=True) ----
class SpatialTransformer(nn.Module):
    def __init__(self, ch, heads, context_dim, depth=1):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, emb, context):
        b, c, h, w = x.shape
        y = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # b c h w -> b (h w) c
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y)
        return y.transpose(1, 2).reshape(b, c, h, w) + x


# ---- open_clip's text tower (open_clip.model.CLIP without its visual tower) ----
class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, ffn):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, ffn)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(ffn, width))]))

    def forward(self, x, attn_mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, ffn):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, ffn) for _ in range(layers)])


class OpenCLIPText(nn.Module):
    def __init__(self, vocab, positions, width, layers, heads, ffn):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(positions, width))
        self.transformer = Transformer(width, layers, heads, ffn)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, width))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.register_buffer("attn_mask", torch.empty(positions, positions).fill_(float("-inf")).triu_(1),
                             persistent=False)

    # FrozenOpenCLIPEmbedder.encode_with_transformer, layer="penultimate": every resblock but the
    # last, then ln_final.
    def forward(self, ids):
        t = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:t]
        x = x.permute(1, 0, 2)  # NLD -> LND
        for i, r in enumerate(self.transformer.resblocks):
            if i == len(self.transformer.resblocks) - 1:
                break
            x = r(x, attn_mask=self.attn_mask[:t, :t])
        return self.ln_final(x.permute(1, 0, 2))


def main():
    out, flags = sys.argv[1], sys.argv[2:]
    in_channels = int(flags[flags.index("--in-channels") + 1]) if "--in-channels" in flags else 4
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(20261202)
    u = UNET
    unet = ref_sd1.UNetModel(in_channels, u["model_channels"], u["mult"], u["res_blocks"], u["attention"], None,
                             u["context"],
                             transformer=lambda ch, ctx, level: SpatialTransformer(ch, ch // u["head_channels"], ctx))
    vae = ref_sd1.AutoencoderKL(VAE["ch"], VAE["mult"], VAE["res_blocks"], VAE["z"])
    text = OpenCLIPText(**TEXT)
    last = len(unet.output_blocks) - 1
    key = f"model.diffusion_model.output_blocks.{last}.1.transformer_blocks.0.norm1.bias"

    def tweak(sd):
        if "--v" in flags:
            sd[key] = (torch.rand(sd[key].shape, generator=g) * 2 - 1) * 0.3
        print(f"{key}: std {sd[key].std(unbiased=False).item():.4f}", file=sys.stderr)

    ref_sd1.write_reference(out, flags, g, unet, vae, ("cond_stage_model.model.", text), in_channels,
                            u["context"], TEXT["vocab"], tweak=tweak)


if __name__ == "__main__":
    main()
