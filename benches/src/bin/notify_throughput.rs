//! Notification delivery against local peers: messages per second per channel, and the
//! latency Herald adds from a message action to the provider accepting it.
//!
//! Isolates the notifications layer (outbox, delivery engine, connector) from the
//! dataflow: actions are handed to the outbox as the sink does, and every channel's
//! peer runs on 127.0.0.1: an HTTP server that answers at once (webhook, Twilio-style
//! API), aiosmtpd (email, when `HERALD_SMTPD_PYTHON` is set) and a Kafka-protocol broker
//! (when `HERALD_TEST_KAFKA` is set).
//!
//! Two phases per channel:
//! - burst: `--messages` actions in one outbox commit; messages/s until the last is
//!   accepted (the channel's concurrency bound is the limit);
//! - paced: `--paced` actions at `--rate` per second, each its own outbox commit (as a
//!   sink flush with one message); latency from handing the action over to the
//!   provider's acceptance (the request's round trip included), p50/p99.
//!
//! Run: `benches/notify_throughput.sh` (starts the services), or
//! `cargo run --release -p herald-benches --bin notify-throughput -- --messages 20000`.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use herald_connectors::notify::channel::{Connector, KafkaChannel, MessagesApi, Smtp, Webhook};
use herald_connectors::notify::config::{
    EmailConfig, KafkaChannelConfig, Limits, MessagesApiConfig, WebhookConfig,
};
use herald_connectors::notify::delivery::{
    ChannelSetup, Delivery, FeedbackFn, NotifyMetrics, RetryPolicy,
};
use herald_connectors::notify::outbox::Outbox;
use herald_connectors::notify::template::Templates;
use herald_operators::journey::MessageAction;
use serde_json::{json, Value as Json};

#[derive(Parser, Debug)]
struct Args {
    /// Messages per channel in the burst phase.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Messages per channel in the paced phase.
    #[arg(long, default_value_t = 2_000)]
    paced: usize,
    /// Rate of the paced phase (messages/s).
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Requests in flight per channel.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Channels to run (webhook, sms, email, kafka).
    #[arg(long, value_delimiter = ',', default_value = "webhook,sms,email,kafka")]
    channels: Vec<String>,
}

/// Acceptance instants by message id.
type Accepted = Arc<Mutex<HashMap<String, Instant>>>;

fn action(id: &str, channel: &str) -> MessageAction {
    let mut traits = serde_json::Map::new();
    traits.insert("first_name".into(), json!("Ada"));
    MessageAction {
        message_id: id.into(),
        journey: "bench".into(),
        user_id: format!("user-{id}"),
        instance: 1,
        step_path: "steps[0]".into(),
        variant: None,
        channel: channel.into(),
        template: "t".into(),
        address: Some(match channel {
            "email" => "ada@example.com".into(),
            _ => "+15550001111".into(),
        }),
        traits,
        event: Some(json!({"properties": {"total": 42}})),
        time: 0,
    }
}

fn http_peer(rt: &tokio::runtime::Runtime) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::CREATED,
            r#"{"sid":"SM1","status":"queued"}"#,
        )
    });
    rt.spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn smtpd() -> Option<(Child, u16, tempfile::TempDir)> {
    let python = std::env::var("HERALD_SMTPD_PYTHON").ok()?;
    let dir = tempfile::tempdir().ok()?;
    for d in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(dir.path().join(d)).ok()?;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new(python)
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
        .args(["-c", "aiosmtpd.handlers.Mailbox"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((child, port, dir))
}

fn connector(
    channel: &str,
    base: &str,
    smtp_port: Option<u16>,
    timeout_ms: u64,
) -> Option<Connector> {
    match channel {
        "webhook" => Some(Connector::Webhook(
            Webhook::new(&WebhookConfig {
                url: format!("{base}/hook"),
                secret: Some("s".into()),
                concurrency: 1,
                rate_per_second: None,
                timeout_ms,
            })
            .ok()?,
        )),
        "sms" => Some(Connector::MessagesApi(
            MessagesApi::new(
                &MessagesApiConfig {
                    base_url: base.into(),
                    account_sid: "AC1".into(),
                    auth_token: "t".into(),
                    from: "+15550000000".into(),
                    status_callback: None,
                    concurrency: 1,
                    rate_per_second: None,
                    timeout_ms,
                },
                "sms",
            )
            .ok()?,
        )),
        "email" => Some(Connector::Smtp(
            Smtp::new(&EmailConfig {
                smtp: format!("127.0.0.1:{}", smtp_port?),
                tls: "none".into(),
                username: None,
                password: None,
                from: "bench@herald.test".into(),
                concurrency: 1,
                rate_per_second: None,
                timeout_ms,
            })
            .ok()?,
        )),
        "kafka" => {
            let brokers = std::env::var("HERALD_TEST_KAFKA").ok()?;
            let topic = format!("notify-bench-{}", std::process::id());
            Some(Connector::Kafka(
                KafkaChannel::new(
                    &KafkaChannelConfig {
                        topic,
                        brokers: None,
                        concurrency: 1,
                        rate_per_second: None,
                        timeout_ms,
                    },
                    &brokers,
                )
                .ok()?,
            ))
        }
        _ => None,
    }
}

fn create_topic(topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let Ok(brokers) = std::env::var("HERALD_TEST_KAFKA") else {
        return;
    };
    let Ok(admin) = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create::<AdminClient<rdkafka::client::DefaultClientContext>>()
    else {
        return;
    };
    let _ = futures::executor::block_on(admin.create_topics(
        &[NewTopic::new(topic, 4, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ));
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let base = http_peer(&rt);
    let smtp = if args.channels.iter().any(|c| c == "email") {
        smtpd()
    } else {
        None
    };
    create_topic(&format!("notify-bench-{}", std::process::id()));
    let templates = Arc::new(
        Templates::from_sources([(
            "t",
            "---\nsubject: Hi {{ traits.first_name }}\n---\nYour cart: {{ event.properties.total }} ({{ message.id }})",
        )])
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    println!("channel   burst msgs   seconds   msgs/s   | paced rate   p50 ms   p99 ms   max ms");
    for channel in &args.channels {
        let Some(conn) = connector(channel, &base, smtp.as_ref().map(|s| s.1), 10_000) else {
            println!("{channel:<9} skipped (its peer is not available)");
            continue;
        };
        let dir = tempfile::tempdir()?;
        let outbox = Outbox::open(&dir.path().join("outbox.redb"))?;
        let accepted: Accepted = Arc::default();
        let acc = Arc::clone(&accepted);
        let feed: FeedbackFn = Arc::new(move |ev: &Json| {
            if ev["event"] == "Message Sent" {
                if let Some(id) = ev["properties"]["message_id"].as_str() {
                    acc.lock()
                        .expect("lock")
                        .insert(id.to_string(), Instant::now());
                }
            }
            Ok(())
        });
        let d = Delivery::start(
            rt.handle(),
            Arc::clone(&outbox),
            Arc::clone(&templates),
            vec![ChannelSetup {
                name: channel.clone(),
                connector: conn,
                limits: Limits {
                    concurrency: args.concurrency,
                    rate_per_second: None,
                    timeout_ms: 10_000,
                },
            }],
            RetryPolicy {
                max_attempts: 3,
                base: Duration::from_millis(50),
                max: Duration::from_millis(500),
            },
            feed,
            Arc::new(NotifyMetrics::default()),
        )?;
        // Burst.
        let actions: Vec<MessageAction> = (0..args.messages)
            .map(|i| action(&format!("b{i}"), channel))
            .collect();
        let t0 = Instant::now();
        d.submit(outbox.enqueue_blocking(actions, 0)?);
        while accepted.lock().expect("lock").len() < args.messages {
            if t0.elapsed() > Duration::from_secs(600) {
                anyhow::bail!("{channel}: burst did not finish");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let secs = t0.elapsed().as_secs_f64();
        // Paced.
        let mut handed = HashMap::new();
        let gap = Duration::from_secs_f64(1.0 / args.rate as f64);
        let start = Instant::now();
        for i in 0..args.paced {
            let due = start + gap * i as u32;
            if let Some(w) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
            let id = format!("p{i}");
            handed.insert(id.clone(), Instant::now());
            d.submit(outbox.enqueue_blocking(vec![action(&id, channel)], 0)?);
        }
        while accepted.lock().expect("lock").len() < args.messages + args.paced {
            if start.elapsed() > Duration::from_secs(600) {
                anyhow::bail!("{channel}: paced phase did not finish");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut h = Histogram::<u64>::new(3)?;
        let acc = accepted.lock().expect("lock");
        for (id, t) in &handed {
            let at = acc
                .get(id)
                .ok_or_else(|| anyhow::anyhow!("{id} not accepted"))?;
            h.record(at.duration_since(*t).as_micros() as u64)?;
        }
        println!(
            "{channel:<9} {:>10} {:>9.2} {:>8.0}   | {:>10} {:>8.2} {:>8.2} {:>8.2}",
            args.messages,
            secs,
            args.messages as f64 / secs,
            args.rate,
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
            h.max() as f64 / 1e3,
        );
    }
    if let Some((mut child, _, _)) = smtp {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(())
}
