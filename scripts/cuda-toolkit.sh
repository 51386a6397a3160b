#!/usr/bin/env bash
# NVIDIA's CUDA 13.0 toolkit from PyPI, for `cargo build --features cuda` on a machine with no GPU
# and no system CUDA. Needs python3 (with venv and pip) and a C/C++ compiler (nvcc uses g++).
#
#   scripts/cuda-toolkit.sh [--prefix DIR] [--compile-only]
#       Installs the toolkit into DIR (default $NEUROSTEER_CUDA_PREFIX, else
#       ~/.cache/neurosteer-cuda) once, writes DIR/env.sh and prints its exports, so either
#         eval "$(scripts/cuda-toolkit.sh)"      or
#         scripts/cuda-toolkit.sh >/dev/null && . ~/.cache/neurosteer-cuda/env.sh
#       then `cargo build --release --features cuda`. A second run with everything in place
#       installs nothing and takes well under a second.
#       --compile-only: only nvcc and the headers (about 105 MB of wheels instead of 680 MB),
#       enough for `cargo check --features cuda` but not for linking a binary.
#
#   scripts/cuda-toolkit.sh bundle DEST [BINARY] [--prefix DIR]
#       Copies the toolkit's shared libraries that BINARY (default target/release/neurosteer)
#       loads into DEST/lib, and BINARY into DEST, for a GPU machine whose driver is there but
#       not the CUDA 13 libraries: run it as LD_LIBRARY_PATH=DEST/lib DEST/neurosteer ...
#       (libcuda.so.1 comes from the driver and is never bundled). cuBLAS makes this about 765 MB.
#
# The environment it sets:
#   CUDA_HOME, NVCC, PATH        nvcc 13.0 (read by cudarc's and candle-kernels' build scripts)
#   CUDARC_CUDA_VERSION=13000    cudarc's bindings for CUDA 13.0
#   CUDA_COMPUTE_CAP             the GPU that candle-kernels is compiled for; kept if already set,
#                                else 90 (Hopper: H100/H200). There is no nvidia-smi to ask.
#   CUDAFORGE_THREADS            nvcc processes candle-kernels runs at once; kept if already set,
#                                else every core (cudaforge's default is half of them)
#   LIBRARY_PATH                 $CUDA_HOME/lib (unversioned .so links made here) and
#                                $CUDA_HOME/lib/stubs (a libcuda.so stub made here: the real one
#                                comes with the NVIDIA driver). cudarc also searches both through
#                                CUDA_HOME. Neither is put on LD_LIBRARY_PATH: the stub must never
#                                shadow a real driver at run time.
#
# Pins: the whole 13.0 line, since nvidia-cuda-nvcc==13.0.88 alone pulls nvidia-nvvm and
# nvidia-cuda-crt 13.5, whose PTX its own ptxas rejects; 13.0 also matches the 580 drivers
# of the GPU machines this project may be lent.
set -euo pipefail

COMPILE_PINS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
LINK_PINS=(
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cublas==13.0.2.14
)

log() { echo "cuda-toolkit: $*" >&2; }
die() { log "error: $*"; exit 1; }

mode=install
compile_only=0
prefix="${NEUROSTEER_CUDA_PREFIX:-${HOME:-/root}/.cache/neurosteer-cuda}"
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    --compile-only) compile_only=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    bundle) mode=bundle; shift ;;
    install) shift ;;
    -*) die "unknown option $1" ;;
    *) positional+=("$1"); shift ;;
  esac
done
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
venv="$prefix/venv"
cuda="$prefix/cuda"   # a link to the wheels' nvidia/cu13 folder: bin/ include/ lib/ nvvm/

pins=("${COMPILE_PINS[@]}")
[ "$compile_only" = 1 ] || pins+=("${LINK_PINS[@]}")

# The pins whose dist-info is not in the venv yet.
missing_pins() {
  local sp p name ver
  sp="$(ls -d "$venv"/lib/python3*/site-packages 2>/dev/null | head -n1 || true)"
  for p in "${pins[@]}"; do
    name="${p%%==*}"; ver="${p#*==}"
    if [ -z "$sp" ] || [ ! -d "$sp/${name//-/_}-$ver.dist-info" ]; then echo "$p"; fi
  done
}

install_wheels() {
  local todo
  todo="$(missing_pins)"
  [ -z "$todo" ] && [ -x "$cuda/bin/nvcc" ] && return 0
  command -v python3 >/dev/null 2>&1 || die "python3 is needed (with pip and venv)"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating a virtual environment in $venv"
    if ! python3 -m venv "$venv" >&2; then
      rm -rf "$venv"
      if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -q >&2 && apt-get install -y -q python3-venv >&2
        python3 -m venv "$venv" >&2
      else
        die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
      fi
    fi
  fi
  if [ -n "$todo" ]; then
    # shellcheck disable=SC2086
    log "installing from PyPI: $(echo $todo)"
    # --no-deps: the packages' own requirements are unpinned (nvcc 13.0 would pull nvvm 13.5).
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --only-binary=:all: $todo >&2
  fi
  local sp
  sp="$(ls -d "$venv"/lib/python3*/site-packages | head -n1)"
  [ -x "$sp/nvidia/cu13/bin/nvcc" ] || die "nvcc is missing from $sp/nvidia/cu13/bin after the install"
  ln -sfn "$sp/nvidia/cu13" "$cuda"
}

# Unversioned names (libcublas.so -> libcublas.so.13) for the linker: the wheels ship only the
# versioned files.
link_unversioned() {
  local f base
  for f in "$cuda"/lib/lib*.so.*; do
    [ -e "$f" ] || continue
    base="${f##*/}"; base="${base%%.so.*}.so"
    [ -e "$cuda/lib/$base" ] || ln -s "${f##*/}" "$cuda/lib/$base"
  done
}

# libcuda.so is the driver's, not the toolkit's, and no wheel ships its stub. Build one with
# every cu* entry point that cuda.h names (its #define'd _v2/_v3 targets included), each
# returning CUDA_ERROR_NOT_INITIALIZED, with the driver's soname, so the binary asks for the
# real libcuda.so.1 at run time.
make_libcuda_stub() {
  local stubs="$cuda/lib/stubs"
  [ -f "$stubs/libcuda.so" ] && return 0
  [ -f "$cuda/include/cuda.h" ] || die "$cuda/include/cuda.h is missing"
  command -v cc >/dev/null 2>&1 || die "a C compiler (cc) is needed for the libcuda stub"
  mkdir -p "$stubs"
  local tmp; tmp="$(mktemp -d)"
  grep -oE '\bcu[A-Z][A-Za-z0-9_]*' "$cuda/include/cuda.h" | sort -u \
    | awk '{ printf "int %s(void) { return 3; }\n", $1 }' >"$tmp/stub.c"
  cc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$tmp/libcuda.so" "$tmp/stub.c"
  mv "$tmp/libcuda.so" "$stubs/libcuda.so"
  ln -sfn libcuda.so "$stubs/libcuda.so.1"
  rm -rf "$tmp"
}

write_env() {
  cat >"$prefix/env.sh.tmp" <<EOF
# Written by scripts/cuda-toolkit.sh: the environment for cargo build --features cuda.
export CUDA_HOME="$cuda"
export NVCC="$cuda/bin/nvcc"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="\${CUDAFORGE_THREADS:-\$(nproc 2>/dev/null || echo 2)}"
case ":\$PATH:" in *":$cuda/bin:"*) ;; *) export PATH="$cuda/bin:\$PATH" ;; esac
case ":\${LIBRARY_PATH:-}:" in *":$cuda/lib:"*) ;; *) export LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}" ;; esac
EOF
  mv "$prefix/env.sh.tmp" "$prefix/env.sh"
}

case "$mode" in
install)
  [ ${#positional[@]} -eq 0 ] || die "unexpected argument ${positional[0]}"
  command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 \
    || log "warning: no g++ found; nvcc needs a host C++ compiler (apt-get install g++)"
  install_wheels
  if [ "$compile_only" = 0 ]; then
    link_unversioned
    make_libcuda_stub
  fi
  write_env
  cat "$prefix/env.sh"
  log "ready: $("$cuda/bin/nvcc" --version | tail -n2 | head -n1); source $prefix/env.sh"
  ;;
bundle)
  [ ${#positional[@]} -ge 1 ] || die "usage: $0 bundle DEST [BINARY]"
  dest="${positional[0]}"
  bin="${positional[1]:-target/release/neurosteer}"
  [ -f "$bin" ] || die "no binary at $bin"
  [ -d "$cuda/lib" ] || die "no toolkit at $prefix: run $0 first"
  mkdir -p "$dest/lib"
  cp "$bin" "$dest/"
  # The NEEDED libraries found in the toolkit, and what they need in turn; nvrtc also
  # dlopens its builtins. libcuda.so.1 stays the driver's.
  queue=("$bin"); seen=" "
  while [ ${#queue[@]} -gt 0 ]; do
    f="${queue[0]}"; queue=("${queue[@]:1}")
    for need in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      case "$seen" in *" $need "*) continue ;; esac
      seen="$seen$need "
      [ "$need" = libcuda.so.1 ] && continue
      if [ -f "$cuda/lib/$need" ]; then
        cp -L "$cuda/lib/$need" "$dest/lib/"
        queue+=("$cuda/lib/$need")
        case "$need" in libnvrtc.so.*) cp -L "$cuda"/lib/libnvrtc-builtins.so.* "$dest/lib/" ;; esac
      fi
    done
  done
  log "bundled into $dest: $(cd "$dest/lib" && echo *) ($(du -sh "$dest" | cut -f1));" \
      "run with LD_LIBRARY_PATH=$dest/lib"
  ;;
esac
