//! `herald run` against a real Kafka-protocol broker (tansu on 127.0.0.1, started by
//! `scripts/services.sh`): events in over several partitions, the changelog and the
//! dead-letter topic out, offsets committed only after changes are handed over, resume
//! from committed offsets, HTTP ingest producing to the events topic, and a broker that
//! goes down and comes back without losing an event.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Herald;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

const SEGMENTS: &str = "\
CREATE SEGMENT big_spender AS
    coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 100;
CREATE SEGMENT clicked AS count(*) FILTER (WHERE event = 'Clicked') >= 1;
";

fn brokers() -> String {
    std::env::var("HERALD_TEST_KAFKA").unwrap_or_else(|_| {
        panic!("HERALD_TEST_KAFKA must name a broker: run `eval \"$(scripts/services.sh start)\"`")
    })
}

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{}", std::process::id(), nanos % 1_000_000_000)
}

struct Topics {
    events: String,
    changes: String,
    dead: String,
    group: String,
}

impl Topics {
    fn new() -> Topics {
        let id = unique();
        Topics {
            events: format!("events-{id}"),
            changes: format!("changes-{id}"),
            dead: format!("dead-{id}"),
            group: format!("herald-{id}"),
        }
    }

    fn config(&self, brokers: &str, workers: usize) -> String {
        format!(
            "[engine]\nsegments = \"segments.sql\"\nworkers = {workers}\n\
             [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\n\
             [kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{}\"\nevents_topics = [\"{}\"]\n\
             changes_topic = \"{}\"\ndead_letter_topic = \"{}\"\nfetch_wait_max_ms = 5\n",
            self.group, self.events, self.changes, self.dead
        )
    }
}

fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let r = futures::executor::block_on(admin.create_topics(
        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
        &opts,
    ))
    .unwrap();
    r[0].as_ref().unwrap();
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .set("message.timeout.ms", "0")
        .create()
        .unwrap()
}

fn produce(p: &FutureProducer, topic: &str, key: &str, payload: &str) {
    futures::executor::block_on(p.send(
        FutureRecord::to(topic).key(key).payload(payload),
        Duration::from_secs(30),
    ))
    .unwrap();
}

/// Every message of a topic: (key, payload, headers).
type Record = (String, Vec<u8>, BTreeMap<String, String>);

fn read_all(brokers: &str, topic: &str, partitions: i32, at_least: usize) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", unique()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hdr in h.iter() {
                        headers.insert(
                            hdr.key.to_string(),
                            String::from_utf8_lossy(hdr.value.unwrap_or(&[])).into_owned(),
                        );
                    }
                }
                out.push((
                    String::from_utf8_lossy(m.key().unwrap_or(&[])).into_owned(),
                    m.payload().unwrap_or(&[]).to_vec(),
                    headers,
                ));
                quiet_since = Instant::now();
            }
            _ if out.len() >= at_least && quiet_since.elapsed() > Duration::from_millis(500) => {
                break
            }
            _ => {}
        }
    }
    out
}

/// The group's committed offset per partition, and the partitions' end offsets.
fn committed_and_ends(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> (Vec<i64>, Vec<i64>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed: Vec<i64> = {
        let c = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        (0..partitions)
            .map(|p| match c.find_partition(topic, p).unwrap().offset() {
                Offset::Offset(o) => o,
                _ => -1,
            })
            .collect()
        // `c` is dropped here, before the consumer (see docs/operations.md).
    };
    let ends = (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect();
    (committed, ends)
}

fn metric(h: &Herald, needle: &str) -> Option<f64> {
    let (_, text) = h.get("/metrics");
    text.lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
#[ignore = "needs a Kafka-protocol broker on 127.0.0.1: run scripts/test.sh"]
fn kafka_in_changelog_and_dead_letters_out_offsets_committed_after_sinks() {
    let brokers = brokers();
    let t = Topics::new();
    create_topic(&brokers, &t.events, 3);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    let mut h = Herald::start(dir.path(), &t.config(&brokers, 2));

    let p = producer(&brokers);
    for u in 0..30 {
        for i in 0..2 {
            let ev = format!(
                r#"{{"type":"track","userId":"u{u}","event":"Order Completed","messageId":"o{u}-{i}","properties":{{"revenue":60}}}}"#
            );
            produce(&p, &t.events, &format!("u{u}"), &ev);
        }
    }
    // A redelivered message (same messageId) and two bad ones.
    produce(
        &p,
        &t.events,
        "u0",
        r#"{"type":"track","userId":"u0","event":"Clicked","messageId":"c0"}"#,
    );
    produce(
        &p,
        &t.events,
        "u0",
        r#"{"type":"track","userId":"u0","event":"Clicked","messageId":"c0"}"#,
    );
    produce(&p, &t.events, "x", "{oops");
    produce(&p, &t.events, "y", r#"{"type":"track","event":"Clicked"}"#);
    // A batch with one bad item: the good one counts, the bad one is dead-lettered alone.
    produce(
        &p,
        &t.events,
        "b",
        r#"{"batch":[{"type":"track","userId":"b1","event":"Clicked"},{"type":"track","event":"no user"}]}"#,
    );
    // HTTP ingest in Kafka mode goes through the events topic.
    let (status, _) = h.post("/v1/track", "wk", r#"{"userId":"web1","event":"Clicked"}"#);
    assert_eq!(status, 200);
    // One message posted to /v1/batch is one event, in Kafka mode too.
    let (status, _) = h.post(
        "/v1/batch",
        "wk",
        r#"{"type":"track","userId":"web2","event":"Clicked"}"#,
    );
    assert_eq!(status, 200);

    h.wait_for(
        "30 big spenders and 4 clickers",
        Duration::from_secs(60),
        |h| h.size("big_spender") == 30 && h.size("clicked") == 4,
    );

    // The changelog: keyed by user, the replay's JSON lines.
    let changes = read_all(&brokers, &t.changes, 4, 34);
    let mut entered: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (key, payload, _) in &changes {
        let c: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(c["user_id"].as_str().unwrap(), key);
        assert_eq!(c["diff"], 1, "{c}");
        assert!(c["time"].as_str().unwrap().ends_with('Z'));
        entered
            .entry(c["segment"].as_str().unwrap().to_string())
            .or_default()
            .insert(key.clone());
    }
    assert_eq!(entered["big_spender"].len(), 30);
    assert_eq!(
        entered["clicked"],
        BTreeSet::from(["u0", "web1", "web2", "b1"].map(String::from))
    );

    // Dead letters: original bytes, reason and position in headers.
    let dead = read_all(&brokers, &t.dead, 4, 3);
    assert_eq!(dead.len(), 3, "{dead:?}");
    let mut reasons = BTreeSet::new();
    for (_, payload, headers) in &dead {
        assert_eq!(headers["herald.topic"], t.events);
        assert!(headers["herald.offset"].parse::<i64>().is_ok());
        assert!(headers["herald.partition"].parse::<i32>().is_ok());
        reasons.insert(headers["herald.reason"].clone());
        if headers["herald.reason"] == "invalid_json" {
            assert_eq!(payload, b"{oops");
        }
        if headers.get("herald.batch_index").map(String::as_str) == Some("1") {
            let item: serde_json::Value = serde_json::from_slice(payload).unwrap();
            assert_eq!(item, serde_json::json!({"type":"track","event":"no user"}));
        }
    }
    assert_eq!(
        reasons,
        BTreeSet::from(["invalid_json".to_string(), "missing_user".to_string()])
    );
    assert!(dead
        .iter()
        .any(|(_, _, h)| h.get("herald.batch_index").map(String::as_str) == Some("1")));
    assert_eq!(metric(&h, "herald_duplicates_total"), Some(1.0));
    h.wait_for("consumer lag in /metrics", Duration::from_secs(20), |h| {
        metric(h, "herald_consumer_lag{").is_some()
    });

    // Graceful stop commits everything handed over: committed == end, per partition.
    let before = h.size("clicked");
    assert!(h.stop().success(), "{}", h.stderr_text());
    let (committed, ends) = committed_and_ends(&brokers, &t.group, &t.events, 3);
    assert_eq!(committed, ends);

    // A restart resumes where the final checkpoint left off (the committed offsets are
    // its positions): only the new event is read, and the state is still there.
    let mut h = Herald::start(dir.path(), &t.config(&brokers, 2));
    assert_eq!(h.size("clicked"), before, "the state came back");
    produce(
        &p,
        &t.events,
        "late",
        r#"{"type":"track","userId":"late","event":"Clicked"}"#,
    );
    h.wait_for("the new event", Duration::from_secs(60), |h| {
        h.size("clicked") == before + 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        metric(&h, "herald_events_in_total{source=\"kafka\"}"),
        Some(1.0)
    );
    assert!(h.stop().success());
}

/// A tansu broker of this test's own, on S3 storage (so it can be killed and restarted
/// with its data), on a free port.
struct OwnBroker {
    child: Option<Child>,
    port: u16,
    storage: String,
}

impl OwnBroker {
    fn start(port: u16, storage: &str) -> OwnBroker {
        let bin = std::env::var("HERALD_TANSU_BIN")
            .unwrap_or_else(|_| panic!("HERALD_TANSU_BIN must be set: run scripts/services.sh"));
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", storage])
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "tansu did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnBroker {
            child: Some(child),
            port,
            storage: storage.to_string(),
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
#[ignore = "needs tansu and an S3-compatible server on 127.0.0.1: run scripts/test.sh"]
fn a_broker_that_goes_down_and_comes_back_loses_no_event() {
    let s3_dir = std::env::var("HERALD_TEST_S3_DIR")
        .unwrap_or_else(|_| panic!("HERALD_TEST_S3_DIR must be set: run scripts/services.sh"));
    let bucket = format!("tansu-{}", unique());
    std::fs::create_dir_all(std::path::Path::new(&s3_dir).join(&bucket)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut broker = OwnBroker::start(port, &format!("s3://{bucket}/"));
    let brokers = format!("127.0.0.1:{}", broker.port);
    let t = Topics::new();
    create_topic(&brokers, &t.events, 2);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    let mut h = Herald::start(dir.path(), &t.config(&brokers, 2));
    let p = producer(&brokers);
    let order = |u: &str| {
        format!(
            r#"{{"type":"track","userId":"{u}","event":"Order Completed","properties":{{"revenue":100}}}}"#
        )
    };
    for u in 0..10 {
        produce(&p, &t.events, &format!("a{u}"), &order(&format!("a{u}")));
    }
    h.wait_for("the first 10", Duration::from_secs(60), |h| {
        h.size("big_spender") == 10
    });

    // The broker dies. Events keep coming (the producer queues them, as a client would).
    broker.kill();
    let mut pending = Vec::new();
    for u in 0..10 {
        let payload = order(&format!("b{u}"));
        let key = format!("b{u}");
        pending.push(
            p.send_result(FutureRecord::to(&t.events).key(&key).payload(&payload))
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(h.size("big_spender"), 10);

    // It comes back with its data: everything produced meanwhile arrives.
    let _broker = OwnBroker::start(port, &broker.storage);
    for ack in pending {
        futures::executor::block_on(ack).unwrap().unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
    h.wait_for("all 20 after the outage", Duration::from_secs(90), |h| {
        h.size("big_spender") == 20
    });
    let changes = read_all(&brokers, &t.changes, 4, 20);
    let users: BTreeSet<String> = changes.iter().map(|(k, _, _)| k.clone()).collect();
    assert_eq!(users.len(), 20, "every change reached the changelog");
    assert!(h.stop().success(), "{}", h.stderr_text());
    // Everything consumed was committed: per partition, the group's offset is one past
    // the last record in it. The last offsets are read from the records themselves
    // (tansu's end offsets on S3 storage are unreliable after a broker restart), and
    // checked here rather than by restarting Herald in the same group, whose rejoin
    // after a broker restart can take tansu minutes.
    let last = last_offsets(&brokers, &t.events, 2, 20);
    let (committed, _) = committed_and_ends(&brokers, &t.group, &t.events, 2);
    let expected: Vec<i64> = last.iter().map(|o| o + 1).collect();
    assert_eq!(
        committed, expected,
        "committed offsets after a graceful stop"
    );
}

/// The offset of each partition's last record (-1 for an empty partition), read from
/// the records; waits until `at_least` records were seen.
fn last_offsets(brokers: &str, topic: &str, partitions: i32, at_least: usize) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", unique()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut last = vec![-1i64; partitions as usize];
    let mut seen = 0;
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let p = m.partition() as usize;
                last[p] = last[p].max(m.offset());
                seen += 1;
                quiet_since = Instant::now();
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None if seen >= at_least && quiet_since.elapsed() > Duration::from_secs(1) => break,
            None => {}
        }
    }
    assert!(seen >= at_least, "only {seen} records in {topic}");
    last
}

/// Kafka mode on a two-process timely cluster: the group spreads partitions over both
/// processes, each user's state lives on one of them, and offsets are committed only
/// once every process's sink has the changes (a change may be emitted by the other
/// process than the one that consumed the event).
#[test]
#[ignore = "needs a Kafka-protocol broker on 127.0.0.1: run scripts/test.sh"]
fn a_two_process_cluster_consumes_and_commits() {
    let brokers = brokers();
    let t = Topics::new();
    create_topic(&brokers, &t.events, 4);
    let (_dirs, hs) = common::start_cluster(SEGMENTS, &t.config(&brokers, 1));
    let p = producer(&brokers);
    for u in 0..40 {
        let ev = format!(r#"{{"type":"track","userId":"k{u}","event":"Clicked"}}"#);
        produce(&p, &t.events, &format!("k{u}"), &ev);
    }
    let total = |hs: &[Herald]| hs.iter().map(|h| h.size("clicked")).sum::<i64>();
    hs[0].wait_for(
        "40 clickers across the cluster",
        Duration::from_secs(60),
        |_| total(&hs) == 40,
    );
    let mut logs = String::new();
    for (status, stderr) in common::stop_all(hs) {
        assert!(status.success(), "exit {status:?}\n{stderr}");
        logs.push_str(&stderr);
    }
    // Processes stop at the cluster's common instant; what a process fed after it is not
    // committed (and is consumed again by the next run). Never more than was consumed.
    let (committed, ends) = committed_and_ends(&brokers, &t.group, &t.events, 4);
    for (c, e) in committed.iter().zip(&ends) {
        assert!(
            *c <= *e,
            "committed {committed:?} beyond the ends {ends:?}\n{logs}"
        );
    }
}

/// Kafka mode on a durable two-process cluster (one `checkpoint.dir` both share): each
/// process reads its share of the partitions; a graceful stop of one process stops both
/// at the final checkpoint, which commits every partition's position; a start restores
/// the state on both and reads only what came after.
#[test]
#[ignore = "needs a Kafka-protocol broker on 127.0.0.1: run scripts/test.sh"]
fn a_durable_two_process_cluster_restores_its_state_and_resumes_every_partition() {
    let brokers = brokers();
    let t = Topics::new();
    create_topic(&brokers, &t.events, 4);
    let state = tempfile::tempdir().unwrap();
    let base = format!(
        "{}[checkpoint]\ndir = \"{}\"\nevery = \"1 second\"\n",
        t.config(&brokers, 1),
        state.path().display()
    );
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let paths: Vec<std::path::PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    for d in &paths {
        std::fs::write(d.join("segments.sql"), SEGMENTS).unwrap();
    }
    let configs = common::cluster_configs(&base, 2);
    let mut hs = common::start_processes(&paths, &configs);
    let p = producer(&brokers);
    for u in 0..40 {
        let ev = format!(r#"{{"type":"track","userId":"k{u}","event":"Clicked"}}"#);
        produce(&p, &t.events, &format!("k{u}"), &ev);
    }
    let total = |hs: &[Herald]| hs.iter().map(|h| h.size("clicked")).sum::<i64>();
    hs[0].wait_for(
        "40 clickers across the cluster",
        Duration::from_secs(60),
        |_| total(&hs) == 40,
    );
    let read: Vec<f64> = hs
        .iter()
        .map(|h| metric(h, "herald_events_in_total{source=\"kafka\"}").unwrap_or(0.0))
        .collect();
    assert!(
        read.iter().all(|n| *n > 0.0),
        "each process reads its share of the partitions: {read:?}"
    );
    // SIGTERM to process 1 only: both stop.
    let mut p1 = hs.pop().unwrap();
    assert!(p1.stop().success(), "{}", p1.stderr_text());
    let p0 = hs[0].wait_exit(Duration::from_secs(60));
    assert!(p0.success(), "{}", hs[0].stderr_text());
    let (committed, ends) = committed_and_ends(&brokers, &t.group, &t.events, 4);
    assert_eq!(
        committed, ends,
        "the final checkpoint's positions are committed"
    );

    let hs = common::start_processes(&paths, &configs);
    assert_eq!(total(&hs), 40, "the state came back on both processes");
    produce(
        &p,
        &t.events,
        "late",
        r#"{"type":"track","userId":"late","event":"Clicked"}"#,
    );
    hs[0].wait_for("the new event", Duration::from_secs(60), |_| {
        total(&hs) == 41
    });
    std::thread::sleep(Duration::from_millis(500));
    let read: f64 = hs
        .iter()
        .map(|h| metric(h, "herald_events_in_total{source=\"kafka\"}").unwrap_or(0.0))
        .sum();
    assert_eq!(read, 1.0, "only the new event is read again");
    for (status, stderr) in common::stop_all(hs) {
        assert!(status.success(), "exit {status:?}\n{stderr}");
    }
}

#[test]
#[ignore = "needs a Kafka-protocol broker on 127.0.0.1: run scripts/test.sh"]
fn journeys_in_kafka_mode_trigger_through_the_events_topic_and_send_to_the_messages_topic() {
    let brokers = brokers();
    let t = Topics::new();
    let messages = format!("messages-{}", unique());
    create_topic(&brokers, &t.events, 2);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    std::fs::write(
        dir.path().join("journeys.yaml"),
        "journey: welcome\nentry: { api: true }\nsteps:\n  - send: { channel: kafka, template: hi }\n\
         ---\njourney: thanks\nentry: { event: Order Completed }\nsteps:\n  - send: { channel: webhook, template: thanks }\n",
    )
    .unwrap();
    let config = t
        .config(&brokers, 2)
        .replace("[http]", "journeys = \"journeys.yaml\"\n[http]")
        + &format!("messages_topic = \"{messages}\"\n");
    let mut h = Herald::start(dir.path(), &config);
    // The API trigger is produced to the events topic and consumed like any event.
    let (status, body) = h.post_admin("/v1/journeys/welcome/trigger", r#"{"user_id":"k1"}"#);
    assert_eq!(status, 200, "{body}");
    produce(
        &producer(&brokers),
        &t.events,
        "k2",
        r#"{"type":"track","userId":"k2","event":"Order Completed","messageId":"k2-1"}"#,
    );
    let got = read_all(
        &brokers,
        &messages,
        herald_engine::live::kafka::OUTPUT_PARTITIONS,
        2,
    );
    let mut sent: Vec<(String, String)> = got
        .iter()
        .map(|(key, payload, _)| {
            let m: serde_json::Value = serde_json::from_slice(payload).unwrap();
            assert_eq!(m["user_id"], key.as_str());
            (
                key.clone(),
                m["template"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        [
            ("k1".to_string(), "hi".to_string()),
            ("k2".to_string(), "thanks".to_string())
        ]
    );
    assert!(h.stop().success());
}

/// With `[export]`, offsets are committed behind the events archive: until the archive
/// holds an event, its offset stays uncommitted, so a kill -9 before the archive write
/// replays it and the archive ends up complete.
#[test]
#[ignore = "needs a Kafka-protocol broker on 127.0.0.1: run scripts/test.sh"]
fn offsets_are_committed_behind_the_events_archive_and_a_kill_9_loses_nothing() {
    let brokers = brokers();
    let t = Topics::new();
    create_topic(&brokers, &t.events, 2);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    let archive = dir.path().join("archive");
    let config = |flush: &str| {
        format!(
            "{}[export]\nparquet = \"{}\"\nflush_every = \"{flush}\"\n",
            t.config(&brokers, 2),
            archive.display()
        )
    };
    // The archive is written only every hour: nothing may be committed meanwhile.
    let mut h = Herald::start(dir.path(), &config("1 hour"));
    let p = producer(&brokers);
    let ids: BTreeSet<String> = (0..30).map(|u| format!("a{u}")).collect();
    for u in 0..30 {
        let ev =
            format!(r#"{{"type":"track","userId":"u{u}","event":"Clicked","messageId":"a{u}"}}"#);
        produce(&p, &t.events, &format!("u{u}"), &ev);
    }
    h.wait_for("the clicks", Duration::from_secs(60), |h| {
        h.size("clicked") == 30
    });
    // Several commit intervals pass with the segments up to date.
    std::thread::sleep(Duration::from_secs(3));
    let (committed, ends) = committed_and_ends(&brokers, &t.group, &t.events, 2);
    assert_eq!(ends.iter().sum::<i64>(), 30);
    assert!(
        committed.iter().all(|&c| c < 0),
        "committed {committed:?} before the archive held the events"
    );
    h.kill();
    assert!(
        herald_connectors::store::list(archive.to_str().unwrap())
            .map(|l| l.is_empty())
            .unwrap_or(true),
        "nothing was archived yet"
    );

    // The restart consumes them again; the archive gets them, then the offsets commit.
    let mut h = Herald::start(dir.path(), &config("1 second"));
    h.wait_for("the clicks again", Duration::from_secs(60), |h| {
        h.size("clicked") == 30
    });
    let started = Instant::now();
    loop {
        let (committed, ends) = committed_and_ends(&brokers, &t.group, &t.events, 2);
        if committed == ends {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "offsets not committed after the archive write: {committed:?} of {ends:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(h.stop().success(), "{}", h.stderr_text());
    let archived: BTreeSet<String> =
        herald_connectors::tables::read_archived_events(&format!("{}/events/", archive.display()))
            .unwrap()
            .into_iter()
            .map(|(e, _)| e.message_id)
            .collect();
    assert_eq!(archived, ids);
}
