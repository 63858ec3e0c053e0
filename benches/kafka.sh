#!/usr/bin/env bash
# Records per second of `anomalyd run` consuming from a real Kafka broker, stride 1 and stride 8:
# a broker of its own (scripts/kafka), a topic of 4 partitions preloaded with kcat (100 series x
# 5,000 rows of the sample values, 1 s apart, keyed by series), then one daemon per stride in a
# fresh consumer group, with the scores topic off. The rate counts from the first record read to
# the last window scored, so the group join is not in it. Prints one line per stride.
#   benches/kafka.sh [records_per_series] [series]
set -euo pipefail
cd "$(dirname "$0")/.."
per_series=${1:-5000}
series=${2:-100}
command -v kcat >/dev/null || { echo "kafka.sh: kcat not found (Debian: apt-get install kcat)" >&2; exit 1; }
cargo build --release --quiet
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
base=
for p in 21092 31092 41092 51092; do
    if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/$((p + 1))) 2>/dev/null \
        && ! (exec 3<>/dev/tcp/127.0.0.1/$((p + 2))) 2>/dev/null; then base=$p; break; fi
done
[ -n "$base" ] || { echo "kafka.sh: no free ports for the broker" >&2; exit 1; }
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; scripts/kafka stop --dir "$work/broker" 2>/dev/null; rm -rf "$work"' EXIT
brokers=$(scripts/kafka start --port "$base" --dir "$work/broker" 2>/dev/null)
scripts/kafka topic bench --partitions 4 --dir "$work/broker" >/dev/null

# key|ts;values — the key names the series (kafka.series_from_key).
awk -F';' -v n="$per_series" -v s="$series" 'NR > 1 { v[++k] = $2";"$3";"$4";"$5";"$6";"$7";"$8";"$9 }
    END { for (i = 0; i < n; i++) for (j = 0; j < s; j++) print "s" j "|" 1700000000 + i ";" v[(i * s + j) % k + 1] }' \
    contracts/skab-convae/records.csv | kcat -P -b "$brokers" -t bench -K '|' -X linger.ms=50 -X batch.num.messages=10000
records=$((per_series * series))

# Empty while the admin port is not up yet.
metric() { { curl -s "http://127.0.0.1:$1/metrics" || true; } | awk -v m="$2" '$1 == m { print $2 }'; }

for stride in 1 8; do
    port=$(free_port)
    cat > "$work/anomalyd.toml" <<TOML
[model]
path = "models/skab-convae"
[source]
kind = "kafka"
format = "csv"
csv_delimiter = ";"
csv_columns = ["ts", "Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple", "Voltage", "Volume Flow RateRMS"]
[kafka]
brokers = "$brokers"
topics = ["bench"]
group_id = "bench-stride-$stride"
series_from_key = true
[mapping]
timestamp_field = "ts"
timestamp_format = "unix_s"
[windows]
stride = $stride
[alerts]
sink = "file"
path = "$work/alerts.jsonl"
[admin]
listen = "127.0.0.1:$port"
TOML
    target/release/anomalyd run --config "$work/anomalyd.toml" 2>"$work/log" &
    pid=$!
    first= last= windows=0 seen=0
    # Polls /metrics every 50 ms: the first poll with records read, and the last with new windows
    # once every record is read and nothing changed for a second.
    while :; do
        kill -0 $pid 2>/dev/null || { cat "$work/log" >&2; exit 1; }
        now=$(date +%s.%N)
        got=$(metric "$port" anomalyd_records_received_total)
        w=$(metric "$port" anomalyd_windows_scored_total)
        [ -z "$first" ] && [ "${got:-0}" != 0 ] && first=$now
        if [ "${w:-0}" != "$windows" ]; then windows=${w:-0}; last=$now; fi
        if [ "${got:-0}" = "$records" ] && [ -n "$last" ] && awk -v n="$now" -v l="$last" 'BEGIN { exit !(n - l > 1) }'; then
            break
        fi
        sleep 0.05
    done
    rss_kb=$(awk '/^VmHWM/ { print $2 }' /proc/$pid/status)
    # utime + stime of the daemon and of the broker, in clock ticks.
    cpu=$(awk '{ print $14 + $15 }' /proc/$pid/stat)
    broker_cpu=$(awk '{ print $14 + $15 }' /proc/"$(cat "$work/broker/broker.pid")"/stat)
    kill -TERM $pid
    wait $pid
    pid=
    awk -v r="$records" -v w="$windows" -v s="$first" -v e="$last" -v st="$stride" -v rss="$rss_kb" \
        -v cpu="$cpu" -v hz="$(getconf CLK_TCK)" 'BEGIN {
        t = e - s; printf "kafka stride %d: %d records, %d windows in %.2f s: %.0f records/s, %.0f windows/s, %.2f CPU s per million records, peak RSS %.0f MB\n",
            st, r, w, t, r / t, w / t, cpu / hz / r * 1e6, rss / 1024 }'
    broker_before=${broker_before:-0}
    awk -v b="$broker_cpu" -v b0="$broker_before" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "  broker CPU during the run (and the preload before the first): %.1f s\n", (b - b0) / hz }'
    broker_before=$broker_cpu
done
