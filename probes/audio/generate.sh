#!/bin/sh
# Regenerate the test utterances in this directory from manifest.toml.
#
# Needs Debian `flite` (voice slt) and `sox`:  apt-get install -y flite sox
# Output: 16 kHz, mono, signed 16-bit little-endian PCM WAV with a plain
# 44-byte RIFF header. No dither (sox -D), so the output is deterministic for
# a given flite/sox version.
set -eu

cd "$(dirname "$0")"

for tool in flite sox; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "generate.sh: '$tool' not found; install it with: apt-get install -y flite sox" >&2
        exit 1
    fi
done
if ! flite -lv | grep -qw slt; then
    echo "generate.sh: flite has no 'slt' voice" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

# Pair up file/transcript lines from the manifest (one [[utterance]] each).
sed -n 's/^file = "\(.*\)"$/\1/p' manifest.toml >"$tmp/files"
sed -n 's/^transcript = "\(.*\)"$/\1/p' manifest.toml >"$tmp/texts"
if [ "$(wc -l <"$tmp/files")" -ne "$(wc -l <"$tmp/texts")" ] || [ ! -s "$tmp/files" ]; then
    echo "generate.sh: manifest.toml: file/transcript lines do not pair up" >&2
    exit 1
fi

paste -d '\t' "$tmp/files" "$tmp/texts" | while IFS="$(printf '\t')" read -r file text; do
    flite -voice slt -t "$text" -o "$tmp/flite.wav"
    # No comment/LIST chunk, no dither: plain 44-byte header, reproducible samples.
    sox -D "$tmp/flite.wav" --comment "" -b 16 -e signed-integer -r 16000 -c 1 -L "$tmp/out.wav"
    if [ "$(dd if="$tmp/out.wav" bs=1 skip=36 count=4 2>/dev/null)" != "data" ]; then
        echo "generate.sh: $file: unexpected WAV header layout" >&2
        exit 1
    fi
    mv "$tmp/out.wav" "$file"
    echo "$file: $(soxi -D "$file") s  \"$text\""
done
