#!/bin/bash
# Runs fuzz targets, each for the given number of seconds, starting from
# the committed seeds; at most FUZZ_JOBS at once (default 1). The machine
# has 2 cores shared with other builds: never more than 2.
#
#   fuzz/run.sh [seconds] [target...]     (default: 600, every target)
#   FUZZ_JOBS=2 fuzz/run.sh 600           (two targets at a time)
#
# Needs nightly and cargo-fuzz. Per target: the working corpus is
# fuzz/corpus/<target>/ (seeds copied in first), libFuzzer's output is
# fuzz/logs/<target>/fuzz-0.log, crashes land in fuzz/artifacts/<target>/.
# The load average is printed at every start and end.
set -eu
fuzz=$(cd "$(dirname "$0")" && pwd)
secs=${1:-600}
[ $# -gt 0 ] && shift
targets=${*:-frame messages stream_payloads tcp_datagrams bootstrap dns connect_head proxy_answer relay_config edge_config}
jobs=${FUZZ_JOBS:-1}
if [ "$jobs" -gt 2 ]; then
    echo "FUZZ_JOBS=$jobs: at most 2 on this machine" >&2
    exit 2
fi

load() { cut -d' ' -f1-3 /proc/loadavg; }

one() {
    t=$1
    mkdir -p "$fuzz/corpus/$t" "$fuzz/logs/$t"
    cp -n "$fuzz/seeds/$t/"* "$fuzz/corpus/$t/" 2>/dev/null || true
    cd "$fuzz/logs/$t"
    rm -f fuzz-0.log
    echo "$(date -u +%FT%TZ) $t: ${secs}s (load $(load))"
    if cargo +nightly fuzz run --fuzz-dir "$fuzz" "$t" "$fuzz/corpus/$t" -- \
        -max_total_time="$secs" -jobs=1 -workers=1 -print_final_stats=1 \
        > run.log 2>&1; then
        status=done
    else
        status="FAILED (see $fuzz/logs/$t/)"
    fi
    {
        echo "$(date -u +%FT%TZ) $t: $status (load $(load))"
        grep -E '^#[0-9]+' fuzz-0.log | tail -1 || true
        grep -E '^stat::' fuzz-0.log || true
        echo "corpus: $(ls "$fuzz/corpus/$t" | wc -l) files"
    } > summary.txt
    cat summary.txt
}

# Build once, so parallel runs do not each wait for the build lock.
cargo +nightly fuzz build --fuzz-dir "$fuzz"
set -- $targets
while [ $# -gt 0 ]; do
    batch=0
    while [ $# -gt 0 ] && [ "$batch" -lt "$jobs" ]; do
        one "$1" &
        shift
        batch=$((batch + 1))
    done
    wait
done
