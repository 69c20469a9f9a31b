#!/usr/bin/env bash
# Make sure Fashion-MNIST's IDX files exist: Debian's dataset-fashion-mnist package, unless
# MAKD_FASHION_MNIST points at a folder that already holds them.
set -euo pipefail
dir="${MAKD_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
[ -f "$dir/train-images-idx3-ubyte.gz" ] || [ -f "$dir/train-images-idx3-ubyte" ] && exit 0
if [ -n "${MAKD_FASHION_MNIST:-}" ]; then
  echo "error: MAKD_FASHION_MNIST=$dir holds no Fashion-MNIST IDX files" >&2; exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
echo "installing Fashion-MNIST: ${sudo:+$sudo }apt-get install -y dataset-fashion-mnist"
if ! $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
  $sudo apt-get update -q >/dev/null 2>&1 || true
  if ! $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; then
    echo "error: could not install Fashion-MNIST; run 'sudo apt-get install dataset-fashion-mnist'," \
         "or set MAKD_FASHION_MNIST to a folder with its IDX files" >&2
    exit 1
  fi
fi
