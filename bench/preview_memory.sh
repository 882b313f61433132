#!/usr/bin/env bash
# Peak memory of a preview render, side by side: the one-pass forward/backward graph the
# preview used to run (split, reverse, concat, loop: every frame of the clip held) against
# `musetalk-sidecar preview-render` (the bounded plan of src/pipeline/preview.rs), on a
# 60 s 1080p30 clip with (a) 60 s of audio (the plan plays forward only) and (b) 90 s
# (the plan reverses in chunks on disk). Peak RSS is GNU time's maximum resident set size
# of the largest process (the render's passes run one after another).
#
#   bash bench/preview_memory.sh            # ~10 min on 2 cores; prints a Markdown table
#
# Never part of the test command. Needs ffmpeg and /usr/bin/time (Debian: `time`).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v /usr/bin/time >/dev/null || { echo "install GNU time: apt-get install time" >&2; exit 1; }
cargo build --release -q
bin=target/release/musetalk-sidecar
work=target/bench-preview-memory
mkdir -p "$work"
clip=$work/clip-1080p30-60s.mp4
[ -f "$clip" ] || ffmpeg -v error -y -f lavfi -i testsrc2=size=1920x1080:rate=30 -t 60 -pix_fmt yuv420p -c:v libx264 -preset ultrafast "$clip"
for secs in 60 90; do
  [ -f "$work/audio-$secs.wav" ] || ffmpeg -v error -y -f lavfi -i "sine=frequency=440:duration=$secs" -ar 16000 -ac 1 "$work/audio-$secs.wav"
done

peak() { # peak RSS in MiB and wall seconds of "$@"
  /usr/bin/time -f '%M %e' -o "$work/time.txt" "$@" >/dev/null 2>"$work/stderr.txt" || { cat "$work/stderr.txt" >&2; return 1; }
  read -r kib secs <"$work/time.txt"
  printf '%d MiB | %.0f s' $((kib / 1024)) "$secs"
}

echo "| audio | one-pass graph (before) | bounded plan (now) |"
echo "|---|---|---|"
for secs in 60 90; do
  audio=$work/audio-$secs.wav
  a=$(peak ffmpeg -hide_banner -nostdin -y -v error -i "$clip" -i "$audio" -filter_complex \
    "[0:v]scale=trunc(iw/2)*2:trunc(ih/2)*2,split=2[f][b];[b]reverse[r];[f][r]concat=n=2:v=1:a=0,loop=loop=-1:size=3600:start=0,setpts=N/(30*TB),format=yuv420p[v]" \
    -map '[v]' -map 1:a:0 -t "$secs" -r 30 -c:v libx264 -preset veryfast -crf 23 -c:a aac -b:a 128k -movflags +faststart "$work/old.mp4")
  b=$(peak "$bin" preview-render --ffmpeg ffmpeg --video "$clip" --audio "$audio" --out "$work/new.mp4" --work "$work" \
    --fps 30 --seconds "$secs.000" --video-seconds 60.000 --width 1920 --height 1080)
  echo "| $secs s | $a | $b |"
done
