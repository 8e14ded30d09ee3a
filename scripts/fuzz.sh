#!/usr/bin/env bash
# Runs every fuzz target (libFuzzer via cargo-fuzz) for a bounded time and
# prints executions and findings per target. Not part of CI's test command:
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# New corpus entries go to a temporary directory; the committed corpus under
# fuzz/corpus/ only seeds the run, so it stays small. Crashes are written to
# fuzz/artifacts/<target>/ and make the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# cargo-fuzz passes -Z sanitizer flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
status=0
for target in decode_event fetchxml offset_tracker; do
  # Avro schemas are leaked on purpose (one per schema id, prepared once and
  # kept for the life of the process), which LeakSanitizer would report at exit.
  leaks=1
  if [ "$target" = decode_event ]; then leaks=0; fi
  scratch="$(mktemp -d)"
  log="$scratch/fuzz.log"
  if ASAN_OPTIONS="detect_leaks=$leaks" cargo fuzz run "$target" "$scratch" "corpus/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -detect_leaks="$leaks" >"$log" 2>&1; then
    result="no findings"
  else
    result="FINDING (see fuzz/artifacts/$target/)"
    status=1
  fi
  runs="$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -n1 || true)"
  cov="$(grep -Eo 'cov: [0-9]+' "$log" | tail -n1 || true)"
  echo "$target: ${runs:-?} in ${seconds}s, ${cov:-cov ?}, $result"
  [ "$result" = "no findings" ] || tail -n 30 "$log"
  rm -rf "$scratch"
done
exit "$status"
