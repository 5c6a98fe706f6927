#!/usr/bin/env bash
# On a machine with NVIDIA GPUs and driver: builds the supplier agent, prints what NVML
# discovery finds and the CDI spec the agent would write (--cdi), then what a container given
# the first GPU by that spec would get, each host file marked present or MISSING.
# Usage: hack/gpu-check.sh   (needs cargo and python3; changes nothing on the machine)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p gpumarket-device-plugin
agent="${CARGO_TARGET_DIR:-target}/release/gpumarket-device-plugin"
discovered="$(mktemp)"
trap 'rm -f "$discovered"' EXIT
# A spec that cannot be made is reported after what was found.
status=0
"$agent" --node-name "$(hostname)" --source nvml --discover >"$discovered" || status=$?
cat "$discovered"
[ -s "$discovered" ] || exit "$status"

python3 - "$discovered" <<'EOF'
import json, os, sys
spec = json.load(open(sys.argv[1])).get("cdiSpec")
if not spec:
    sys.exit("no CDI spec: the agent says why above")
device = spec["devices"][0]
print(f"\nA container given {spec['kind']}={device['name']} would get:")
for edits in (device["containerEdits"], spec["containerEdits"]):
    for node in edits.get("deviceNodes", []):
        mark = "present" if os.path.exists(node["hostPath"]) else "MISSING"
        print(f"  device {node['path']:<50} <- {node['hostPath']} ({mark})")
    for mount in edits.get("mounts", []):
        mark = "present" if os.path.exists(mount["hostPath"]) else "MISSING"
        print(f"  file   {mount['containerPath']:<50} <- {mount['hostPath']} ({mark})")
    for env in edits.get("env", []):
        print(f"  env    {env}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L
exit "$status"
