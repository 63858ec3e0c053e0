//! Payloads → raw records: series key, event time, and the model's source fields.
//!
//! One line is one record (CSV or NDJSON), so every source — a file, stdin, a Kafka message —
//! feeds the same parser. Errors are typed: the caller counts them by [`ParseError::reason`],
//! logs them rate-limited and skips (or dead-letters) the record; parsing never panics on input.
//!
//! It holds the three line formats in one file (about 420 lines before its tests) because they
//! share the field mapping, the value and timestamp rules and the error type; each format is one
//! section.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime};
use influxdb_line_protocol::FieldValue;
use tracing::error;

/// Text the trainer reads as a missing value (trainer/anomalyd_trainer/data.py `MISSING_TEXT`).
const MISSING_TEXT: [&str; 9] = ["", "nan", "NaN", "NAN", "null", "NULL", "None", "NA", "N/A"];

/// Lines longer than this are refused before parsing (a record is a few hundred bytes).
pub const MAX_LINE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A number; missing / NaN / ±inf are kept as non-finite for the NaN policy.
    Numeric,
    /// A category for one-hot columns, compared as trimmed text.
    Categorical,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FieldSpec {
    pub name: String,
    pub kind: FieldKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TimeFormat {
    UnixSecs,
    UnixMillis,
    UnixNanos,
    /// RFC 3339 / ISO 8601 with an offset, or a naive `YYYY-MM-DD[ T]HH:MM:SS[.f]` taken as UTC.
    Auto,
    /// A strftime pattern; a time without offset is UTC.
    Pattern(String),
}

impl TimeFormat {
    pub fn parse(text: &str) -> TimeFormat {
        match text {
            "unix_s" => TimeFormat::UnixSecs,
            "unix_ms" => TimeFormat::UnixMillis,
            "unix_ns" => TimeFormat::UnixNanos,
            "auto" | "rfc3339" => TimeFormat::Auto,
            pattern => TimeFormat::Pattern(pattern.to_string()),
        }
    }

    /// Event time in unix seconds.
    fn seconds(&self, text: &str) -> Option<f64> {
        let text = text.trim();
        let number = || text.parse::<f64>().ok().filter(|v| v.is_finite());
        match self {
            TimeFormat::UnixSecs => number(),
            TimeFormat::UnixMillis => number().map(|v| v * 1e-3),
            TimeFormat::UnixNanos => number().map(|v| v * 1e-9),
            TimeFormat::Auto => DateTime::parse_from_rfc3339(text).map(|t| t.timestamp_micros() as f64 * 1e-6).ok().or_else(|| {
                ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
                    .iter()
                    .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
                    .map(|t| t.and_utc().timestamp_micros() as f64 * 1e-6)
            }),
            TimeFormat::Pattern(p) => DateTime::parse_from_str(text, p)
                .map(|t| t.timestamp_micros() as f64 * 1e-6)
                .or_else(|_| NaiveDateTime::parse_from_str(text, p).map(|t| t.and_utc().timestamp_micros() as f64 * 1e-6))
                .ok(),
        }
    }
}

/// Which fields of a record feed the model, and how the series and event time are found.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMap {
    /// Event-time field; `None` means arrival order is time order (sequence numbers per series).
    pub timestamp: Option<(String, TimeFormat)>,
    /// Fields whose values, joined with `/`, name the series; empty = one series per input.
    pub series: Vec<String>,
    /// The model's source fields, in the order the preprocessor expects their values.
    pub fields: Vec<FieldSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Num(f64),
    Text(String),
}

/// One parsed record. `values[i]` belongs to `FieldMap::fields[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    pub series: String,
    /// Unix seconds, or `None` when the map has no timestamp field.
    pub ts: Option<f64>,
    pub values: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("line of {0} bytes exceeds the {MAX_LINE_BYTES}-byte limit")]
    TooLong(usize),
    #[error("{0}")]
    Malformed(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("field `{0}` is missing")]
    MissingField(String),
    #[error("field `{field}`: not a number: {value:?}")]
    NotANumber { field: String, value: String },
    #[error("field `{field}`: not a timestamp: {value:?}")]
    BadTimestamp { field: String, value: String },
    #[error("expected {expected} CSV columns, got {got}")]
    ColumnCount { expected: usize, got: usize },
}

impl ParseError {
    /// A stable label value for metrics (never raw error text).
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::TooLong(_) => "too_long",
            ParseError::Malformed(_) | ParseError::NotObject => "malformed",
            ParseError::MissingField(_) | ParseError::ColumnCount { .. } => "missing_field",
            ParseError::NotANumber { .. } => "wrong_type",
            ParseError::BadTimestamp { .. } => "bad_timestamp",
        }
    }
}

/// One input line's bytes (without its `\n`) as text, without a trailing `\r`. A line that is not
/// UTF-8 is a malformed record, skipped and counted like any other: the input goes on.
pub fn line_text(mut bytes: Vec<u8>) -> Result<String, ParseError> {
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|_| ParseError::Malformed("line is not UTF-8".into()))
}

fn numeric(field: &str, text: &str) -> Result<f64, ParseError> {
    let t = text.trim();
    if MISSING_TEXT.contains(&t) {
        return Ok(f64::NAN);
    }
    t.parse::<f64>().map_err(|_| ParseError::NotANumber { field: field.to_string(), value: text.to_string() })
}

fn value_from_text(spec: &FieldSpec, text: &str) -> Result<Value, ParseError> {
    match spec.kind {
        FieldKind::Numeric => numeric(&spec.name, text).map(Value::Num),
        FieldKind::Categorical => Ok(Value::Text(text.trim().to_string())),
    }
}

fn timestamp(map: &FieldMap, text: &str) -> Result<Option<f64>, ParseError> {
    let Some((field, format)) = &map.timestamp else { return Ok(None) };
    format.seconds(text).map(Some).ok_or_else(|| ParseError::BadTimestamp { field: field.clone(), value: text.to_string() })
}

// === CSV ===

/// One CSV line's cells, split by `csv-core` (the `csv` crate's parser: RFC 4180 quoting, `""`
/// escapes, CRLF) into buffers that are kept between lines, so a line costs no allocation.
#[derive(Debug)]
struct CsvSplitter {
    /// Boxed: its transition tables are large, and parsers are moved around.
    reader: Box<csv_core::Reader>,
    /// The unquoted cell bytes, back to back, and where each cell ends in them.
    out: Vec<u8>,
    ends: Vec<usize>,
}

impl Clone for CsvSplitter {
    fn clone(&self) -> CsvSplitter {
        CsvSplitter { reader: self.reader.clone(), out: Vec::new(), ends: Vec::new() }
    }
}

impl CsvSplitter {
    fn new(delimiter: char) -> CsvSplitter {
        let delimiter = u8::try_from(delimiter).ok().filter(u8::is_ascii).expect("validated: the CSV delimiter is one ASCII character");
        CsvSplitter { reader: Box::new(csv_core::ReaderBuilder::new().delimiter(delimiter).build()), out: vec![0; 256], ends: vec![0; 16] }
    }

    /// Splits one line (a leading UTF-8 BOM is dropped); the cells, in order.
    fn split<'a>(&'a mut self, line: &str) -> Vec<&'a str> {
        let line = line.strip_prefix('\u{feff}').unwrap_or(line).trim_end_matches(['\r', '\n']).as_bytes();
        self.reader.reset();
        let (mut read, mut written, mut cells) = (0, 0, 0);
        loop {
            // After the whole line, an empty input tells the reader the record ends here.
            let (result, nin, nout, nend) = self.reader.read_record(&line[read..], &mut self.out[written..], &mut self.ends[cells..]);
            (read, written, cells) = (read + nin, written + nout, cells + nend);
            match result {
                csv_core::ReadRecordResult::OutputFull => self.out.resize(self.out.len() * 2, 0),
                csv_core::ReadRecordResult::OutputEndsFull => self.ends.resize(self.ends.len() * 2, 0),
                csv_core::ReadRecordResult::InputEmpty if read < line.len() => {}
                csv_core::ReadRecordResult::InputEmpty if !line.is_empty() => {
                    let (result, _, nout, nend) = self.reader.read_record(&[], &mut self.out[written..], &mut self.ends[cells..]);
                    (written, cells) = (written + nout, cells + nend);
                    if matches!(result, csv_core::ReadRecordResult::Record) {
                        break;
                    }
                }
                _ => break,
            }
        }
        let mut start = 0;
        self.ends[..cells]
            .iter()
            .map(|&end| {
                // csv-core copies the line's bytes without the quotes: still UTF-8.
                let cell = std::str::from_utf8(&self.out[start..end]).expect("cells of a UTF-8 line are UTF-8");
                start = end;
                cell
            })
            .collect()
    }
}

/// Parses CSV lines whose columns are known (a header line, or configured names).
#[derive(Debug, Clone)]
pub struct CsvParser {
    map: FieldMap,
    splitter: CsvSplitter,
    columns: usize,
    /// Column index of the timestamp, each series field and each model field.
    ts_col: Option<usize>,
    series_cols: Vec<usize>,
    field_cols: Vec<usize>,
}

impl CsvParser {
    /// `header` names the columns in order. Fails with the first field the header lacks.
    pub fn new(map: FieldMap, header: &[String], delimiter: char) -> Result<CsvParser, ParseError> {
        let index: HashMap<&str, usize> = header.iter().enumerate().map(|(i, h)| (h.trim(), i)).collect();
        let col = |name: &str| index.get(name).copied().ok_or_else(|| ParseError::MissingField(name.to_string()));
        let ts_col = map.timestamp.as_ref().map(|(f, _)| col(f)).transpose()?;
        let series_cols = map.series.iter().map(|f| col(f)).collect::<Result<_, _>>()?;
        let field_cols = map.fields.iter().map(|f| col(&f.name)).collect::<Result<_, _>>()?;
        Ok(CsvParser { map, splitter: CsvSplitter::new(delimiter), columns: header.len(), ts_col, series_cols, field_cols })
    }

    pub fn header(line: &str, delimiter: char) -> Vec<String> {
        CsvSplitter::new(delimiter).split(line).into_iter().map(String::from).collect()
    }

    /// `default_series` names the series when the map has no series fields.
    pub fn parse(&mut self, line: &str, default_series: &str) -> Result<RawRecord, ParseError> {
        if line.len() > MAX_LINE_BYTES {
            return Err(ParseError::TooLong(line.len()));
        }
        let cells = self.splitter.split(line);
        if cells.len() != self.columns {
            return Err(ParseError::ColumnCount { expected: self.columns, got: cells.len() });
        }
        let ts = match self.ts_col {
            Some(i) => timestamp(&self.map, cells[i])?,
            None => None,
        };
        let series = if self.series_cols.is_empty() {
            default_series.to_string()
        } else {
            self.series_cols.iter().map(|&i| cells[i]).collect::<Vec<_>>().join("/")
        };
        let values =
            self.map.fields.iter().zip(&self.field_cols).map(|(spec, &i)| value_from_text(spec, cells[i])).collect::<Result<_, _>>()?;
        Ok(RawRecord { series, ts, values })
    }
}

// === NDJSON ===

fn json_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(if *b { "True" } else { "False" }.to_string()),
        _ => None,
    }
}

/// Parses one JSON object per line; fields are looked up by name.
pub fn parse_ndjson(map: &FieldMap, line: &str, default_series: &str) -> Result<RawRecord, ParseError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(ParseError::TooLong(line.len()));
    }
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| ParseError::Malformed(format!("not valid JSON: {e}")))?;
    let obj = value.as_object().ok_or(ParseError::NotObject)?;
    let get = |name: &str| obj.get(name).ok_or_else(|| ParseError::MissingField(name.to_string()));
    let ts = match &map.timestamp {
        Some((field, _)) => {
            let raw = get(field)?;
            let text = json_text(raw).unwrap_or_default();
            timestamp(map, &text)?
        }
        None => None,
    };
    let series = if map.series.is_empty() {
        default_series.to_string()
    } else {
        let parts = map.series.iter().map(|f| get(f).map(|v| json_text(v).unwrap_or_default())).collect::<Result<Vec<_>, _>>()?;
        parts.join("/")
    };
    let values = map
        .fields
        .iter()
        .map(|spec| {
            let raw = get(&spec.name)?;
            match (spec.kind, raw) {
                (FieldKind::Numeric, serde_json::Value::Number(n)) => Ok(Value::Num(n.as_f64().unwrap_or(f64::NAN))),
                (FieldKind::Numeric, serde_json::Value::Null) => Ok(Value::Num(f64::NAN)),
                (FieldKind::Numeric, serde_json::Value::String(s)) => numeric(&spec.name, s).map(Value::Num),
                (FieldKind::Numeric, other) => Err(ParseError::NotANumber { field: spec.name.clone(), value: other.to_string() }),
                (FieldKind::Categorical, other) => Ok(Value::Text(json_text(other).unwrap_or_default().trim().to_string())),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(RawRecord { series, ts, values })
}

// === Influx line protocol ===

/// Parses `measurement[,tag=v…] field=v[,field=v…] [timestamp]` (InfluxDB line protocol, with
/// its escaping and quoting rules, by InfluxData's parser). Names in the map are looked up among
/// tags, then fields; `_measurement` is the measurement. The trailing timestamp is read with the
/// map's time format (unix_ns by default in Influx); without one, the record has no event time.
pub fn parse_influx(map: &FieldMap, line: &str, default_series: &str) -> Result<RawRecord, ParseError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(ParseError::TooLong(line.len()));
    }
    let malformed = |e: &dyn std::fmt::Display| ParseError::Malformed(format!("not influx line protocol: {e}"));
    let parsed = match influxdb_line_protocol::parse_lines(line.trim_end_matches(['\r', '\n'])).next() {
        Some(Ok(parsed)) => parsed,
        Some(Err(e)) => return Err(malformed(&e)),
        None => return Err(malformed(&"an empty line")),
    };
    let text = |name: &str| -> Option<String> {
        if name == "_measurement" {
            return Some(parsed.series.measurement.to_string());
        }
        if let Some(tag) = parsed.tag_value(name) {
            return Some(tag.to_string());
        }
        parsed.field_value(name).map(|v| match v {
            FieldValue::String(s) => s.to_string(),
            FieldValue::I64(n) => n.to_string(),
            FieldValue::U64(n) => n.to_string(),
            FieldValue::F64(x) => x.to_string(),
            FieldValue::Boolean(b) => b.to_string(),
        })
    };
    let get = |name: &str| text(name).ok_or_else(|| ParseError::MissingField(name.to_string()));
    let ts = match (&map.timestamp, parsed.timestamp) {
        (Some(_), Some(t)) => timestamp(map, &t.to_string())?,
        (Some((field, _)), None) => return Err(ParseError::MissingField(field.clone())),
        (None, _) => None,
    };
    let series = if map.series.is_empty() {
        default_series.to_string()
    } else {
        map.series.iter().map(|f| get(f)).collect::<Result<Vec<_>, _>>()?.join("/")
    };
    let values = map.fields.iter().map(|spec| value_from_text(spec, &get(&spec.name)?)).collect::<Result<_, _>>()?;
    Ok(RawRecord { series, ts, values })
}

// === Any format ===

/// The parser of one source: CSV (header known, or still to come as the first line), NDJSON or
/// Influx line protocol.
pub enum LineParser {
    Csv(CsvParser),
    /// CSV from a stream whose first line is the header (stdin): built when it arrives.
    CsvHeaderNext {
        map: FieldMap,
        delimiter: char,
    },
    /// The header lacked a field the model needs: no line can be parsed.
    CsvBadHeader(ParseError),
    Ndjson(FieldMap),
    Influx(FieldMap),
}

/// The line formats the parsers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    Csv,
    Ndjson,
    /// InfluxDB line protocol.
    Influx,
}

impl LineParser {
    /// The parser of `format`. A CSV `header` names the columns; without one, the stream's first
    /// line will be its header. A header that lacks a field the model needs is an error now.
    pub fn for_format(format: LineFormat, map: FieldMap, header: Option<&[String]>, delimiter: char) -> Result<LineParser, ParseError> {
        Ok(match (format, header) {
            (LineFormat::Ndjson, _) => LineParser::Ndjson(map),
            (LineFormat::Influx, _) => LineParser::Influx(map),
            (LineFormat::Csv, None) => LineParser::CsvHeaderNext { map, delimiter },
            (LineFormat::Csv, Some(header)) => LineParser::Csv(CsvParser::new(map, header, delimiter)?),
        })
    }

    /// `None` when the line was the header.
    pub fn parse(&mut self, line: &str, default_series: &str) -> Option<Result<RawRecord, ParseError>> {
        match self {
            LineParser::Csv(p) => Some(p.parse(line, default_series)),
            LineParser::Ndjson(map) => Some(parse_ndjson(map, line, default_series)),
            LineParser::Influx(map) => Some(parse_influx(map, line, default_series)),
            LineParser::CsvBadHeader(e) => Some(Err(e.clone())),
            LineParser::CsvHeaderNext { map, delimiter } => {
                *self = match CsvParser::new(map.clone(), &CsvParser::header(line, *delimiter), *delimiter) {
                    Ok(p) => LineParser::Csv(p),
                    Err(e) => {
                        error!(error = %e, "CSV header lacks a field the model needs; no record can be read.");
                        LineParser::CsvBadHeader(e)
                    }
                };
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> FieldMap {
        FieldMap {
            timestamp: Some(("ts".into(), TimeFormat::UnixSecs)),
            series: vec!["host".into()],
            fields: vec![
                FieldSpec { name: "cpu".into(), kind: FieldKind::Numeric },
                FieldSpec { name: "proto".into(), kind: FieldKind::Categorical },
            ],
        }
    }

    #[test]
    fn csv_maps_columns_by_header_and_keeps_missing_values_as_nan() {
        let header = CsvParser::header("ts;proto;host;cpu\n", ';');
        let mut p = CsvParser::new(map(), &header, ';').unwrap();
        let r = p.parse("5;\" tcp\";a;\n", "x").unwrap();
        assert_eq!((r.series.as_str(), r.ts), ("a", Some(5.0)));
        assert!(matches!(r.values[0], Value::Num(v) if v.is_nan()));
        assert_eq!(r.values[1], Value::Text("tcp".into()));
        assert_eq!(p.parse("5;tcp;a;abc", "x").unwrap_err().reason(), "wrong_type");
        assert_eq!(p.parse("5;tcp;a", "x").unwrap_err().reason(), "missing_field");
        assert_eq!(p.parse("yesterday;tcp;a;1", "x").unwrap_err().reason(), "bad_timestamp");
        assert!(CsvParser::new(map(), &["ts".to_string()], ';').is_err());
    }

    #[test]
    fn csv_cells_follow_rfc_4180_quoting_and_a_bom_is_not_part_of_the_header() {
        assert_eq!(CsvParser::header("\u{feff}ts,host,cpu\r\n", ','), ["ts", "host", "cpu"]);
        let mut p = CsvParser::new(map(), &CsvParser::header("ts,proto,host,cpu", ','), ',').unwrap();
        let r = p.parse("5,\"t,c\"\"p\",\"a,b\",1.5\r\n", "x").unwrap();
        assert_eq!((r.series.as_str(), r.ts), ("a,b", Some(5.0)));
        assert_eq!(r.values, [Value::Num(1.5), Value::Text("t,c\"p".into())]);
        // The buffers grow for a long line and serve the next one.
        let long = "y".repeat(5000);
        assert_eq!(p.parse(&format!("6,{long},a,2"), "x").unwrap().values[1], Value::Text(long));
        assert_eq!(p.parse("7,tcp,a,3", "x").unwrap().values, [Value::Num(3.0), Value::Text("tcp".into())]);
    }

    #[test]
    fn ndjson_accepts_numbers_strings_and_null_and_names_bad_fields() {
        let m = map();
        let r = parse_ndjson(&m, r#"{"ts": 7, "host": "h", "cpu": "inf", "proto": 6}"#, "x").unwrap();
        assert!(matches!(r.values[0], Value::Num(v) if v.is_infinite()));
        assert_eq!(r.values[1], Value::Text("6".into()));
        let e = parse_ndjson(&m, r#"{"ts": 7, "host": "h", "cpu": true, "proto": 6}"#, "x").unwrap_err();
        assert_eq!(e.to_string(), "field `cpu`: not a number: \"true\"");
        assert_eq!(parse_ndjson(&m, "[1]", "x").unwrap_err(), ParseError::NotObject);
        assert_eq!(parse_ndjson(&m, "{", "x").unwrap_err().reason(), "malformed");
        assert_eq!(parse_ndjson(&m, r#"{"ts": 7}"#, "x").unwrap_err(), ParseError::MissingField("host".into()));
    }

    #[test]
    fn influx_lines_map_tags_fields_and_the_timestamp() {
        let mut m = map();
        m.timestamp = Some(("time".into(), TimeFormat::UnixNanos));
        let r = parse_influx(&m, r#"net,host=web\ 1,dc=x proto="tcp",cpu=42i 1500000000000000000"#, "x").unwrap();
        assert_eq!((r.series.as_str(), r.ts), ("web 1", Some(1.5e9)));
        assert_eq!(r.values, [Value::Num(42.0), Value::Text("tcp".into())]);
        assert_eq!(parse_influx(&m, "net,host=a cpu=1", "x").unwrap_err(), ParseError::MissingField("time".into()));
        assert_eq!(parse_influx(&m, "net,host=a proto=\"t\",cpu=\"abc\" 5", "x").unwrap_err().reason(), "wrong_type");
        // An unquoted word is no field value in the line protocol.
        assert_eq!(parse_influx(&m, "net,host=a proto=\"t\",cpu=abc 5", "x").unwrap_err().reason(), "malformed");
        // Escapes in measurement, tag keys and values, and quoted strings, per the spec.
        let r = parse_influx(&m, r#"n\,x,host=a\=b\,c proto="say \"hi\"",cpu=1.5e3 7"#, "x").unwrap();
        assert_eq!(r.series, "a=b,c");
        assert_eq!(r.values, [Value::Num(1500.0), Value::Text("say \"hi\"".into())]);
        assert_eq!(parse_influx(&m, "just-one-part", "x").unwrap_err().reason(), "malformed");
        assert_eq!(parse_influx(&m, "net,host=a proto=\"t\" 5", "x").unwrap_err(), ParseError::MissingField("cpu".into()));
    }

    #[test]
    fn timestamps_in_each_format() {
        assert_eq!(TimeFormat::parse("unix_ms").seconds("1500"), Some(1.5));
        assert_eq!(TimeFormat::Auto.seconds("2020-03-09T10:14:33Z"), Some(1583748873.0));
        assert_eq!(TimeFormat::Auto.seconds("2020-03-09 10:14:33"), Some(1583748873.0));
        assert_eq!(TimeFormat::parse("%Y-%m-%d %H:%M:%S").seconds("2020-03-09 10:14:33"), Some(1583748873.0));
        assert_eq!(TimeFormat::parse("%Y-%m-%d %H:%M:%S").seconds("2020-03-09"), None);
    }
}
