#!/usr/bin/env python3
"""An independent Python reference for metaload's sdxl architecture: small Stable Diffusion XL
networks written the way Stability's sgm writes them (the UNet's label_emb, per-level transformer
depths and no attention on the first level; FrozenCLIPEmbedder's layer "hidden" at -2 and
FrozenOpenCLIPEmbedder2's "penultimate" with the pooled, projected output), so nn.Module
attributes give the real keys; random weights; every entry on fixed inputs. The blocks are
ref_sd1.py's and ref_sd2.py's (sgm shares ldm's); the output is as ref_sd1.py's.

  ref_sdxl.py OUT_DIR [--refiner] [--in-channels N] [--round DTYPE [--keep P,..]] [--v-pred]

  --refiner   the refiner: bigG alone under conditioner.embedders.0, attention on the middle levels
  --v-pred    adds the v_pred key a v-prediction fine-tune carries
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_sd1  # noqa: E402
import ref_sd2  # noqa: E402
from ref_models import round_weights, write_safetensors  # noqa: E402

BASE = dict(model_channels=64, mult=(1, 2, 2), depth=(0, 1, 2), middle=2, conditions=6)
REFINER = dict(model_channels=64, mult=(1, 2, 2, 2), depth=(0, 1, 1, 0), middle=1, conditions=5)
VAE = dict(ch=32, mult=(1, 2, 2, 2), res_blocks=1, z=4)
CLIP = dict(vocab=1000, positions=77, width=128, layers=2, heads=2, ffn=512)
BIG_G = dict(vocab=1000, positions=77, width=128, layers=3, heads=2, ffn=512)


# FrozenCLIPEmbedder(layer="hidden", layer_idx=-2): transformers' hidden_states[-2], the output of
# every layer but the last, without the final layer norm.
def clip_penultimate(clip, ids):
    x = clip.embeddings.token_embedding(ids)
    x = x + clip.embeddings.position_embedding(clip.embeddings.position_ids[:, :ids.shape[1]])
    for layer in clip.encoder.layers[:-1]:
        x = layer(x)
    return x


# FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False, always_return_pooled=True): the input
# of the last resblock, and ln_final of the last one's output at the end-of-text token (the
# highest id) through text_projection.
def big_g_outputs(g, ids):
    t = ids.shape[1]
    x = (g.token_embedding(ids) + g.positional_embedding[:t]).permute(1, 0, 2)
    mask = g.attn_mask[:t, :t]
    for i, r in enumerate(g.transformer.resblocks):
        if i == len(g.transformer.resblocks) - 1:
            penultimate = x.permute(1, 0, 2)
        x = r(x, attn_mask=mask)
    last = g.ln_final(x.permute(1, 0, 2))
    pooled = last[torch.arange(last.shape[0]), ids.argmax(dim=-1)] @ g.text_projection
    return penultimate, pooled


def main():
    out, flags = sys.argv[1], sys.argv[2:]
    refiner = "--refiner" in flags
    in_channels = int(flags[flags.index("--in-channels") + 1]) if "--in-channels" in flags else 4
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(20261203)
    u = REFINER if refiner else BASE
    context = BIG_G["width"] + (0 if refiner else CLIP["width"])
    adm = BIG_G["width"] + u["conditions"] * 256
    depth = lambda level: u["middle"] if level is None else u["depth"][level]  # noqa: E731
    unet = ref_sd1.UNetModel(
        in_channels, u["model_channels"], u["mult"], 2, tuple(d > 0 for d in u["depth"]), None, context,
        transformer=lambda ch, ctx, level: ref_sd2.SpatialTransformer(ch, ch // 64, ctx, depth(level)),
        adm_in_channels=adm)
    vae = ref_sd1.AutoencoderKL(VAE["ch"], VAE["mult"], VAE["res_blocks"], VAE["z"])
    big_g = ref_sd2.OpenCLIPText(**BIG_G)
    networks = {"model.diffusion_model.": unet, "first_stage_model.": vae}
    if refiner:
        networks["conditioner.embedders.0.model."] = big_g
    else:
        clip = ref_sd1.CLIPTextTransformer(**CLIP)
        networks["conditioner.embedders.0.transformer.text_model."] = clip
        networks["conditioner.embedders.1.model."] = big_g
    sd = {}
    for prefix, m in networks.items():
        ref_sd1.randomize(m, g)
        m.eval()
        sd.update({prefix + k: v for k, v in m.state_dict().items()})
    if "--v-pred" in flags:
        sd["v_pred"] = torch.tensor([])
    sd = {k: v.contiguous() for k, v in sd.items()}
    rounded = round_weights(sd, flags)
    for prefix, m in networks.items():
        m.load_state_dict({k[len(prefix):]: v for k, v in rounded.items() if k.startswith(prefix)})
    write_safetensors(os.path.join(out, "model.safetensors"), sd)

    b, hw = 2, 8
    ids = torch.randint(0, CLIP["vocab"] - 1, (b, 77), generator=g)
    ids[0, 5], ids[1, 76] = CLIP["vocab"] - 1, CLIP["vocab"] - 1  # the end-of-text tokens
    inputs = {
        "unet": {"x": torch.randn(b, in_channels, hw, hw, generator=g),
                 "timesteps": torch.tensor([999, 17]),
                 "context": torch.randn(b, 77, context, generator=g),
                 "y": torch.randn(b, adm, generator=g)},
        "text_encoder_2": {"input_ids": ids},
        "vae_decode": {"latents": torch.randn(1, 4, hw, hw, generator=g)},
        "vae_encode": {"image": torch.rand(1, 3, 8 * hw, 8 * hw, generator=g) * 2 - 1},
    }
    with torch.no_grad():
        penultimate, pooled = big_g_outputs(big_g, ids)
        outputs = {"unet": unet(**inputs["unet"]), "text_encoder_2": penultimate,
                   "text_encoder_2@pooled": pooled,
                   "vae_decode": vae.decode(inputs["vae_decode"]["latents"]),
                   "vae_encode": vae.encode_mean(inputs["vae_encode"]["image"])}
        if not refiner:
            inputs["text_encoder"] = {"input_ids": ids}
            outputs["text_encoder"] = clip_penultimate(clip, ids)
    ref_sd1.write_cases(out, inputs, outputs)
    print(json.dumps({"tensors": len(sd), "parameters": sum(v.numel() for v in sd.values())}))


if __name__ == "__main__":
    main()
