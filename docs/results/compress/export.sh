#!/bin/sh
# Copy a `moelab compare --suite compress` directory's small files here (no weights, no
# checkpoints): the report, plots, record, rows and each compressed run's config/provenance.
# usage: sh docs/results/compress/export.sh runs/results/compress
set -e
src=${1:?usage: export.sh OUT_DIR}
dst=$(dirname "$0")
for f in compress_report.md compress_suite.json; do [ -f "$src/$f" ] && cp "$src/$f" "$dst/"; done
[ -d "$src/img" ] && mkdir -p "$dst/img" && cp "$src"/img/*.png "$dst/img/"
[ -d "$src/rows" ] && mkdir -p "$dst/rows" && cp "$src"/rows/*.json "$dst/rows/"
for run in "$src"/runs/*/; do
  name=$(basename "$run")
  mkdir -p "$dst/runs/$name"
  for f in config.yaml provenance.json summary.json accounting.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$dst/runs/$name/"
  done
done
du -sh "$dst"
