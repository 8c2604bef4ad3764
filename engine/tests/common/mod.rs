//! Test harness for `herald run`: starts the real binary with a config, finds its HTTP
//! address, talks to its API, stops it with SIGTERM.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// The read key the harness gives every Herald it starts (unless the config has an
/// `[admin]` section of its own).
pub const READ_KEY: &str = "test-read-key";
/// The admin key the harness gives every Herald it starts.
pub const ADMIN_KEY: &str = "test-admin-key";

/// A running `herald run`.
pub struct Herald {
    child: Option<Child>,
    /// The ingest listener, `http://127.0.0.1:PORT`.
    pub base: String,
    /// The admin listener (query API, `/metrics`, triggers), `http://127.0.0.1:PORT`.
    pub admin: String,
    /// The key `get` and friends send to the admin listener.
    pub key: String,
    /// The directory holding the config (and `herald-out/`).
    pub dir: PathBuf,
    http: reqwest::blocking::Client,
    stderr: PathBuf,
}

impl Herald {
    /// Writes `config` to `dir/herald.toml` and starts Herald on it; waits until it
    /// listens (or panics with its stderr).
    pub fn start(dir: &Path, config: &str) -> Herald {
        // The admin listener on a free port, with the harness's keys.
        let config = if config.contains("[admin]") {
            config.to_string()
        } else {
            format!(
                "{config}\n[admin]\nlisten = \"127.0.0.1:0\"\nread_keys = [\"{READ_KEY}\"]\n\
                 admin_keys = [\"{ADMIN_KEY}\"]\n"
            )
        };
        std::fs::write(dir.join("herald.toml"), &config).unwrap();
        let stderr = dir.join("herald.stderr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["run", "--config"])
            .arg(dir.join("herald.toml"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(
                // Appended to: a test that restarts Herald keeps every run's log.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stderr)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (base, admin) = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("herald: listening on ") {
                        let base = rest.split_whitespace().next().unwrap().to_string();
                        let admin = rest
                            .split_once("admin on ")
                            .map(|(_, a)| a.trim_end_matches(')').to_string())
                            .unwrap();
                        break (base, admin);
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "herald did not start:\n{}",
                        std::fs::read_to_string(&stderr).unwrap_or_default()
                    );
                }
            }
        };
        Herald {
            child: Some(child),
            base,
            admin,
            key: ADMIN_KEY.to_string(),
            dir: dir.to_path_buf(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            stderr,
        }
    }

    /// POSTs a JSON body to an ingest endpoint with a write key; returns status and body.
    pub fn post(&self, path: &str, key: &str, body: &str) -> (u16, Json) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth(key, Some(""))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Json::Null))
    }

    /// POSTs a gzip-compressed body.
    pub fn post_gzip(&self, path: &str, key: &str, body: &str) -> (u16, Json) {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(body.as_bytes()).unwrap();
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth(key, Some(""))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(enc.finish().unwrap())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Json::Null))
    }

    /// GETs a path of the admin listener with the harness's key; returns status and body
    /// text.
    pub fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.admin))
            .bearer_auth(&self.key)
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    /// POSTs a JSON body to the admin listener with the admin key (journey triggers,
    /// engagement reports).
    pub fn post_admin(&self, path: &str, body: &str) -> (u16, Json) {
        let r = self
            .http
            .post(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Json::Null))
    }

    /// Sends `method` to a path of the admin listener with `key` and a text body (the
    /// definitions API); returns status and JSON body.
    pub fn request(&self, method: &str, path: &str, key: &str, body: &str) -> (u16, Json) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = self
            .http
            .request(method, format!("{}{path}", self.admin))
            .bearer_auth(key)
            .header("content-type", "text/plain")
            .body(body.to_string())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Json::Null))
    }

    /// Every member of a segment, through the paged members API.
    pub fn members(&self, segment: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                None => format!("/v1/segments/{segment}/members?limit=1000"),
                Some(c) => format!("/v1/segments/{segment}/members?limit=1000&cursor={c}"),
            };
            let (status, page) = self.get_json(&path);
            assert_eq!(status, 200, "{path}: {page}");
            for m in page["members"].as_array().unwrap() {
                out.insert(m.as_str().unwrap().to_string());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }

    /// GETs a JSON path.
    pub fn get_json(&self, path: &str) -> (u16, Json) {
        let (s, t) = self.get(path);
        (s, serde_json::from_str(&t).unwrap_or(Json::Null))
    }

    /// Current size of a segment per `/v1/segments`.
    pub fn size(&self, segment: &str) -> i64 {
        let (_, j) = self.get_json("/v1/segments");
        j["segments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == segment)
            .unwrap_or_else(|| panic!("no segment {segment} in {j}"))["size"]
            .as_i64()
            .unwrap()
    }

    /// `herald_errors_total{sink=component}` per `/metrics` (0 before the first error).
    pub fn errors(&self, component: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        let prefix = format!("herald_errors_total{{sink=\"{component}\"}}");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (up to `limit`) until `cond` holds; panics with `what` otherwise. This waits
    /// for an outcome; it does not assert on how long it took.
    pub fn wait_for(&self, what: &str, limit: Duration, mut cond: impl FnMut(&Herald) -> bool) {
        let started = Instant::now();
        while !cond(self) {
            if started.elapsed() > limit {
                // What the engine saw, to tell "nothing arrived" from "too much arrived".
                let seen = self
                    .http
                    .get(format!("{}/v1/segments", self.admin))
                    .bearer_auth(&self.key)
                    .send()
                    .and_then(|r| r.text())
                    .unwrap_or_else(|e| format!("(unreachable: {e})"));
                let events = self
                    .http
                    .get(format!("{}/metrics", self.admin))
                    .bearer_auth(&self.key)
                    .send()
                    .and_then(|r| r.text())
                    .map(|t| {
                        t.lines()
                            .filter(|l| l.starts_with("herald_events_"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                panic!(
                    "timed out waiting for {what}\nsegments: {seen}\n{events}\nstderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Herald's stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (up to `limit`) for Herald to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        let started = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!("herald did not exit\n{}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to `limit`) for Herald to exit on its own, else kills it: the exit status
    /// if it exited.
    pub fn exit_or_kill(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("already stopped");
        let started = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("already stopped");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let started = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("herald did not stop on SIGTERM\n{}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process at once (SIGKILL: no shutdown, nothing flushed) and waits.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("already stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// True when no dead letter has been written.
    pub fn dead_letters_is_empty(&self) -> bool {
        self.output("dead_letters.jsonl").is_empty()
    }

    /// Complete lines of an output file under `herald-out/`, parsed (a last line still
    /// being written, without its newline, is left out).
    pub fn output(&self, name: &str) -> Vec<Json> {
        std::fs::read_to_string(self.dir.join("herald-out").join(name))
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Starts a two-process timely cluster of `herald run`: each process gets its own
/// directory holding `segments` and `base_config` plus its `[cluster]` section. Returns
/// the directories (keep them alive) and the processes, in process order.
pub fn start_cluster(segments: &str, base_config: &str) -> (Vec<tempfile::TempDir>, Vec<Herald>) {
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for dir in &dirs {
        std::fs::write(dir.path().join("segments.sql"), segments).unwrap();
    }
    let configs = cluster_configs(base_config, 2);
    let paths: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    let hs = start_processes(&paths, &configs);
    (dirs, hs)
}

/// The configs of an `n`-process cluster on 127.0.0.1: `base_config` plus each process's
/// `[cluster]` section (free ports picked now).
pub fn cluster_configs(base_config: &str, n: usize) -> Vec<String> {
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let addresses: Vec<String> = (0..n)
        .map(|_| format!("\"127.0.0.1:{}\"", free_port()))
        .collect();
    let addresses = format!("[{}]", addresses.join(", "));
    (0..n)
        .map(|process| {
            format!("{base_config}[cluster]\nprocess = {process}\naddresses = {addresses}\n")
        })
        .collect()
}

/// Starts one process per directory with its config, concurrently (a cluster's processes
/// wait for each other while connecting); in process order.
pub fn start_processes(dirs: &[PathBuf], configs: &[String]) -> Vec<Herald> {
    let handles: Vec<_> = dirs
        .iter()
        .zip(configs)
        .map(|(dir, config)| {
            let (dir, config) = (dir.clone(), config.clone());
            std::thread::spawn(move || Herald::start(&dir, &config))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Stops every process concurrently (SIGTERM); returns each exit status and stderr.
pub fn stop_all(hs: Vec<Herald>) -> Vec<(ExitStatus, String)> {
    let stops: Vec<_> = hs
        .into_iter()
        .map(|mut h| std::thread::spawn(move || (h.stop(), h.stderr_text())))
        .collect();
    stops.into_iter().map(|s| s.join().unwrap()).collect()
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends events to `h` with the official Segment and RudderStack Node SDKs
/// (`tests/sdk/send.cjs`, the SDKs from `HERALD_NODE_MODULES`, set by
/// scripts/services.sh), with `write_key`; `extra_ca` is a PEM file Node trusts too (for
/// https). Panics with the script's stderr if it fails.
pub fn send_with_node_sdks(h: &Herald, write_key: &str, extra_ca: Option<&Path>) {
    let modules = std::env::var("HERALD_NODE_MODULES").unwrap_or_else(|_| {
        panic!("HERALD_NODE_MODULES must be set: run `eval \"$(scripts/services.sh start)\"`")
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/send.cjs");
    let mut node = Command::new("node");
    node.arg(&script)
        .args([h.base.as_str(), write_key])
        .env("NODE_PATH", &modules);
    if let Some(ca) = extra_ca {
        node.env("NODE_EXTRA_CA_CERTS", ca);
    }
    let out = node.output().unwrap();
    assert!(
        out.status.success(),
        "SDK script failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        h.stderr_text()
    );
}

/// The test PostgreSQL's URL (`HERALD_TEST_POSTGRES`, set by scripts/services.sh).
pub fn pg() -> String {
    std::env::var("HERALD_TEST_POSTGRES")
        .unwrap_or_else(|_| panic!("HERALD_TEST_POSTGRES must be set: run scripts/services.sh"))
}

/// Runs SQL (one statement or several) on the test PostgreSQL; the rows of its results,
/// every value as text (NULL as "NULL"). Panics with the SQL on an error.
pub fn pg_query(sql: &str) -> Vec<Vec<String>> {
    let url = pg();
    let sql = sql.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let msgs = client
            .simple_query(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}\n{e:?}"));
        msgs.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("NULL").to_string())
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    })
}

/// A name no other test run uses (for tables and schemas in the shared PostgreSQL).
pub fn unique(stem: &str) -> String {
    format!(
        "{stem}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    )
}

/// Webhook requests seen: (Idempotency-Key, body).
pub type Seen = Arc<Mutex<Vec<(String, Json)>>>;

/// A webhook endpoint that takes `delay` per request and records each.
pub fn recorder(rt: &tokio::runtime::Runtime, delay: Duration) -> (Seen, String) {
    let seen: Seen = Arc::default();
    let s2 = Arc::clone(&seen);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let seen = Arc::clone(&s2);
            async move {
                tokio::time::sleep(delay).await;
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                seen.lock()
                    .unwrap()
                    .push((key, serde_json::from_slice(&body).unwrap_or(Json::Null)));
                "ok"
            }
        },
    );
    rt.spawn(async move { axum::serve(listener, app).await });
    (seen, format!("http://{addr}/hook"))
}
