#!/usr/bin/env bash
# Stage a data set where compute nodes can read it. Run it where there is internet (a cluster's
# login node, your laptop), once; compute nodes, CI and the workshop itself never download.
#
#   scripts/stage_data.sh cifar10 [DIR]     # CIFAR-10 (170 MB) into DIR/cifar-10-batches-py
#   export WORKSHOP_DATA=DIR                # then data.get_dataset("cifar10" or "auto") finds it
#
# DIR defaults to $WORKSHOP_DATA, else data/ in the repository. On a cluster choose a project or
# scratch folder that compute nodes mount, and put the export in your job scripts or ~/.bashrc.
# Your own images (a bird-species set, say) need no staging script: lay them out as
# DIR/<name>/train/<class>/*.jpg and DIR/<name>/test/<class>/*.jpg and ask for dataset "<name>".
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
name=${1:-}
dir=${2:-${WORKSHOP_DATA:-$here/data}}
PYTHON=${WORKSHOP_PYTHON:-python3}

case $name in
    cifar10)
        mkdir -p "$dir"
        "$PYTHON" - "$dir" <<'PY'
import sys
import torchvision

root = sys.argv[1]
for train in (True, False):
    torchvision.datasets.CIFAR10(root, train=train, download=True)
print(f"CIFAR-10 staged in {root}/cifar-10-batches-py; now: export WORKSHOP_DATA={root}")
PY
        ;;
    *)
        echo "usage: scripts/stage_data.sh cifar10 [DIR]   (DIR defaults to \$WORKSHOP_DATA, else data/)" >&2
        exit 2
        ;;
esac
