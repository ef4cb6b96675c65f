#!/usr/bin/env bash
# Make clean Fashion-MNIST available: $METATTA_DATA, else Debian's package
# dataset-fashion-mnist, else metatta downloads it through torchvision on first use.
set -u
debian_dir=/usr/share/datasets/fashion-mnist
if [ -n "${METATTA_DATA:-}" ] && ls "$METATTA_DATA"/*fashion* >/dev/null 2>&1; then
  echo "fashion-mnist: using \$METATTA_DATA=$METATTA_DATA"; exit 0
fi
if [ -f "$debian_dir/train-images-idx3-ubyte.gz" ]; then
  echo "fashion-mnist: using $debian_dir"; exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; then
    echo "fashion-mnist: installed Debian package dataset-fashion-mnist into $debian_dir"; exit 0
  fi
fi
echo "fashion-mnist: Debian package unavailable; metatta will download it with torchvision into \${METATTA_DATA:-~/.cache/metatta/data} on first use"
