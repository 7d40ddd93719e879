#!/usr/bin/env bash
# Creates the demo model root that `make run` serves, with metaload's own synthesizer (nothing
# is downloaded). Leaves models that already exist alone.
# Usage: deploy/demo-models.sh PATH/TO/metaload MODEL_ROOT
set -euo pipefail
metaload="$1"; root="$2"
mkdir -p "$root"
if [ ! -f "$root/demo-mlp/config.json" ]; then
  "$metaload" synth --arch=mlp --preset=tiny "$root/demo-mlp"
fi
if [ ! -f "$root/demo-gpt2/config.json" ]; then
  "$metaload" synth --arch=gpt2 --preset=tiny "$root/demo-gpt2"
fi
if [ ! -f "$root/demo-sd1.safetensors" ]; then  # a single-file SD1 checkpoint, as the web UI has
  "$metaload" synth --arch=sd1 --preset=tiny "$root/.demo-sd1"
  mv "$root/.demo-sd1/model.safetensors" "$root/demo-sd1.safetensors"
  rmdir "$root/.demo-sd1"
fi
