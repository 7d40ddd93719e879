#!/usr/bin/env python3
"""The Python client (client/python) against the real daemon, and its example.

  python_client_test.py METALOADD METALOAD_CLI SOURCE_DIR STUBS_DIR    prints "N passed, N failed"
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch


def main():
    metaloadd, cli, src, stubs = sys.argv[1:5]
    sys.path[:0] = [stubs, os.path.join(src, "client/python"), os.path.join(src, "tests/tools")]
    from metaload_client import Client, MetaloadError
    import grpc
    import harness

    check = harness.Checks()

    work = tempfile.mkdtemp(prefix="metaload-py-")
    daemon = None
    try:
        models = os.path.join(work, "models")
        subprocess.run([sys.executable, os.path.join(src, "tests/tools/ref_models.py"), "mlp",
                        os.path.join(models, "ref_mlp")], check=True, capture_output=True)
        for name, seed in (("gpt_a", "1"), ("gpt_b", "2")):
            subprocess.run([cli, "synth", "--arch=gpt2", "--seed=" + seed, os.path.join(models, name)],
                           check=True, capture_output=True)
        daemon, kv = harness.start_daemon(metaloadd, work, models,
                                          stderr=open(os.path.join(work, "daemon.log"), "w"))
        address = "127.0.0.1:" + kv["grpc_port"]

        with Client(address, timeout=60) as client:
            check("list starts empty", client.list() == [])
            events = []
            response = client.load("ref_mlp", on_progress=events.append)
            check("load with progress ends READY", response.model.state == "READY" and events and
                  events[-1].phase == "done" and events[-1].HasField("result"),
                  [e.phase for e in events])
            inputs = json.load(open(os.path.join(models, "ref_mlp/inputs.json")))
            x = np.asarray(inputs["input"], dtype=np.float32)
            expected = np.frombuffer(open(os.path.join(models, "ref_mlp/expected.bin"), "rb").read(),
                                     dtype=np.float32).reshape(3, 5).copy()
            out = client.infer("ref_mlp", {"input": x})
            check("numpy in, numpy out, equal to the Python reference",
                  isinstance(out["output"], np.ndarray) and np.allclose(out["output"], expected, atol=1e-5),
                  out)
            out_t = client.infer("ref_mlp", {"input": torch.from_numpy(x)}, as_torch=True)
            check("torch in, torch out", isinstance(out_t["output"], torch.Tensor) and
                  torch.allclose(out_t["output"], torch.from_numpy(expected), atol=1e-5))

            # bfloat16 storage computes in float32 on a cpu unless asked: here, bfloat16 outputs.
            client.load("ref_mlp", model_id="mlp_bf16", dtype="bfloat16", compute_dtype="bfloat16")
            out_b = client.infer("mlp_bf16", {"input": torch.from_numpy(x).bfloat16()}, as_torch=True)
            err = (out_b["output"].float() - torch.from_numpy(expected)).abs().max().item()
            check("bfloat16 round trip", out_b["output"].dtype == torch.bfloat16 and
                  err <= 5e-2 * float(np.abs(expected).max()), err)
            out_n = client.infer("mlp_bf16", {"input": x})
            check("bfloat16 outputs as float32 numpy", out_n["output"].dtype == np.float32)

            try:
                client.get("nobody")
                check("unknown model raises", False)
            except MetaloadError as e:
                check("unknown model raises MetaloadError(NOT_FOUND)", e.code == grpc.StatusCode.NOT_FOUND, e)
            try:
                client.load("../escape")
                check("escaping path raises", False)
            except MetaloadError as e:
                check("escaping path raises INVALID_ARGUMENT", e.code == grpc.StatusCode.INVALID_ARGUMENT, e)
            info = client.get("ref_mlp")
            check("get", info.architecture == "mlp" and info.state == "READY")
            check("list has both", sorted(m.model_id for m in client.list()) == ["mlp_bf16", "ref_mlp"])
            client.unload("mlp_bf16")
            check("unload", [m.model_id for m in client.list()] == ["ref_mlp"])

        env = dict(os.environ, PYTHONPATH=os.pathsep.join([stubs, os.path.join(src, "client/python")]))
        r = subprocess.run([sys.executable, os.path.join(src, "client/python/examples/switch_checkpoint.py"),
                            "--address", address, "gpt_a", "gpt_b"], capture_output=True, text=True, env=env,
                           timeout=120)
        check("examples/switch_checkpoint.py switches two checkpoints",
              r.returncode == 0 and r.stdout.count("loaded gpt_") == 2 and "as expected: NOT_FOUND" in r.stdout,
              r.stdout + r.stderr)
    finally:
        if daemon:
            harness.stop([daemon])
        shutil.rmtree(work, ignore_errors=True)
    return check.summary()


if __name__ == "__main__":
    sys.exit(main())
