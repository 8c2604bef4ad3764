//! `herald.toml`: the typed configuration of `herald run`, with every default in one place.
//!
//! Owns [`Config`] and [`Config::load`]/[`Config::parse`]. Unknown keys are refused (a
//! typo must not silently fall back to a default), and every error names the key:
//! syntax and type errors come from the TOML parser with line, column and key; checks
//! that span keys (a port that does not parse, zero workers) are done by
//! [`Config::validate`] and name the key as `table.key`.
//!
//! Relative paths in the file (segment file, output directory, snapshot prefix) are
//! resolved against the config file's directory, so a config can be run from anywhere.

use std::path::Path;

use serde::Deserialize;

use crate::EngineError;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[engine]`: the dataflow.
    pub engine: EngineConfig,
    /// `[http]`: the ingest listener (public-facing), and the limits of both listeners.
    #[serde(default)]
    pub http: HttpConfig,
    /// `[admin]`: the query, admin and metrics listener (internal by default).
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[kafka]`: when present, events come from Kafka and changes go to Kafka.
    pub kafka: Option<KafkaConfig>,
    /// `[snapshots]`: profile snapshots picked up from an object-store prefix.
    pub snapshots: Option<SnapshotsConfig>,
    /// `[output]`: local (or object-store) files written by the service.
    #[serde(default)]
    pub output: OutputConfig,
    /// `[cluster]`: this process's place in a multi-process timely cluster.
    pub cluster: Option<ClusterConfig>,
    /// `[warehouse]`: the SQL warehouse connection shared by profile sync, warehouse
    /// audiences and the PostgreSQL sink.
    pub warehouse: Option<WarehouseConfig>,
    /// `[export]`: the warehouse tables (events archive, segment changes, journey
    /// events, messages, delivery outcomes) as Parquet and PostgreSQL tables.
    pub export: Option<ExportConfig>,
    /// `[profile_sync]`: run a warehouse query on a schedule and write its result as a
    /// snapshot under `snapshots.prefix`.
    pub profile_sync: Option<ProfileSyncConfig>,
    /// `[notify]`: deliver the journeys' message actions (templates, channels, outbox).
    pub notify: Option<herald_connectors::notify::config::NotifyConfig>,
    /// `[checkpoint]`: durable state (checkpoints and the embedded ingest log).
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

/// `[checkpoint]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// `dir` as written (None: not given).
    #[serde(default, rename = "dir")]
    pub dir_given: Option<String>,
    /// Directory for checkpoints and the ingest log (relative to the config file); empty
    /// string: state is not kept across restarts. When not given: `herald-state`, or in a
    /// cluster none (a cluster's processes need one they all share, which only the
    /// operator can name).
    #[serde(skip)]
    pub dir: String,
    /// Local directory of the ingest log (relative to the config file): by default `dir`
    /// itself, or `herald-state` when `dir` is on object storage (`s3://`), since the log
    /// is fsynced on every group commit.
    #[serde(default)]
    pub log_dir: String,
    /// How often a checkpoint is taken, as an interval (`"5 seconds"`).
    #[serde(default = "defaults::checkpoint_every")]
    pub every: String,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir_given: None,
            dir: defaults::checkpoint_dir(),
            log_dir: String::new(),
            every: defaults::checkpoint_every(),
        }
    }
}

/// `[warehouse]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarehouseConfig {
    /// The warehouse: `postgres://user:password@host:port/db` (PostgreSQL, Redshift).
    pub postgres: String,
}

/// `[export]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Parquet tables under this prefix (`s3://bucket/herald`, `file:///…`, a directory),
    /// as `TABLE/date=YYYY-MM-DD/hour=HH/*.parquet`.
    #[serde(default)]
    pub parquet: Option<String>,
    /// Load the tables into this schema of `warehouse.postgres` (created if missing).
    #[serde(default)]
    pub postgres_schema: Option<String>,
    /// A buffer is written out at this many rows (one file per partition).
    #[serde(default = "defaults::export_max_rows")]
    pub max_rows_per_file: usize,
    /// … or at about this many bytes of rows in memory.
    #[serde(default = "defaults::export_max_bytes")]
    pub max_file_bytes: usize,
    /// … or this long after its oldest row arrived, as an interval (`"1 minute"`).
    #[serde(default = "defaults::export_flush_every")]
    pub flush_every: String,
}

/// `[profile_sync]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSyncConfig {
    /// The warehouse to query; defaults to `warehouse.postgres`.
    #[serde(default)]
    pub postgres: Option<String>,
    /// The query: one row per user, a `user_id` column and one column per trait.
    pub query: String,
    /// How often to run it, as an interval (`"1 hour"`); also once at start.
    #[serde(default = "defaults::profile_sync_every")]
    pub every: String,
}

/// `[engine]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// The segment file (required).
    pub segments: String,
    /// A journey file (YAML) to run on the wall clock, if any.
    #[serde(default)]
    pub journeys: Option<String>,
    /// Timely worker threads in this process.
    #[serde(default = "defaults::workers")]
    pub workers: usize,
    /// How often (ms) the dataflow clock follows the wall clock when idle; also the most
    /// an event waits for its instant to close.
    #[serde(default = "defaults::tick_ms")]
    pub tick_ms: u64,
    /// `messageId` dedup horizon, as an interval (`"24 hours"`).
    #[serde(default = "defaults::dedup_horizon")]
    pub dedup_horizon: String,
    /// Largest accepted message, bytes.
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
}

/// `[http]`: the ingest listener, and the connection limits of both listeners.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on (`host:port`); port 0 picks a free port.
    #[serde(default = "defaults::listen")]
    pub listen: String,
    /// Accepted write keys (the HTTP Basic user name): ingest only. Empty: ingest is
    /// refused. After loading, this also holds the keys of `write_keys_file` and
    /// `write_keys_env`.
    #[serde(default = "defaults::write_keys")]
    pub write_keys: Vec<String>,
    /// A file of more write keys, one per line (`#` comments and blank lines skipped).
    #[serde(default)]
    pub write_keys_file: Option<String>,
    /// An environment variable holding more write keys, comma-separated.
    #[serde(default)]
    pub write_keys_env: Option<String>,
    /// PEM certificate chain: with `tls_key`, the listener speaks HTTPS only. Both files
    /// are read again when they change (certificate rotation without a restart).
    #[serde(default)]
    pub tls_cert: Option<String>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<String>,
    /// Most connections open at once on each listener; more wait in the kernel's
    /// backlog until one closes.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Most connections one client address may hold open on a listener; past it, its new
    /// connections are closed at once.
    #[serde(default = "defaults::max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// How long a client has to send a request's headers (and a TLS handshake).
    #[serde(default = "defaults::header_timeout")]
    pub header_timeout: String,
    /// How long a client has to send a request's body.
    #[serde(default = "defaults::body_timeout")]
    pub body_timeout: String,
    /// A connection with no bytes in or out for this long is closed (half-open and idle
    /// keep-alive connections).
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: String,
    /// Requests per second each write key may make (a token bucket); over it, 429 with
    /// `Retry-After`. 0: no limit.
    #[serde(default = "defaults::write_rate_limit")]
    pub rate_limit: u32,
    /// Requests a write key may make at once above its rate (the bucket's size).
    #[serde(default = "defaults::write_rate_burst")]
    pub rate_burst: u32,
    /// `dead_letters.jsonl` is rotated when it reaches this many bytes
    /// (`dead_letters.1.jsonl` is the newest rotated file).
    #[serde(default = "defaults::dead_letter_file_bytes")]
    pub dead_letter_file_bytes: u64,
    /// Rotated dead-letter files kept; the oldest beyond them is deleted (and counted in
    /// `herald_dead_letters_dropped_total`).
    #[serde(default = "defaults::dead_letter_files")]
    pub dead_letter_files: usize,
    /// Bytes of a rejected payload copied into its dead letter (the rest is cut, and the
    /// letter says how long the payload was).
    #[serde(default = "defaults::dead_letter_payload_bytes")]
    pub dead_letter_payload_bytes: usize,
    /// Dead letters one request writes with their payloads; the rest of that request's
    /// rejections are written as one summary letter (counts by reason).
    #[serde(default = "defaults::dead_letters_per_request")]
    pub dead_letters_per_request: usize,
    /// Largest accepted request body after decompression, bytes.
    #[serde(default = "defaults::max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Page size of `/v1/segments/{name}/members` when the caller gives none.
    #[serde(default = "defaults::page_size")]
    pub page_size: usize,
}

/// `[admin]`: the listener of the query API (`/v1/segments`, `/v1/users/{id}`), admin
/// actions (journey triggers, engagement reports) and `/metrics`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on; a non-loopback address needs TLS and keys.
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
    /// Keys that read: the query API and `/metrics` (`Authorization: Bearer KEY`).
    #[serde(default)]
    pub read_keys: Vec<String>,
    /// A file of more read keys, one per line.
    #[serde(default)]
    pub read_keys_file: Option<String>,
    /// An environment variable holding more read keys, comma-separated.
    #[serde(default)]
    pub read_keys_env: Option<String>,
    /// Keys that read and act: journey triggers, engagement reports, definitions.
    #[serde(default)]
    pub admin_keys: Vec<String>,
    /// A file of more admin keys, one per line.
    #[serde(default)]
    pub admin_keys_file: Option<String>,
    /// An environment variable holding more admin keys, comma-separated.
    #[serde(default)]
    pub admin_keys_env: Option<String>,
    /// PEM certificate chain of the admin listener (reloaded when it changes).
    #[serde(default)]
    pub tls_cert: Option<String>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<String>,
    /// Requests per second each read or admin key may make; 0: no limit.
    #[serde(default = "defaults::admin_rate_limit")]
    pub rate_limit: u32,
    /// The bucket's size above that rate.
    #[serde(default = "defaults::admin_rate_burst")]
    pub rate_burst: u32,
}

/// `[kafka]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group.
    #[serde(default = "defaults::group_id")]
    pub group_id: String,
    /// Topics events are read from (HTTP ingest produces to the first).
    #[serde(default = "defaults::events_topics")]
    pub events_topics: Vec<String>,
    /// Topic for malformed messages (reason and position in headers).
    #[serde(default = "defaults::dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Topic the segment changelog is written to, keyed by user id.
    #[serde(default = "defaults::changes_topic")]
    pub changes_topic: String,
    /// Topic message actions are written to, keyed by user id (journeys only).
    #[serde(default = "defaults::messages_topic")]
    pub messages_topic: String,
    /// The consumer's `fetch.wait.max.ms`: with tansu, the latency floor (see docs).
    #[serde(default = "defaults::fetch_wait_max_ms")]
    pub fetch_wait_max_ms: u64,
    /// The producers' `linger.ms`: how long a record may wait to share a request.
    #[serde(default = "defaults::linger_ms")]
    pub linger_ms: u64,
    /// Where a group with no committed offset starts: `earliest` or `latest`.
    #[serde(default = "defaults::auto_offset_reset")]
    pub auto_offset_reset: String,
    /// Extra librdkafka properties for every client (consumer and producers).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
}

/// `[snapshots]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// Object-store prefix (`s3://bucket/profiles/`, `file:///…`, or a directory).
    pub prefix: String,
    /// How often the prefix is listed, as an interval (`"1 minute"`).
    #[serde(default = "defaults::snapshot_refresh")]
    pub refresh: String,
}

/// `[output]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Directory for `segment_changes.jsonl` and `dead_letters.jsonl` (appended); empty
    /// string: no files.
    #[serde(default = "defaults::output_dir")]
    pub dir: String,
}

/// `[cluster]`: see timely's cluster mode. Every process runs the same config except
/// `process`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This process's index into `addresses`.
    pub process: usize,
    /// `host:port` of every process, in order.
    pub addresses: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: defaults::listen(),
            write_keys: defaults::write_keys(),
            write_keys_file: None,
            write_keys_env: None,
            tls_cert: None,
            tls_key: None,
            max_connections: defaults::max_connections(),
            max_connections_per_ip: defaults::max_connections_per_ip(),
            header_timeout: defaults::header_timeout(),
            body_timeout: defaults::body_timeout(),
            idle_timeout: defaults::idle_timeout(),
            rate_limit: defaults::write_rate_limit(),
            rate_burst: defaults::write_rate_burst(),
            dead_letter_file_bytes: defaults::dead_letter_file_bytes(),
            dead_letter_files: defaults::dead_letter_files(),
            dead_letter_payload_bytes: defaults::dead_letter_payload_bytes(),
            dead_letters_per_request: defaults::dead_letters_per_request(),
            max_batch_bytes: defaults::max_batch_bytes(),
            page_size: defaults::page_size(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: defaults::admin_listen(),
            read_keys: Vec::new(),
            read_keys_file: None,
            read_keys_env: None,
            admin_keys: Vec::new(),
            admin_keys_file: None,
            admin_keys_env: None,
            tls_cert: None,
            tls_key: None,
            rate_limit: defaults::admin_rate_limit(),
            rate_burst: defaults::admin_rate_burst(),
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: defaults::output_dir(),
        }
    }
}

/// Every default, in one place.
pub mod defaults {
    /// One worker per core.
    pub fn workers() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
    /// 1 ms: the clock's resolution.
    pub fn tick_ms() -> u64 {
        1
    }
    /// The spec's 24 hours.
    pub fn dedup_horizon() -> String {
        "24 hours".into()
    }
    /// The spec's 32 KB.
    pub fn max_message_bytes() -> usize {
        herald_operators::event::DEFAULT_MAX_MESSAGE_BYTES
    }
    /// Loopback only, port 8080.
    pub fn listen() -> String {
        "127.0.0.1:8080".into()
    }
    /// No keys: ingest refused until one is configured.
    pub fn write_keys() -> Vec<String> {
        Vec::new()
    }
    /// The spec's 500 KB.
    pub fn max_batch_bytes() -> usize {
        500 * 1024
    }
    /// The admin listener: loopback only.
    pub fn admin_listen() -> String {
        "127.0.0.1:8081".into()
    }
    /// Connections per listener.
    pub fn max_connections() -> usize {
        1024
    }
    /// Connections per client address (a NAT or proxy shares one address: raise it then).
    pub fn max_connections_per_ip() -> usize {
        256
    }
    /// To send a request's headers (slowloris).
    pub fn header_timeout() -> String {
        "10 seconds".into()
    }
    /// To send a request's body.
    pub fn body_timeout() -> String {
        "30 seconds".into()
    }
    /// A connection with no traffic.
    pub fn idle_timeout() -> String {
        "60 seconds".into()
    }
    /// Requests per second per write key (one site's browsers share its key).
    pub fn write_rate_limit() -> u32 {
        2000
    }
    /// Burst per write key.
    pub fn write_rate_burst() -> u32 {
        4000
    }
    /// Requests per second per read or admin key.
    pub fn admin_rate_limit() -> u32 {
        200
    }
    /// Burst per read or admin key.
    pub fn admin_rate_burst() -> u32 {
        400
    }
    /// One dead-letter file's size before rotation: 64 MiB.
    pub fn dead_letter_file_bytes() -> u64 {
        64 << 20
    }
    /// Rotated dead-letter files kept (so at most ~320 MiB in all by default).
    pub fn dead_letter_files() -> usize {
        4
    }
    /// Payload bytes copied into a dead letter.
    pub fn dead_letter_payload_bytes() -> usize {
        16 * 1024
    }
    /// Dead letters with payloads per request.
    pub fn dead_letters_per_request() -> usize {
        100
    }
    /// Members per page.
    pub fn page_size() -> usize {
        1000
    }
    /// `herald`.
    pub fn group_id() -> String {
        "herald".into()
    }
    /// `events`.
    pub fn events_topics() -> Vec<String> {
        vec!["events".into()]
    }
    /// `herald.dead_letters`.
    pub fn dead_letter_topic() -> String {
        "herald.dead_letters".into()
    }
    /// `herald.segment_changes`.
    pub fn changes_topic() -> String {
        "herald.segment_changes".into()
    }
    /// `kafka.messages_topic`.
    pub fn messages_topic() -> String {
        "herald.messages".into()
    }
    /// 5 ms (tansu answers a waiting fetch only at this deadline).
    pub fn fetch_wait_max_ms() -> u64 {
        5
    }
    /// 5 ms, librdkafka's default: one request per record floods a broker under load
    /// (docs/benchmarks.md), at the cost of up to 5 ms for a lone record.
    pub fn linger_ms() -> u64 {
        5
    }
    /// A new group reads the topic from the start.
    pub fn auto_offset_reset() -> String {
        "earliest".into()
    }
    /// One minute.
    pub fn snapshot_refresh() -> String {
        "1 minute".into()
    }
    /// 100k rows per file.
    pub fn export_max_rows() -> usize {
        100_000
    }
    /// 64 MiB.
    pub fn export_max_bytes() -> usize {
        64 << 20
    }
    /// One minute: also how long Kafka offset commits wait behind the archive.
    pub fn export_flush_every() -> String {
        "1 minute".into()
    }
    /// Hourly.
    pub fn profile_sync_every() -> String {
        "1 hour".into()
    }
    /// `herald-out` next to the config file.
    pub fn output_dir() -> String {
        "herald-out".into()
    }
    /// Next to the config file.
    pub fn checkpoint_dir() -> String {
        "herald-state".into()
    }
    /// A few seconds: what a crash makes the dataflow redo from the ingest log.
    pub fn checkpoint_every() -> String {
        "5 seconds".into()
    }
}

/// The connection timeouts of both listeners.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// To send the headers (and the TLS handshake).
    pub header: std::time::Duration,
    /// To send the body.
    pub body: std::time::Duration,
    /// With no bytes in or out.
    pub idle: std::time::Duration,
}

/// The keys of `file` (one per line; `#` comments and blank lines skipped) and of the
/// environment variable `env` (comma-separated).
fn more_keys(
    key: &str,
    file: &Option<String>,
    env: &Option<String>,
) -> Result<Vec<String>, EngineError> {
    let mut keys = Vec::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(&format!("{key}_file"), format!("cannot read {path}: {e}")))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    if let Some(var) = env {
        let value = std::env::var(var).map_err(|_| {
            bad(
                &format!("{key}_env"),
                format!("the environment variable {var} is not set (or not UTF-8)"),
            )
        })?;
        keys.extend(
            value
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string),
        );
    }
    Ok(keys)
}

fn bad(key: &str, problem: impl std::fmt::Display) -> EngineError {
    EngineError::Usage(format!("config: `{key}`: {problem}"))
}

impl Config {
    /// Reads, parses, resolves relative paths against the file's directory, validates.
    pub fn load(path: &str) -> Result<Config, EngineError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Usage(format!("cannot read config file {path}: {e}")))?;
        let prefixed = |e| match e {
            EngineError::Usage(m) => EngineError::Usage(format!("{path}: {m}")),
            other => other,
        };
        let mut config = Config::parse_unchecked(&text).map_err(prefixed)?;
        let parent = Path::new(path).parent().unwrap_or(Path::new(""));
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        // Absolute, so that listings (which return absolute paths) match the prefix.
        let base = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
        config.resolve_paths(&base);
        config.finish().map_err(prefixed)?;
        Ok(config)
    }

    /// Parses and validates config text (paths left as written).
    pub fn parse(text: &str) -> Result<Config, EngineError> {
        let mut config = Config::parse_unchecked(text)?;
        config.finish()?;
        Ok(config)
    }

    /// Keys from files and the environment, then every check.
    fn finish(&mut self) -> Result<(), EngineError> {
        let h = &mut self.http;
        let more = more_keys("http.write_keys", &h.write_keys_file, &h.write_keys_env)?;
        h.write_keys.extend(more);
        let a = &mut self.admin;
        let more = more_keys("admin.read_keys", &a.read_keys_file, &a.read_keys_env)?;
        a.read_keys.extend(more);
        let more = more_keys("admin.admin_keys", &a.admin_keys_file, &a.admin_keys_env)?;
        a.admin_keys.extend(more);
        self.validate()
    }

    /// Parses (paths left as written, keys from files and the environment not read yet,
    /// nothing validated).
    fn parse_unchecked(text: &str) -> Result<Config, EngineError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| EngineError::Usage(format!("config: {e}")))?;
        config.checkpoint.dir = match (&config.checkpoint.dir_given, &config.cluster) {
            (Some(d), _) => d.clone(),
            (None, Some(_)) => String::new(),
            (None, None) => defaults::checkpoint_dir(),
        };
        if config.checkpoint.log_dir.is_empty() && !config.checkpoint.dir.is_empty() {
            config.checkpoint.log_dir = if config.checkpoint.dir.contains("://") {
                defaults::checkpoint_dir()
            } else {
                config.checkpoint.dir.clone()
            };
        }
        Ok(config)
    }

    /// Checks what the types cannot say.
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.engine.workers == 0 {
            return Err(bad("engine.workers", "must be at least 1"));
        }
        if self.engine.tick_ms == 0 || self.engine.tick_ms > 60_000 {
            return Err(bad("engine.tick_ms", "must be between 1 and 60000"));
        }
        self.dedup_horizon_ms()?;
        if self.engine.max_message_bytes == 0 {
            return Err(bad("engine.max_message_bytes", "must be positive"));
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "http.listen",
                format!(
                    "'{}' is not an address like 127.0.0.1:8080",
                    self.http.listen
                ),
            ));
        }
        for (key, keys) in [
            ("http.write_keys", &self.http.write_keys),
            ("admin.read_keys", &self.admin.read_keys),
            ("admin.admin_keys", &self.admin.admin_keys),
        ] {
            if keys.iter().any(|k| k.trim().is_empty()) {
                return Err(bad(key, "a key cannot be empty"));
            }
            if keys.iter().any(|k| k.chars().any(char::is_whitespace)) {
                return Err(bad(key, "a key cannot hold spaces or line breaks"));
            }
        }
        self.validate_listeners()?;
        if self.http.max_batch_bytes < self.engine.max_message_bytes {
            return Err(bad(
                "http.max_batch_bytes",
                "must be at least engine.max_message_bytes",
            ));
        }
        self.checkpoint_every_ms()?;
        if self.checkpoint.dir.contains("://") && !self.checkpoint.dir.starts_with("s3://") {
            return Err(bad(
                "checkpoint.dir",
                "must be a local directory or an s3://bucket/prefix URL",
            ));
        }
        if self.checkpoint.log_dir.contains("://") {
            return Err(bad(
                "checkpoint.log_dir",
                "must be a local directory (the ingest log is fsynced at every group commit)",
            ));
        }
        if self.http.page_size == 0 {
            return Err(bad("http.page_size", "must be positive"));
        }
        if let Some(k) = &self.kafka {
            if k.brokers.trim().is_empty() {
                return Err(bad("kafka.brokers", "must name at least one broker"));
            }
            if k.events_topics.is_empty() || k.events_topics.iter().any(|t| t.is_empty()) {
                return Err(bad(
                    "kafka.events_topics",
                    "must list at least one topic name",
                ));
            }
            if k.group_id.is_empty() {
                return Err(bad("kafka.group_id", "cannot be empty"));
            }
            if !matches!(k.auto_offset_reset.as_str(), "earliest" | "latest") {
                return Err(bad(
                    "kafka.auto_offset_reset",
                    format!("'{}' is not earliest or latest", k.auto_offset_reset),
                ));
            }
        }
        if let Some(s) = &self.snapshots {
            self.snapshot_refresh_ms()?;
            if s.prefix.is_empty() {
                return Err(bad("snapshots.prefix", "cannot be empty"));
            }
        }
        if let Some(p) = &self.profile_sync {
            if self.snapshots.is_none() {
                return Err(bad(
                    "profile_sync",
                    "writes snapshots under snapshots.prefix: add a [snapshots] section",
                ));
            }
            if p.query.trim().is_empty() {
                return Err(bad("profile_sync.query", "cannot be empty"));
            }
            if self.warehouse_url(p.postgres.as_deref()).is_none() {
                return Err(bad(
                    "profile_sync.postgres",
                    "names no warehouse: set it, or warehouse.postgres",
                ));
            }
            self.profile_sync_every_ms()?;
        }
        if let Some(x) = &self.export {
            if x.parquet.is_none() && x.postgres_schema.is_none() {
                return Err(bad(
                    "export",
                    "writes nowhere: set export.parquet, export.postgres_schema or both",
                ));
            }
            if matches!(&x.parquet, Some(p) if p.is_empty()) {
                return Err(bad("export.parquet", "cannot be empty"));
            }
            if let Some(s) = &x.postgres_schema {
                herald_connectors::tables::check_pg_schema(s).map_err(|_| {
                    bad(
                        "export.postgres_schema",
                        format!("'{s}' is not a lower-case identifier like herald"),
                    )
                })?;
                if self.warehouse.is_none() {
                    return Err(bad(
                        "export.postgres_schema",
                        "loads into warehouse.postgres: add a [warehouse] section",
                    ));
                }
            }
            if x.max_rows_per_file == 0 || x.max_file_bytes == 0 {
                return Err(bad(
                    "export.max_rows_per_file",
                    "max_rows_per_file and max_file_bytes must be positive",
                ));
            }
            self.export_flush_ms()?;
        }
        if let Some(w) = &self.warehouse {
            if !w.postgres.starts_with("postgres://") && !w.postgres.starts_with("postgresql://") {
                return Err(bad(
                    "warehouse.postgres",
                    "must be a URL like postgres://user:password@host:5432/db",
                ));
            }
        }
        if let Some(n) = &self.notify {
            if self.engine.journeys.is_none() {
                return Err(bad(
                    "notify",
                    "delivers journey messages: set engine.journeys too",
                ));
            }
            if n.outbox.is_empty() && self.output.dir.is_empty() {
                return Err(bad(
                    "notify.outbox",
                    "needs a file (or output.dir to hold outbox.redb)",
                ));
            }
            n.validate().map_err(|(k, m)| bad(&k, m))?;
        }
        if let Some(c) = &self.cluster {
            if c.addresses.is_empty() {
                return Err(bad("cluster.addresses", "must list every process"));
            }
            if c.process >= c.addresses.len() {
                return Err(bad(
                    "cluster.process",
                    format!(
                        "{} is not an index into cluster.addresses ({} entries)",
                        c.process,
                        c.addresses.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The two listeners: addresses, TLS pairs, timeouts, and what exposing the admin
    /// listener beyond this host needs.
    fn validate_listeners(&self) -> Result<(), EngineError> {
        let admin: std::net::SocketAddr = self.admin.listen.parse().map_err(|_| {
            bad(
                "admin.listen",
                format!(
                    "'{}' is not an address like 127.0.0.1:8081",
                    self.admin.listen
                ),
            )
        })?;
        if self.admin.listen == self.http.listen && !self.http.listen.ends_with(":0") {
            return Err(bad(
                "admin.listen",
                "must differ from http.listen: ingest and the query API listen apart",
            ));
        }
        for (table, cert, key) in [
            ("http", &self.http.tls_cert, &self.http.tls_key),
            ("admin", &self.admin.tls_cert, &self.admin.tls_key),
        ] {
            match (cert, key) {
                (Some(_), None) => {
                    return Err(bad(&format!("{table}.tls_key"), "tls_cert needs tls_key"))
                }
                (None, Some(_)) => {
                    return Err(bad(&format!("{table}.tls_cert"), "tls_key needs tls_cert"))
                }
                _ => {}
            }
        }
        if !admin.ip().is_loopback() {
            let keys = !self.admin.read_keys.is_empty() || !self.admin.admin_keys.is_empty();
            if self.admin.tls_cert.is_none() || !keys {
                return Err(bad(
                    "admin.listen",
                    format!(
                        "{} is reachable from other hosts, and the admin listener serves \
                         users' traits and acts on journeys: it needs admin.tls_cert and \
                         admin.tls_key, and admin.read_keys or admin.admin_keys (or listen \
                         on 127.0.0.1)",
                        self.admin.listen
                    ),
                ));
            }
        }
        if !(1..=1_000_000).contains(&self.http.max_connections) {
            return Err(bad("http.max_connections", "must be between 1 and 1000000"));
        }
        if self.http.max_connections_per_ip == 0 {
            return Err(bad("http.max_connections_per_ip", "must be at least 1"));
        }
        self.timeouts()?;
        Ok(())
    }

    /// `http.{header,body,idle}_timeout`.
    pub fn timeouts(&self) -> Result<Timeouts, EngineError> {
        let one = |key: &str, text: &str| {
            let ms = herald_operators::time::parse_interval_ms(text)
                .map_err(|e| bad(&format!("http.{key}"), e))?;
            if ms < 10 {
                return Err(bad(
                    &format!("http.{key}"),
                    "must be at least 10 milliseconds",
                ));
            }
            Ok(std::time::Duration::from_millis(ms as u64))
        };
        Ok(Timeouts {
            header: one("header_timeout", &self.http.header_timeout)?,
            body: one("body_timeout", &self.http.body_timeout)?,
            idle: one("idle_timeout", &self.http.idle_timeout)?,
        })
    }

    /// The warehouse connection: `own` (a section's own `postgres` key) if given, else
    /// `warehouse.postgres`.
    pub fn warehouse_url(&self, own: Option<&str>) -> Option<String> {
        own.filter(|u| !u.is_empty())
            .map(str::to_string)
            .or_else(|| self.warehouse.as_ref().map(|w| w.postgres.clone()))
    }

    /// The dedup horizon in ms.
    pub fn dedup_horizon_ms(&self) -> Result<i64, EngineError> {
        herald_operators::time::parse_interval_ms(&self.engine.dedup_horizon)
            .map_err(|e| bad("engine.dedup_horizon", e))
    }

    /// The profile sync interval in ms (at least 1 s).
    pub fn profile_sync_every_ms(&self) -> Result<u64, EngineError> {
        let Some(p) = &self.profile_sync else {
            return Ok(3_600_000);
        };
        let ms = herald_operators::time::parse_interval_ms(&p.every)
            .map_err(|e| bad("profile_sync.every", e))?;
        Ok(ms.max(1000) as u64)
    }

    /// The export flush interval in ms (at least 100 ms).
    pub fn export_flush_ms(&self) -> Result<u64, EngineError> {
        let Some(x) = &self.export else {
            return Ok(60_000);
        };
        let ms = herald_operators::time::parse_interval_ms(&x.flush_every)
            .map_err(|e| bad("export.flush_every", e))?;
        Ok(ms.max(100) as u64)
    }

    /// The snapshot refresh interval in ms (at least 100 ms).
    pub fn snapshot_refresh_ms(&self) -> Result<u64, EngineError> {
        let Some(s) = &self.snapshots else {
            return Ok(60_000);
        };
        let ms = herald_operators::time::parse_interval_ms(&s.refresh)
            .map_err(|e| bad("snapshots.refresh", e))?;
        Ok(ms.max(100) as u64)
    }

    /// `checkpoint.every` in ms (at least 100).
    pub fn checkpoint_every_ms(&self) -> Result<u64, EngineError> {
        let ms = herald_operators::time::parse_interval_ms(&self.checkpoint.every)
            .map_err(|e| bad("checkpoint.every", e))?;
        if ms < 100 {
            return Err(bad("checkpoint.every", "must be at least 100 milliseconds"));
        }
        Ok(ms as u64)
    }

    /// Whether state is kept across restarts: a checkpoint directory (in a cluster, one
    /// that every process shares).
    pub fn durable(&self) -> bool {
        !self.checkpoint.dir.is_empty()
    }

    /// `(this process, processes)`: `(0, 1)` outside a cluster.
    pub fn processes(&self) -> (usize, usize) {
        self.cluster
            .as_ref()
            .map_or((0, 1), |c| (c.process, c.addresses.len()))
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut String| {
            if !p.is_empty() && !p.contains("://") && Path::new(p.as_str()).is_relative() {
                *p = base.join(p.as_str()).to_string_lossy().into_owned();
            }
        };
        resolve(&mut self.engine.segments);
        if let Some(j) = &mut self.engine.journeys {
            resolve(j);
        }
        resolve(&mut self.output.dir);
        for p in [
            &mut self.http.write_keys_file,
            &mut self.http.tls_cert,
            &mut self.http.tls_key,
            &mut self.admin.read_keys_file,
            &mut self.admin.admin_keys_file,
            &mut self.admin.tls_cert,
            &mut self.admin.tls_key,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        resolve(&mut self.checkpoint.dir);
        resolve(&mut self.checkpoint.log_dir);
        if let Some(n) = &mut self.notify {
            resolve(&mut n.templates);
            if n.outbox.is_empty() && !self.output.dir.is_empty() {
                n.outbox = Path::new(&self.output.dir)
                    .join("outbox.redb")
                    .to_string_lossy()
                    .into_owned();
            }
            resolve(&mut n.outbox);
            if let Some(f) = &mut n.tracking_secret_file {
                resolve(f);
            }
        }
        if let Some(s) = &mut self.snapshots {
            resolve(&mut s.prefix);
        }
        if let Some(p) = self.export.as_mut().and_then(|x| x.parquet.as_mut()) {
            resolve(p);
        }
    }

    /// The timely configuration: threads in this process, or the cluster.
    pub fn timely(&self) -> timely::Config {
        let communication = match &self.cluster {
            None if self.engine.workers == 1 => timely::CommunicationConfig::Thread,
            None => timely::CommunicationConfig::Process(self.engine.workers),
            Some(c) => timely::CommunicationConfig::Cluster {
                threads: self.engine.workers,
                process: c.process,
                addresses: c.addresses.clone(),
                report: false,
                zerocopy: false,
            },
        };
        timely::Config {
            communication,
            worker: timely::WorkerConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::parse("[engine]\nsegments = \"s.sql\"\n").unwrap();
        assert_eq!(c.engine.tick_ms, 1);
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert_eq!(c.http.max_batch_bytes, 500 * 1024);
        assert_eq!(c.dedup_horizon_ms().unwrap(), 86_400_000);
        assert!(c.kafka.is_none());
    }

    #[test]
    fn durable_state_defaults_to_a_local_directory_outside_a_cluster_only() {
        let base = "[engine]\nsegments = \"s.sql\"\n";
        let c = Config::parse(base).unwrap();
        assert!(c.durable());
        assert_eq!(
            (c.checkpoint.dir.as_str(), c.checkpoint.log_dir.as_str()),
            ("herald-state", "herald-state")
        );
        let cluster = format!("{base}[cluster]\nprocess = 1\naddresses = [\"a:1\", \"b:2\"]\n");
        let c = Config::parse(&cluster).unwrap();
        assert!(
            !c.durable(),
            "a cluster needs a directory its processes share"
        );
        assert_eq!(c.processes(), (1, 2));
        let c = Config::parse(&format!("{cluster}[checkpoint]\ndir = \"s3://b/state\"\n")).unwrap();
        assert!(c.durable());
        assert_eq!(c.checkpoint.log_dir, "herald-state", "the log stays local");
        let e = err(&format!("{base}[checkpoint]\ndir = \"gs://b/state\"\n"));
        assert!(e.contains("checkpoint.dir"), "{e}");
        let e = err(&format!("{base}[checkpoint]\nlog_dir = \"s3://b/log\"\n"));
        assert!(e.contains("checkpoint.log_dir"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = err("[engine]\nsegments = \"s.sql\"\nwokers = 2\n");
        assert!(e.contains("wokers") && e.contains("line 3"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\nworkers = \"two\"\n");
        assert!(e.contains("workers"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\nworkers = 0\n");
        assert!(
            e.contains("engine.workers") && e.contains("at least 1"),
            "{e}"
        );
        let e = err("[engine]\nsegments = \"s.sql\"\ndedup_horizon = \"1 fortnight\"\n");
        assert!(e.contains("engine.dedup_horizon"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\n[http]\nlisten = \"localhost\"\n");
        assert!(e.contains("http.listen"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\n[kafka]\nbrokers = \"b:9092\"\nauto_offset_reset = \"middle\"\n");
        assert!(e.contains("kafka.auto_offset_reset"), "{e}");
        let e = err("[engine]\n");
        assert!(e.contains("segments"), "{e}");
        let sync = "[profile_sync]\npostgres = \"postgres://h@x/db\"\nquery = \"SELECT 1\"\n";
        let e = err(&format!("[engine]\nsegments = \"s.sql\"\n{sync}"));
        assert!(
            e.contains("`profile_sync`: writes snapshots under snapshots.prefix"),
            "{e}"
        );
        let e = err(&format!(
            "[engine]\nsegments = \"s.sql\"\n[snapshots]\nprefix = \"p\"\n{sync}every = \"soon\"\n"
        ));
        assert!(e.contains("profile_sync.every"), "{e}");
        let e = err(
            "[engine]\nsegments = \"s.sql\"\n[snapshots]\nprefix = \"p\"\n[profile_sync]\nquery = \"SELECT 1\"\n",
        );
        assert!(e.contains("profile_sync.postgres"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\n[warehouse]\npostgres = \"mysql://x\"\n");
        assert!(e.contains("warehouse.postgres"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\n[export]\n");
        assert!(e.contains("`export`: writes nowhere"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\n[export]\npostgres_schema = \"herald\"\n");
        assert!(e.contains("export.postgres_schema"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\n[warehouse]\npostgres = \"postgres://h/d\"\n[export]\npostgres_schema = \"Bad-Name\"\n");
        assert!(e.contains("export.postgres_schema"), "{e}");
        let e = err(
            "[engine]\nsegments = \"s.sql\"\n[export]\nparquet = \"p\"\nflush_every = \"often\"\n",
        );
        assert!(e.contains("export.flush_every"), "{e}");
        let ok = Config::parse(
            "[engine]\nsegments = \"s.sql\"\n[warehouse]\npostgres = \"postgres://h@x/db\"\n[snapshots]\nprefix = \"p\"\n[profile_sync]\nquery = \"SELECT 1\"\n",
        )
        .unwrap();
        assert_eq!(ok.warehouse_url(None).as_deref(), Some("postgres://h@x/db"));
        let e = err("[engine]\nsegments = \"s.sql\"\n[notify]\ntemplates = \"t\"\n");
        assert!(
            e.contains("`notify`: delivers journey messages: set engine.journeys too"),
            "{e}"
        );
        let e = err("[engine]\nsegments = \"s.sql\"\njourneys = \"j.yaml\"\n[notify]\ntemplates = \"t\"\n[notify.email]\nsmtp = \"nohost\"\nfrom = \"a@b.c\"\n");
        assert!(e.contains("notify.email.smtp"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\njourneys = \"j.yaml\"\n[output]\ndir = \"o\"\n[notify]\ntemplates = \"t\"\noutbox_retention = \"a while\"\n");
        assert!(e.contains("notify.outbox_retention"), "{e}");
        let e = err("[engine]\nsegments = \"s.sql\"\n[cluster]\nprocess = 2\naddresses = [\"a:1\", \"b:2\"]\n");
        assert!(e.contains("cluster.process"), "{e}");
    }

    #[test]
    fn the_live_example_config_loads_and_its_segments_check() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/live/herald.toml");
        let c = Config::load(path).unwrap();
        assert_eq!(c.http.write_keys, vec!["demo-key".to_string()]);
        crate::check::load_segments(&c.engine.segments).unwrap();
    }

    #[test]
    fn relative_paths_resolve_against_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("herald.toml");
        std::fs::write(
            &path,
            "[engine]\nsegments = \"s.sql\"\n[snapshots]\nprefix = \"s3://b/p/\"\n",
        )
        .unwrap();
        let c = Config::load(path.to_str().unwrap()).unwrap();
        assert_eq!(
            c.engine.segments,
            dir.path().join("s.sql").to_string_lossy()
        );
        assert_eq!(c.snapshots.unwrap().prefix, "s3://b/p/");
        assert!(c.output.dir.ends_with("herald-out"));
    }

    #[test]
    fn listeners_and_keys_are_checked() {
        let base = "[engine]\nsegments = \"s.sql\"\n";
        let c = Config::parse(base).unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:8081");
        assert!(c.admin.read_keys.is_empty() && c.admin.admin_keys.is_empty());
        assert_eq!(
            c.timeouts().unwrap().idle,
            std::time::Duration::from_secs(60)
        );
        let e = err(&format!(
            "{base}[admin]\nlisten = \"0.0.0.0:8081\"\nread_keys = [\"k\"]\n"
        ));
        assert!(e.contains("admin.listen") && e.contains("tls_cert"), "{e}");
        let e = err(&format!(
            "{base}[admin]\nlisten = \"10.0.0.1:8081\"\ntls_cert = \"c\"\ntls_key = \"k\"\n"
        ));
        assert!(e.contains("read_keys or admin.admin_keys"), "{e}");
        // Exposed with TLS and a key: accepted.
        Config::parse(&format!(
            "{base}[admin]\nlisten = \"0.0.0.0:8081\"\ntls_cert = \"c\"\ntls_key = \"k\"\nadmin_keys = [\"a\"]\n"
        ))
        .unwrap();
        let e = err(&format!("{base}[http]\ntls_cert = \"c\"\n"));
        assert!(e.contains("http.tls_key"), "{e}");
        let e = err(&format!("{base}[admin]\nlisten = \"127.0.0.1:8080\"\n"));
        assert!(e.contains("must differ from http.listen"), "{e}");
        let e = err(&format!("{base}[admin]\nread_keys = [\"a b\"]\n"));
        assert!(e.contains("admin.read_keys"), "{e}");
        let e = err(&format!("{base}[http]\nidle_timeout = \"soon\"\n"));
        assert!(e.contains("http.idle_timeout"), "{e}");
        let e = err(&format!(
            "{base}[http]\nwrite_keys_env = \"HERALD_NO_SUCH_VARIABLE\"\n"
        ));
        assert!(e.contains("HERALD_NO_SUCH_VARIABLE"), "{e}");
        let e = err(&format!(
            "{base}[http]\nwrite_keys_file = \"/nonexistent/keys\"\n"
        ));
        assert!(e.contains("http.write_keys_file"), "{e}");
    }
}
