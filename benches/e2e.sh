#!/usr/bin/env bash
# End-to-end records per second of `anomalyd run` on the file source, stride 1 and stride 8:
# 500,000 CSV records (100 series x 5,000 rows of the sample values, 1 s apart) through parse,
# windows, batched conv-AE scoring (2 workers) and the alert stage. Prints one line per stride.
#   benches/e2e.sh [records_per_series] [series]
set -euo pipefail
cd "$(dirname "$0")/.."
per_series=${1:-5000}
series=${2:-100}
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The sample's 8 sensor values, cycled; series interleaved as a collector would send them.
awk -F';' -v n="$per_series" -v s="$series" 'NR > 1 { v[++k] = $2";"$3";"$4";"$5";"$6";"$7";"$8";"$9 }
    END { print "ts;series;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;Voltage;Volume Flow RateRMS";
          for (i = 0; i < n; i++) for (j = 0; j < s; j++) print 1700000000 + i ";s" j ";" v[(i * s + j) % k + 1] }' \
    contracts/skab-convae/records.csv > "$work/records.csv"
records=$((per_series * series))

for stride in 1 8; do
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat > "$work/anomalyd.toml" <<TOML
[model]
path = "models/skab-convae"
[source]
path = "$work/records.csv"
[mapping]
timestamp_field = "ts"
timestamp_format = "unix_s"
series_fields = ["series"]
[windows]
stride = $stride
[alerts]
sink = "file"
path = "$work/alerts.jsonl"
[admin]
listen = "127.0.0.1:$port"
TOML
    start=$(date +%s.%N)
    target/release/anomalyd run --config "$work/anomalyd.toml" 2>"$work/log" &
    pid=$!
    until grep -q "Pipeline idle" "$work/log"; do
        kill -0 $pid 2>/dev/null || { cat "$work/log" >&2; exit 1; }
        sleep 0.05
    done
    end=$(date +%s.%N)
    windows=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^anomalyd_windows_scored_total/ { print $2 }')
    rss_kb=$(awk '/^VmHWM/ { print $2 }' /proc/$pid/status)
    kill -TERM $pid
    wait $pid
    awk -v r="$records" -v w="$windows" -v s="$start" -v e="$end" -v st="$stride" -v rss="$rss_kb" 'BEGIN {
        t = e - s; printf "stride %d: %d records, %d windows in %.2f s: %.0f records/s, %.0f windows/s, peak RSS %.0f MB\n", st, r, w, t, r / t, w / t, rss / 1024 }'
done
