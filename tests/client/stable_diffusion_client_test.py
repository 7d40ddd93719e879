#!/usr/bin/env python3
"""A web UI backend's Stable Diffusion session through the Python client and the real daemon:
load an SDXL file (tests/tools/ref_sdxl.py), run both text encoders, one UNet step on their
outputs and the VAE decoder against the Python reference; swap its VAE for another file's; then
switch to an SD1 file under a budget that holds one of them.

  stable_diffusion_client_test.py METALOADD SOURCE_DIR STUBS_DIR    prints "N passed, N failed"
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np


def main():
    metaloadd, src, stubs = sys.argv[1:4]
    sys.path[:0] = [stubs, os.path.join(src, "client/python"), os.path.join(src, "tests/tools")]
    from metaload_client import Client
    import harness

    check = harness.Checks()
    work = tempfile.mkdtemp(prefix="metaload-sd-")
    daemon = None
    try:
        models = os.path.join(work, "models")
        for script, name, flags in (("ref_sdxl.py", "xl", []), ("ref_sd1.py", "sd1", ["--vae-files"])):
            subprocess.run([sys.executable, os.path.join(src, "tests/tools", script), os.path.join(models, name),
                            *flags], check=True, capture_output=True)

        def read(name, case, what):
            cases = json.load(open(os.path.join(models, name, "cases.json")))
            shape = cases[case]["output"] if what == "out" else cases[case]["inputs"][what]["shape"]
            dtype = np.int64 if what != "out" and cases[case]["inputs"][what]["dtype"] == "int64" else np.float32
            raw = open(os.path.join(models, name, f"{case}.{what}.bin"), "rb").read()
            return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

        def close(got, want, limit=1e-4):
            return float(np.abs(got - want).max() / np.abs(want).max()) <= limit

        log = open(os.path.join(work, "daemon.log"), "w")
        daemon, kv = harness.start_daemon(metaloadd, work, models, stderr=log)
        with Client("127.0.0.1:" + kv["grpc_port"], timeout=120) as client:
            xl = client.load("xl/model.safetensors", model_id="xl", dtype="float32").model
            check("SDXL loads with its five entries and says its VAE scale",
                  xl.architecture == "sdxl" and [e.name for e in xl.entries] ==
                  ["unet", "text_encoder", "text_encoder_2", "vae_decode", "vae_encode"] and
                  xl.diffusion.vae_scale_factor == 0.13025 and xl.diffusion.prediction == "epsilon", xl)
            ids = read("xl", "text_encoder", "input_ids")
            l_out = client.infer("xl", {"input_ids": ids}, entry="text_encoder")
            g_out = client.infer("xl", {"input_ids": ids}, entry="text_encoder_2")
            check("text_encoder (CLIP ViT-L, penultimate)",
                  close(l_out["penultimate_hidden_state"], read("xl", "text_encoder", "out")))
            check("text_encoder_2 (bigG, penultimate and pooled)",
                  close(g_out["penultimate_hidden_state"], read("xl", "text_encoder_2", "out")) and
                  close(g_out["pooled"], read("xl", "text_encoder_2@pooled", "out")))
            # One UNet step conditioned on both: context side by side, y = pooled + size features.
            context = np.concatenate([l_out["penultimate_hidden_state"], g_out["penultimate_hidden_state"]], -1)
            y = np.concatenate([g_out["pooled"], np.zeros((2, 6 * 256), np.float32)], -1)
            x = read("xl", "unet", "x")
            step = client.infer("xl", {"x": x, "timesteps": np.array([999, 17]), "context": context, "y": y},
                                entry="unet")
            check("one UNet step on the encoders' outputs",
                  step["model_output"].shape == x.shape and np.isfinite(step["model_output"]).all())
            image = client.infer("xl", {"latents": read("xl", "vae_decode", "latents")}, entry="vae_decode")
            check("vae_decode", close(image["image"], read("xl", "vae_decode", "out")))

            swapped = client.load("xl/model.safetensors", model_id="xl_vae", dtype="float32",
                                  vae_path="sd1/vae.ckpt").model
            image = client.infer("xl_vae", {"latents": read("sd1", "vae_decode", "latents")}, entry="vae_decode")
            check("the VAE swapped for another file's decodes as that file's",
                  swapped.vae_path == "sd1/vae.ckpt" and close(image["image"], read("sd1", "vae_decode", "out")))
            sizes = {m.model_id: m.resident_bytes for m in client.list()}
            sd1 = client.load("sd1/model.safetensors", model_id="sd1", dtype="float32").model
            sizes["sd1"] = sd1.resident_bytes
        harness.stop([daemon])
        daemon = None

        # A budget that holds the larger model, not two: switching evicts the idle one.
        budget = max(sizes.values()) + min(sizes.values()) // 2
        daemon, kv = harness.start_daemon(metaloadd, work, models, stderr=log,
                                          flags=["--memory_budget=cpu=%d" % budget])
        with Client("127.0.0.1:" + kv["grpc_port"], timeout=120) as client:
            client.load("xl/model.safetensors", model_id="xl", dtype="float32")
            client.load("sd1/model.safetensors", model_id="sd1", dtype="float32")
            check("switching to SD1 under a budget of one evicts SDXL",
                  [m.model_id for m in client.list()] == ["sd1"], client.list())
            client.load("xl/model.safetensors", model_id="xl", dtype="float32")
            check("and back", [m.model_id for m in client.list()] == ["xl"], client.list())
    finally:
        if daemon:
            harness.stop([daemon])
        shutil.rmtree(work, ignore_errors=True)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
