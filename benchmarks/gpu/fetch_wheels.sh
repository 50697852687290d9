#!/usr/bin/env bash
# Runs HERE (a machine that reaches PyPI). Brings, as wheels, everything the bare GPU machine lacks
# for the engine: its image has torch 2.11+cu130, transformers, accelerate, peft, einops, psutil,
# ninja, msgpack, py-cpuinfo, pandas, pyarrow, fsspec, xxhash, huggingface-hub, rich, ...
# (/work/.library/device/KINDS.md, "Python packages already there") but not deepspeed, colossalai,
# datasets, galore_torch, bitsandbytes, nor their small deps listed below.
#
# Wheels are for the GPU machine: CPython 3.12, manylinux x86_64. Everything is fetched with
# --no-deps, so nothing ever pulls torch (a CUDA torch is GBs). The versions are the ones the
# engine is tested with here (../shared/NOTES.md); ENGINE_GPU_WHEELS_EXTRA="name==ver ..." adds more.
#
# Output: benchmarks/gpu/wheels/ (git-ignored). Fails if the folder is over 60 MiB: the device
# tool carries at most 64 MiB per call, the repository's own tracked files included.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
DEST="$HERE/wheels"
LIMIT_MIB=${LIMIT_MIB:-60}
PY=${PYTHON:-python3}
PIP=("$PY" -m pip --disable-pip-version-check)
# this machine's pip config names local mirror folders that lack some packages: hide that noise
quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }

# sdists that build into pure-Python wheels (no CUDA ops are pre-compiled: both JIT-compile their
# kernels with the GPU machine's nvcc on first use)
BUILD=(deepspeed==0.19.8 colossalai==0.5.0)
# pure-Python wheels
PURE=(
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19          # datasets (hub datasets in engine/data.py)
  hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5   # deepspeed
  typing-extensions==4.16.0   # pydantic 2.14 needs >= 4.16; run.sh installs it only if the image has an older one
  galore-torch==1.0                                           # colossalai.nn.optimizer imports it
)
# binary wheels: cp312 manylinux x86_64
BINARY=(
  pydantic-core==2.50.5      # pydantic's compiled core (pinned by pydantic 2.14.4)
  bitsandbytes==0.50.2       # 43 MB: colossalai/nn/optimizer/galore.py and galore_torch import it at
                             # import time, and every booster plugin imports colossalai.nn.optimizer
)
# shellcheck disable=SC2206
EXTRA=(${ENGINE_GPU_WHEELS_EXTRA:-})
PLATFORM=(--python-version 3.12 --implementation cp --abi cp312
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
echo "== building ${BUILD[*]} (pure-Python wheels from sdists)"
DS_BUILD_OPS=0 BUILD_EXT=0 quiet "${PIP[@]}" wheel -q --no-deps --no-binary deepspeed,colossalai -w "$DEST.tmp" "${BUILD[@]}"
echo "== downloading ${PURE[*]} ${EXTRA[*]}"
quiet "${PIP[@]}" download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST.tmp" "${PURE[@]}" "${EXTRA[@]}"
echo "== downloading ${BINARY[*]} (cp312 manylinux x86_64)"
quiet "${PIP[@]}" download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST.tmp" "${BINARY[@]}"

# every wheel must install on CPython 3.12 / x86_64 / glibc: refuse anything else (a cp311 or an
# aarch64 wheel would only fail there, with no network to fix it)
bad=0
for w in "$DEST.tmp"/*.whl; do
  tags=$(basename "$w" .whl | awk -F- '{print $(NF-2)"-"$(NF-1)"-"$NF}')
  case "$tags" in
    py3-none-any|py2.py3-none-any|py312-none-any|cp312-cp312-manylinux*x86_64|py3-none-manylinux*x86_64) ;;
    *) echo "error: $(basename "$w") is not for CPython 3.12 manylinux x86_64 ($tags)" >&2; bad=1 ;;
  esac
done
[ "$bad" = 0 ] || exit 1
# one version of each distribution, or `pip install *.whl` refuses the whole set
dups=$(for w in "$DEST.tmp"/*.whl; do basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done | sort | uniq -d)
if [ -n "$dups" ]; then echo "error: several versions of: $dups" >&2; exit 1; fi

rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
echo "== $DEST"
ls -l "$DEST" | awk 'NR>1 {printf "%10d  %s\n", $5, $9}'
bytes=$(du -sb "$DEST" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo "total: $(ls "$DEST"/*.whl | wc -l) wheels, $mib MiB (limit $LIMIT_MIB MiB; the device tool carries 64 MiB per call with the repository)"
if awk -v b="$bytes" -v l="$LIMIT_MIB" 'BEGIN {exit !(b > l * 1048576)}'; then
  echo "error: wheels folder is $mib MiB, over the $LIMIT_MIB MiB limit" >&2
  exit 1
fi
