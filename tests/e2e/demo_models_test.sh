#!/usr/bin/env bash
# The demo model root that `make run` creates is valid: every weight checks out against the
# independent Python reference, and a second run leaves the existing root untouched.
set -euo pipefail
metaload="$1"; python="$2"; src="$3"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
bash "$src/deploy/demo-models.sh" "$metaload" "$root"
"$python" "$src/tests/tools/safetensors_ref.py" check-synth "$root/demo-mlp"
"$metaload" inspect "$root/demo-sd1.safetensors" | grep -q "sd1" ||
  { echo "demo-sd1.safetensors is not detected as sd1" >&2; exit 1; }
before="$(stat -c %Y "$root/demo-mlp/model.safetensors")"
sleep 1
bash "$src/deploy/demo-models.sh" "$metaload" "$root"
after="$(stat -c %Y "$root/demo-mlp/model.safetensors")"
[ "$before" = "$after" ] || { echo "demo-models.sh rewrote an existing demo model" >&2; exit 1; }
echo "demo model root OK"
