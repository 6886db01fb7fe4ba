#!/bin/sh
# Runs fuzz targets one after the other (never in parallel), each for the
# given number of seconds, starting from the committed seeds.
#
#   fuzz/run.sh [seconds] [target...]     (default: 600, every target)
#
# Needs nightly and cargo-fuzz. Per target: the working corpus is
# fuzz/corpus/<target>/ (seeds copied in first), libFuzzer's output is
# fuzz/logs/<target>/fuzz-0.log, crashes land in fuzz/artifacts/<target>/.
set -eu
fuzz=$(cd "$(dirname "$0")" && pwd)
secs=${1:-600}
[ $# -gt 0 ] && shift
targets=${*:-frame messages connect_head relay_config edge_config}
for t in $targets; do
    mkdir -p "$fuzz/corpus/$t" "$fuzz/logs/$t"
    cp -n "$fuzz/seeds/$t/"* "$fuzz/corpus/$t/"
    cd "$fuzz/logs/$t"
    rm -f fuzz-0.log
    echo "$(date -u +%FT%TZ) $t: ${secs}s"
    if cargo +nightly fuzz run --fuzz-dir "$fuzz" "$t" "$fuzz/corpus/$t" -- \
        -max_total_time="$secs" -jobs=1 -workers=1 -print_final_stats=1 \
        > run.log 2>&1; then
        echo "$(date -u +%FT%TZ) $t: done"
    else
        echo "$(date -u +%FT%TZ) $t: FAILED (see $fuzz/logs/$t/)"
    fi
    grep -E '^#[0-9]+' fuzz-0.log | tail -1 || true
    grep -E '^stat::' fuzz-0.log || true
    echo "corpus: $(ls "$fuzz/corpus/$t" | wc -l) files"
done
