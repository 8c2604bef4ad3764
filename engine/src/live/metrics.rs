//! Prometheus metrics of a live Herald, served at `/metrics` (OpenMetrics text).
//!
//! Owns [`Metrics`]: one registry with every family, cheap to update from any thread
//! (atomics). Names are documented in `docs/operations.md`; the Grafana dashboard in
//! `docs/grafana-dashboard.json` reads them.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `source`: where events came in.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// `http` or `kafka`.
    pub source: String,
}

/// `reason`: a dead-letter reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The [`RejectReason`](herald_operators::event::RejectReason) name.
    pub reason: String,
}

/// `topic`, `partition`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    /// Topic.
    pub topic: String,
    /// Partition id.
    pub partition: i32,
}

/// `segment`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SegmentLabel {
    /// Segment name.
    pub segment: String,
}

/// `segment`, `direction`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabel {
    /// Segment name.
    pub segment: String,
    /// `enter` or `leave`.
    pub direction: String,
}

/// `journey`, `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JourneyLabel {
    /// Journey name.
    pub journey: String,
    /// Journey event kind (`entered`, `sent`, `suppressed`, …).
    pub kind: String,
}

/// `table`: a warehouse table.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// `events`, `segment_changes`, `journey_events`, `messages`, `delivery_outcomes`.
    pub table: String,
}

/// `sink`: a sink or client that failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    /// `kafka_changes`, `kafka_dead_letters`, `file`, `kafka_consumer`, `snapshots`.
    pub sink: String,
}

/// A listener and why one of its connections was closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabel {
    /// `ingest` or `admin`.
    pub listener: String,
    /// `idle_timeout`, `header_timeout`, `handshake_timeout`.
    pub reason: String,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Events accepted, by source.
    pub events_in: Family<SourceLabel, Counter>,
    /// Messages rejected, by reason.
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Consumer lag (messages) per partition, from librdkafka statistics.
    pub consumer_lag: Family<PartitionLabel, Gauge>,
    /// Wall clock minus the output frontier, ms.
    pub frontier_delay_ms: Gauge,
    /// Members per segment.
    pub segment_size: Family<SegmentLabel, Gauge>,
    /// Membership changes, by segment and direction.
    pub segment_changes: Family<ChangeLabel, Counter>,
    /// Snapshots applied.
    pub snapshots_applied: Counter,
    /// When each warehouse audience's query last succeeded (seconds since the epoch).
    pub audience_refreshed: Family<SegmentLabel, Gauge>,
    /// Errors talking to external systems (each also logged), by component.
    pub errors: Family<SinkLabel, Counter>,
    /// HTTP ingest requests refused as a whole (auth, size, body).
    pub http_refused: Family<ReasonLabel, Counter>,
    /// How late (ms) a change reaches the sink after its instant: the tick wait plus the
    /// dataflow's work (and, for lapses, how late the clock fired them).
    pub change_delay_ms: Histogram,
    /// Redelivered events dropped by the dedup rule (same identifier and `messageId` within
    /// the horizon; this process).
    pub duplicates: Counter,
    /// Comparisons of values of different types, evaluated as NULL.
    pub type_mismatches: Counter,
    /// Time (ms) spent by the sink handing a watermark's changes over (flush and acks).
    pub sink_flush_ms: Gauge<f64, AtomicU64>,
    /// Journey events, by journey and kind.
    pub journey_events: Family<JourneyLabel, Counter>,
    /// How late (ms) a message action reaches the sink after its instant.
    pub message_delay_ms: Histogram,
    /// Rows written by the exporter (`[export]`), by table.
    pub export_rows: Family<TableLabel, Counter>,
    /// Milliseconds one exporter write took (Parquet files and PostgreSQL load).
    pub export_flush_ms: Histogram,
    /// The notifications layer's per-channel metrics (`herald_notify_*`).
    pub notify: std::sync::Arc<herald_connectors::notify::delivery::NotifyMetrics>,
    /// Checkpoints completed.
    pub checkpoints: Counter,
    /// Bytes of checkpoint parts written.
    pub checkpoint_bytes: Counter,
    /// The instant (ms) of the latest complete checkpoint.
    pub checkpoint_at: Gauge,
    /// Milliseconds the last checkpoint's final part and commit took.
    pub checkpoint_ms: Gauge<f64, AtomicU64>,
    /// Connections Herald closed, by listener and reason.
    pub connections_dropped: Family<DroppedLabel, Counter>,
    /// Dead letters deleted with the oldest rotated file (past `http.dead_letter_files`).
    pub dead_letters_dropped: Counter,
    /// Dead letters that could not be written (disk full, permissions): counted and
    /// logged, ingest goes on.
    pub dead_letter_write_errors: Counter,
    /// Rejections summarised instead of written one by one (past
    /// `http.dead_letters_per_request` in one request).
    pub dead_letters_summarised: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("herald");
        let notify =
            std::sync::Arc::new(herald_connectors::notify::delivery::NotifyMetrics::default());
        notify.register(&mut registry);
        let events_in = Family::<SourceLabel, Counter>::default();
        registry.register("events_in", "Events accepted, by source", events_in.clone());
        let dead_letters = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "dead_letters",
            "Messages rejected to the dead-letter output, by reason",
            dead_letters.clone(),
        );
        let consumer_lag = Family::<PartitionLabel, Gauge>::default();
        registry.register(
            "consumer_lag",
            "Kafka consumer lag in messages, per partition",
            consumer_lag.clone(),
        );
        let frontier_delay_ms = Gauge::default();
        registry.register(
            "frontier_delay_ms",
            "Wall clock minus the dataflow's output frontier, in milliseconds",
            frontier_delay_ms.clone(),
        );
        let segment_size = Family::<SegmentLabel, Gauge>::default();
        registry.register("segment_size", "Members per segment", segment_size.clone());
        let segment_changes = Family::<ChangeLabel, Counter>::default();
        registry.register(
            "segment_changes",
            "Segment membership changes, by direction",
            segment_changes.clone(),
        );
        let snapshots_applied = Counter::default();
        registry.register(
            "snapshots_applied",
            "Profile snapshots applied",
            snapshots_applied.clone(),
        );
        let audience_refreshed = Family::<SegmentLabel, Gauge>::default();
        registry.register(
            "audience_last_refresh_seconds",
            "When each warehouse audience's query last succeeded, in seconds since the epoch",
            audience_refreshed.clone(),
        );
        let errors = Family::<SinkLabel, Counter>::default();
        registry.register(
            "errors",
            "Errors from external systems, by component (details in the log)",
            errors.clone(),
        );
        let http_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "http_refused",
            "HTTP ingest requests refused as a whole, by reason",
            http_refused.clone(),
        );
        let change_delay_ms = Histogram::new(exponential_buckets(0.25, 2.0, 16));
        registry.register(
            "change_delay_ms",
            "Milliseconds from a change's instant to its arrival at the sink",
            change_delay_ms.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            "duplicates",
            "Redelivered events dropped by dedup (same identifier and messageId)",
            duplicates.clone(),
        );
        let type_mismatches = Counter::default();
        registry.register(
            "type_mismatches",
            "Comparisons evaluated between values of different types (NULL by the spec), \
             counted per evaluation",
            type_mismatches.clone(),
        );
        let sink_flush_ms = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "sink_flush_ms",
            "Milliseconds the last sink flush (file flush and Kafka acks) took",
            sink_flush_ms.clone(),
        );
        let journey_events = Family::<JourneyLabel, Counter>::default();
        registry.register(
            "journey_events",
            "Journey events, by journey and kind",
            journey_events.clone(),
        );
        let message_delay_ms = Histogram::new(exponential_buckets(0.25, 2.0, 16));
        registry.register(
            "message_delay_ms",
            "Milliseconds from a message action's instant to its arrival at the sink",
            message_delay_ms.clone(),
        );
        let export_rows = Family::<TableLabel, Counter>::default();
        registry.register(
            "export_rows",
            "Rows written to the warehouse tables, by table",
            export_rows.clone(),
        );
        let export_flush_ms = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        registry.register(
            "export_flush_ms",
            "Milliseconds one export write took (Parquet files and PostgreSQL load)",
            export_flush_ms.clone(),
        );
        let checkpoints = Counter::default();
        registry.register("checkpoints", "Checkpoints completed", checkpoints.clone());
        let checkpoint_bytes = Counter::default();
        registry.register(
            "checkpoint_bytes",
            "Bytes of checkpoint parts written",
            checkpoint_bytes.clone(),
        );
        let checkpoint_at = Gauge::default();
        registry.register(
            "checkpoint_at_ms",
            "Instant (ms since the epoch) of the latest complete checkpoint",
            checkpoint_at.clone(),
        );
        let checkpoint_ms = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "checkpoint_commit_ms",
            "Milliseconds the last checkpoint's final part and commit took",
            checkpoint_ms.clone(),
        );
        let connections_dropped = Family::<DroppedLabel, Counter>::default();
        registry.register(
            "connections_dropped",
            "HTTP connections Herald closed (idle, slow headers, slow TLS handshake)",
            connections_dropped.clone(),
        );
        let dead_letters_dropped = Counter::default();
        registry.register(
            "dead_letters_dropped",
            "Dead letters deleted with the oldest rotated dead-letter file",
            dead_letters_dropped.clone(),
        );
        let dead_letter_write_errors = Counter::default();
        registry.register(
            "dead_letter_write_errors",
            "Dead letters that could not be written to the dead-letter file",
            dead_letter_write_errors.clone(),
        );
        let dead_letters_summarised = Counter::default();
        registry.register(
            "dead_letters_summarised",
            "Rejections written as one summary letter per request instead of one by one",
            dead_letters_summarised.clone(),
        );
        Metrics {
            connections_dropped,
            dead_letters_dropped,
            dead_letter_write_errors,
            dead_letters_summarised,
            checkpoints,
            checkpoint_bytes,
            checkpoint_at,
            checkpoint_ms,
            export_rows,
            export_flush_ms,
            journey_events,
            message_delay_ms,
            notify,
            registry,
            events_in,
            dead_letters,
            consumer_lag,
            frontier_delay_ms,
            segment_size,
            segment_changes,
            snapshots_applied,
            audience_refreshed,
            errors,
            http_refused,
            change_delay_ms,
            duplicates,
            type_mismatches,
            sink_flush_ms,
        }
    }
}

impl Metrics {
    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts an accepted event.
    pub fn event_in(&self, source: &str) {
        self.events_in
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .inc();
    }

    /// Counts a dead letter.
    pub fn dead_letter(&self, reason: &str) {
        self.dead_letters
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a connection Herald closed.
    pub fn connection_dropped(&self, listener: &str, reason: &str) {
        self.connections_dropped
            .get_or_create(&DroppedLabel {
                listener: listener.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts an external error.
    pub fn error(&self, component: &str) {
        self.errors
            .get_or_create(&SinkLabel {
                sink: component.into(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the Grafana dashboard queries exists.
    #[test]
    fn the_dashboard_reads_only_metrics_that_exist() {
        let m = Metrics::default();
        // A family appears in the text once it has a label set.
        m.event_in("http");
        m.dead_letter("invalid_json");
        m.error("snapshots");
        m.consumer_lag
            .get_or_create(&PartitionLabel {
                topic: "events".into(),
                partition: 0,
            })
            .set(1);
        m.segment_size
            .get_or_create(&SegmentLabel {
                segment: "s".into(),
            })
            .set(1);
        m.segment_changes
            .get_or_create(&ChangeLabel {
                segment: "s".into(),
                direction: "enter".into(),
            })
            .inc();
        m.http_refused
            .get_or_create(&ReasonLabel {
                reason: "too_large".into(),
            })
            .inc();
        m.export_rows
            .get_or_create(&TableLabel {
                table: "events".into(),
            })
            .inc();
        let text = m.encode();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/grafana-dashboard.json")).unwrap();
        let mut checked = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for (i, _) in expr.match_indices("herald_") {
                    let name: String = expr[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    let family = ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s))
                        .unwrap_or(&name);
                    assert!(
                        families.contains(&family),
                        "{name} ({family}) not in {families:?}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 10);
    }
}
