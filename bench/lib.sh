# Shared by bench/run, bench/latency and bench/memory (sourced from the repository root).

# The bench conv-AE for FEATURES and W, trained once by bench/make_model.py; prints its folder.
bench_model() {
    local dir=.cache/bench/models/convae-f$1-w$2
    .venv/bin/python bench/make_model.py --features "$1" --window "$2" --out "$dir" >&2
    echo "$dir"
}

# A broker of our own in $1/broker on the first free base port (scripts/kafka refuses a base
# port whose three ports are not all free); sets $brokers. Everything under $1 goes when the
# script exits.
start_broker() {
    local work=$1 p
    trap 'stop_anomalyd; scripts/kafka stop --dir "'"$work"'/broker" 2>/dev/null; rm -rf "'"$work"'"' EXIT
    for p in 21092 31092 41092 51092; do
        if brokers=$(scripts/kafka start --port "$p" --dir "$work/broker" 2>/dev/null); then
            return
        fi
    done
    echo "bench: no free ports for the broker" >&2
    exit 1
}

# The librdkafka properties anomalyd sets unless configured (src/source/kafka.rs, `connect`):
# bench/run gives the ceiling and the Python baseline the same, so all read the topic alike.
anomalyd_fetch=(fetch.queue.backoff.ms=10 queued.min.messages=5000 queued.max.messages.kbytes=2048 max.partition.fetch.bytes=262144)

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

json_field() { python3 -c "import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1]).get('$1', ''))"; }

# One sample of the daemon's /metrics; empty while the admin port is not up.
metric() { { curl -s "http://127.0.0.1:$1/metrics" || true; } | awk -v m="$2" '$1 == m { print $2 }'; }

anomalyd_pid=
stop_anomalyd() {
    [ -n "$anomalyd_pid" ] || return 0
    kill -TERM "$anomalyd_pid" 2>/dev/null || true
    wait "$anomalyd_pid" 2>/dev/null || true
    anomalyd_pid=
}

# Writes an anomalyd config for the bench stream to $work/anomalyd.toml: MODEL, TOPIC, GROUP,
# STRIDE, admin PORT, then extra TOML lines, then $BENCH_EXTRA_TOML (e.g. a [kafka.properties]
# section to try other fetch settings).
anomalyd_config() {
    local model=$1 topic=$2 group=$3 stride=$4 port=$5 extra=${6:-}
    local columns
    columns=$(python3 -c "import json, sys; m = json.load(open(sys.argv[1] + '/model.json'))
print(', '.join(['\"ts\"'] + ['\"%s\"' % c['source'] for c in m['preprocess']['columns']]))" "$model")
    cat > "$work/anomalyd.toml" <<TOML
[model]
path = "$model"
[source]
kind = "kafka"
format = "csv"
csv_delimiter = ";"
csv_columns = [$columns]
[kafka]
brokers = "$brokers"
topics = ["$topic"]
group_id = "$group"
series_from_key = true
[mapping]
timestamp_field = "ts"
timestamp_format = "unix_s"
[windows]
stride = $stride
[output]
sink = "file"
path = "$work/alerts.jsonl"
[admin]
listen = "127.0.0.1:$port"
$extra
${BENCH_EXTRA_TOML:-}
TOML
}

# Runs anomalyd on TOPIC until it has scored EXPECTED windows of RECORDS records; prints
# "seconds cpu_seconds peak_rss_kb windows" with seconds from the first record read to the last
# window scored (polled every 20 ms).
run_anomalyd() {
    local model=$1 topic=$2 group=$3 stride=$4 records=$5 expected=$6
    local port first= now got w
    port=$(free_port)
    anomalyd_config "$model" "$topic" "$group" "$stride" "$port"
    target/release/anomalyd run --config "$work/anomalyd.toml" 2>"$work/anomalyd.log" &
    anomalyd_pid=$!
    while :; do
        kill -0 "$anomalyd_pid" 2>/dev/null || { cat "$work/anomalyd.log" >&2; exit 1; }
        now=$(date +%s.%N)
        got=$(metric "$port" anomalyd_records_received_total)
        w=$(metric "$port" anomalyd_windows_scored_total)
        [ -z "$first" ] && [ "${got:-0}" != 0 ] && first=$now
        [ "${w:-0}" = "$expected" ] && break
        sleep 0.02
    done
    local cpu rss
    cpu=$(awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$anomalyd_pid/stat")
    rss=$(awk '/^VmHWM/ { print $2 }' "/proc/$anomalyd_pid/status")
    [ "$(metric "$port" anomalyd_records_received_total)" = "$records" ] || echo "bench: anomalyd read more than $records records" >&2
    stop_anomalyd
    awk -v s="$first" -v e="$now" -v c="$cpu" -v r="$rss" -v w="$expected" 'BEGIN { print e - s, c, r, w }'
}
