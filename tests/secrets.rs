//! `[kafka.properties]` values (passwords) with the real binary: given from a file or the
//! environment, they reach librdkafka; no error names them, whether the TOML around them is
//! broken or librdkafka refuses a property. No broker is needed: librdkafka checks properties
//! when the client is created, and the daemon gets ready without a broker.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{repo, temp_dir, Daemon};

/// Distinctive, so that finding it anywhere in the output is the leak.
const SECRET: &str = "S3cr3t-pw-4242";

/// A Kafka-source config (an unreachable broker) whose `[kafka.properties]` table is `properties`.
fn kafka_config(properties: &str) -> String {
    format!(
        r#"
[model]
path = "{}"
[source]
kind = "kafka"
format = "csv"
csv_delimiter = ";"
csv_columns = ["datetime", "Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple", "Voltage", "Volume Flow RateRMS"]
[kafka]
brokers = "127.0.0.1:1"
topics = ["metrics"]
[admin]
listen = "127.0.0.1:{{port}}"
[kafka.properties]
{properties}
"#,
        repo().join("models/skab-convae").display()
    )
}

/// `anomalyd <command> --config dir/anomalyd.toml` with `config` and extra environment, as
/// (exit code, stdout and stderr).
fn anomalyd(command: &str, dir: &Path, config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let path = dir.join("anomalyd.toml");
    std::fs::write(&path, config.replace("{port}", &common::free_port().to_string())).unwrap();
    let out: Output = Command::new(env!("CARGO_BIN_EXE_anomalyd"))
        .args([command, "--config", path.to_str().unwrap()])
        .current_dir(repo())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_toml_syntax_error_on_the_password_line_names_the_line_not_the_password() {
    let dir = temp_dir("secrets-syntax");
    // The closing quote is missing.
    let config = kafka_config(&format!("\"sasl.username\" = \"anomalyd\"\n\"sasl.password\" = \"{SECRET}\n"));
    for command in ["validate", "run"] {
        let (code, out) = anomalyd(command, &dir, &config, &[]);
        assert_eq!(code, Some(2), "{command}: {out}");
        assert!(!out.contains(SECRET), "{command} printed the password: {out}");
        assert!(out.contains("line 16, column"), "{command} names the line and column: {out}");
    }
}

#[test]
fn a_property_librdkafka_refuses_is_named_without_its_value() {
    let dir = temp_dir("secrets-refused");
    for (properties, key) in [
        (format!("\"sasl.pasword\" = \"{SECRET}\""), "sasl.pasword"),
        (format!("\"security.protocol\" = \"{SECRET}\""), "security.protocol"),
    ] {
        for command in ["validate", "run"] {
            let (code, out) = anomalyd(command, &dir, &kafka_config(&properties), &[]);
            assert_eq!(code, Some(2), "{command}: {out}");
            assert!(!out.contains(SECRET), "{command}: the value was printed: {out}");
            assert!(out.contains(&format!("kafka.properties.{key}")), "{command}: the property is named: {out}");
        }
    }
}

#[test]
fn a_property_from_a_file_or_the_environment_reaches_librdkafka() {
    let dir = temp_dir("secrets-sources");
    // A valid value from a file (its trailing newline is not part of it): the daemon gets ready.
    std::fs::write(dir.join("protocol"), "plaintext\n").unwrap();
    let from_file = format!("\"security.protocol\" = {{ file = \"{}\" }}", dir.join("protocol").display());
    let d = Daemon::start(&dir, &kafka_config(&from_file));
    assert_eq!(d.stop(), 0);
    let (code, out) = anomalyd("validate", &dir, &kafka_config(&from_file), &[]);
    assert_eq!(code, Some(0), "{out}");

    // A value librdkafka refuses, from a file, a variable named in the file, or an override:
    // each reaches the client, which names the property, not the value.
    std::fs::write(dir.join("protocol"), format!("{SECRET}\n")).unwrap();
    let from_env = "\"security.protocol\" = { env = \"KAFKA_PROTOCOL\" }";
    for (properties, env) in [
        (from_file.as_str(), vec![]),
        (from_env, vec![("KAFKA_PROTOCOL", SECRET)]),
        ("", vec![("ANOMALYD__KAFKA__PROPERTIES__SECURITY.PROTOCOL", SECRET)]),
        ("", vec![("ANOMALYD__KAFKA__PROPERTIES__SECURITY__PROTOCOL", SECRET)]),
    ] {
        let (code, out) = anomalyd("run", &dir, &kafka_config(properties), &env);
        assert_eq!(code, Some(2), "{properties} {env:?}: {out}");
        assert!(out.contains("kafka.properties.security.protocol") && !out.contains(SECRET), "{properties} {env:?}: {out}");
    }

    // A file or variable that is not there: the error names the key and the file or variable.
    let missing = dir.join("no-such-file");
    let (code, out) =
        anomalyd("validate", &dir, &kafka_config(&format!("\"sasl.password\" = {{ file = \"{}\" }}", missing.display())), &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("kafka.properties.sasl.password") && out.contains(&missing.display().to_string()), "{out}");
    let (code, out) = anomalyd("validate", &dir, &kafka_config(from_env), &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("kafka.properties.security.protocol") && out.contains("KAFKA_PROTOCOL"), "{out}");
}
