#!/usr/bin/env python3
"""What a web UI backend does with metaload: list the models, load one with a progress bar,
run a forward pass, switch to another checkpoint.

    switch_checkpoint.py [--address 127.0.0.1:50051] FIRST_PATH SECOND_PATH
"""
import argparse
import sys

import numpy as np

from metaload_client import Client, MetaloadError


def progress_bar(event):
    if event.bytes_total:
        filled = int(30 * event.bytes_done / event.bytes_total)
        sys.stderr.write("\r%-6s [%s%s] %d/%d" % (event.phase, "#" * filled, " " * (30 - filled),
                                                  event.bytes_done, event.bytes_total))
    if event.phase == "done":
        sys.stderr.write("\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("paths", nargs=2)
    args = parser.parse_args()
    with Client(args.address, timeout=600) as client:
        print("models:", [m.model_id for m in client.list()])
        for path in args.paths:
            # The web UI keeps one "current" checkpoint: replace swaps it in atomically.
            response = client.load(path, model_id="current", replace=True, on_progress=progress_bar)
            model = response.model
            print("loaded %s (%s, %d parameters) in %.2f s" % (path, model.architecture,
                                                               model.parameter_count, response.stats.total_seconds))
            entry = model.entries[0]
            inputs = {}
            for spec in entry.inputs:
                if spec.name == "attention_mask":
                    continue
                shape = [d if d > 0 else 4 for d in spec.shape]
                inputs[spec.name] = (np.arange(np.prod(shape)) % 7).reshape(shape).astype(
                    np.int64 if spec.datatype == "INT64" else np.float32)
            out = client.infer("current", inputs)
            for name, value in out.items():
                print("  %s %s mean %.4f" % (name, value.shape, float(value.mean())))
        try:
            client.get("no-such-model")
        except MetaloadError as e:
            print("as expected:", e.code.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
