//! The exporter thread of `herald run` (`[export]`): the warehouse tables
//! ([`herald_connectors::tables`]) as date/hour-partitioned Parquet on object storage
//! and as PostgreSQL tables.
//!
//! Owns [`Exporter`]. Workers hand it every accepted event; the sink hands it segment
//! changes, journey events, message actions and its watermarks. Rows wait in one buffer
//! per table. A buffer is written out when it reaches `max_rows_per_file` rows or about
//! `max_file_bytes` bytes, and every buffer is written out `flush_every` after its oldest
//! row arrived; each write is one Parquet file per partition, then one PostgreSQL load.
//!
//! The watermark: once every buffer has been written, every watermark the sink sent
//! before is covered, and only then does the exporter publish it as `durable`, which
//! releases Kafka offset commits. So an event's offset is committed only after the event
//! is in the archive; a crash replays it, and the PostgreSQL load, keyed by each row's
//! identity, stays idempotent. A write that fails is retried with backoff (logged,
//! counted in `herald_errors_total{sink="export_parquet"|"export_postgres"}`) and holds
//! the watermark meanwhile; when the service stops, a write still failing after
//! [`STOP_RETRY`] stops it with the error, and nothing after it is committed.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use herald_connectors::sink::SegmentChange;
use herald_connectors::tables::{self, Row, Table, TABLES};
use herald_operators::event::Event;
use herald_operators::journey::{JourneyRow, MessageAction};
use herald_operators::time::Time;

use super::Live;
use crate::EngineError;

/// How long a failing write is retried once the service is stopping.
pub const STOP_RETRY: Duration = Duration::from_secs(30);

/// The longest wait between two retries of a failing write.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A message to the exporter.
pub enum ExportMsg {
    /// An accepted event and the instant (ms) Herald received it.
    Event(Box<Event>, i64),
    /// A segment change, and the version of its segment's definition that made it.
    Change(SegmentChange, u32),
    /// A journey event.
    Journey(JourneyRow),
    /// A message action.
    Message(Box<MessageAction>),
    /// Every record before this instant has been handed over.
    Watermark(Time),
    /// Write everything and exit.
    Stop,
}

#[derive(Default)]
struct Buffer {
    rows: Vec<Row>,
    bytes: usize,
    since: Option<Instant>,
}

/// The exporter's state.
pub struct Exporter {
    parquet: Option<String>,
    postgres: Option<(String, String)>,
    max_rows: usize,
    max_bytes: usize,
    flush_every: Duration,
    /// `p<process>-<start ms>`: with the sequence number, a file name no other writer
    /// (another process, an earlier run) uses.
    run_id: String,
    seq: u64,
    buffers: Vec<Buffer>,
    pending_watermark: Option<Time>,
}

fn table_index(t: &Table) -> usize {
    TABLES
        .iter()
        .position(|x| x.name == t.name)
        .unwrap_or_default()
}

impl Exporter {
    /// Checks the destinations (creating the PostgreSQL tables) and sets up the buffers.
    pub fn open(live: &Live) -> Result<Option<Exporter>, EngineError> {
        let Some(c) = &live.config.export else {
            return Ok(None);
        };
        let postgres = match &c.postgres_schema {
            Some(schema) => {
                let url = live.config.warehouse_url(None).unwrap_or_default();
                tables::create_postgres_tables(&url, schema).map_err(|e| {
                    let m =
                        format!("config: `export.postgres_schema`: cannot create the tables: {e}");
                    match e.fault() {
                        herald_connectors::Fault::Input => EngineError::Usage(m),
                        herald_connectors::Fault::External => EngineError::Unavailable(m),
                    }
                })?;
                Some((url, schema.clone()))
            }
            None => None,
        };
        let process = live.config.cluster.as_ref().map_or(0, |c| c.process);
        Ok(Some(Exporter {
            parquet: c.parquet.clone(),
            postgres,
            max_rows: c.max_rows_per_file,
            max_bytes: c.max_file_bytes,
            flush_every: Duration::from_millis(live.config.export_flush_ms()?),
            run_id: format!("p{process}-{}", super::now_ms()),
            seq: 0,
            buffers: TABLES.iter().map(|_| Buffer::default()).collect(),
            pending_watermark: None,
        }))
    }

    /// When the oldest row waiting in any buffer arrived.
    fn oldest(&self) -> Option<Instant> {
        self.buffers.iter().filter_map(|b| b.since).min()
    }

    /// Runs until [`ExportMsg::Stop`] or every sender is gone, then writes what is left.
    pub fn run(mut self, rx: Receiver<ExportMsg>, live: &Live) -> Result<(), EngineError> {
        loop {
            let wait = self.oldest().map_or(self.flush_every, |s| {
                (s + self.flush_every).saturating_duration_since(Instant::now())
            });
            match rx.recv_timeout(wait) {
                Ok(ExportMsg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(msg) => {
                    self.take(live, msg)?;
                    // Due by the flush interval even while messages keep coming (a steady
                    // stream never lets the wait above time out). Stopping: the workers
                    // wait for what the archive confirms, so it is written now.
                    let due = self
                        .oldest()
                        .is_some_and(|s| s.elapsed() >= self.flush_every);
                    if due || (live.stopping() && self.pending_watermark.is_some()) {
                        self.flush_all(live)?;
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.flush_all(live)?,
            }
        }
        // Whatever is still queued was sent before the stop.
        while let Ok(msg) = rx.try_recv() {
            if !matches!(msg, ExportMsg::Stop) {
                self.take(live, msg)?;
            }
        }
        self.flush_all(live)
    }

    fn take(&mut self, live: &Live, msg: ExportMsg) -> Result<(), EngineError> {
        match msg {
            ExportMsg::Event(ev, received) => {
                if let Some(row) = tables::outcome_row(&ev) {
                    self.push(live, &tables::DELIVERY_OUTCOMES, row)?;
                }
                self.push(live, &tables::EVENTS, tables::event_row(&ev, received))
            }
            ExportMsg::Change(c, version) => self.push(
                live,
                &tables::SEGMENT_CHANGES,
                tables::change_row(&c, version),
            ),
            ExportMsg::Journey(r) => {
                self.push(live, &tables::JOURNEY_EVENTS, tables::journey_row(&r))
            }
            ExportMsg::Message(m) => self.push(live, &tables::MESSAGES, tables::message_row(&m)),
            ExportMsg::Watermark(f) => {
                if self.buffers.iter().all(|b| b.rows.is_empty()) {
                    live.durable.fetch_max(f, Ordering::AcqRel);
                } else {
                    self.pending_watermark = Some(self.pending_watermark.map_or(f, |w| w.max(f)));
                }
                Ok(())
            }
            ExportMsg::Stop => Ok(()),
        }
    }

    fn push(&mut self, live: &Live, table: &Table, row: Row) -> Result<(), EngineError> {
        let i = table_index(table);
        let b = &mut self.buffers[i];
        b.bytes += tables::row_bytes(&row);
        b.rows.push(row);
        b.since.get_or_insert_with(Instant::now);
        if b.rows.len() >= self.max_rows || b.bytes >= self.max_bytes {
            self.write(live, i)?;
        }
        Ok(())
    }

    /// Writes every buffer, then publishes the watermarks they covered.
    fn flush_all(&mut self, live: &Live) -> Result<(), EngineError> {
        for i in 0..self.buffers.len() {
            self.write(live, i)?;
        }
        if let Some(f) = self.pending_watermark.take() {
            live.durable.fetch_max(f, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Writes one table's buffer: Parquet files first, then the PostgreSQL load, each
    /// retried until it succeeds (see the module docs).
    fn write(&mut self, live: &Live, i: usize) -> Result<(), EngineError> {
        let b = std::mem::take(&mut self.buffers[i]);
        if b.rows.is_empty() {
            return Ok(());
        }
        let table = TABLES[i];
        let started = Instant::now();
        if let Some(prefix) = &self.parquet {
            self.seq += 1;
            let stem = format!("part-{}-{:06}", self.run_id, self.seq);
            retry(live, "export_parquet", table.name, || {
                tables::write_partitioned(prefix, table, &b.rows, &stem).map(|files| {
                    tracing::debug!(
                        table = table.name,
                        rows = b.rows.len(),
                        ?files,
                        "wrote Parquet"
                    );
                })
            })?;
        }
        if let Some((url, schema)) = &self.postgres {
            retry(live, "export_postgres", table.name, || {
                tables::load_postgres(url, schema, table, &b.rows).map(|s| {
                    tracing::debug!(
                        table = table.name,
                        sent = s.sent,
                        new = s.inserted,
                        "loaded PostgreSQL"
                    );
                })
            })?;
        }
        live.metrics
            .export_rows
            .get_or_create(&super::metrics::TableLabel {
                table: table.name.to_string(),
            })
            .inc_by(b.rows.len() as u64);
        live.metrics
            .export_flush_ms
            .observe(started.elapsed().as_secs_f64() * 1e3);
        Ok(())
    }
}

/// Runs `op` until it succeeds, with exponential backoff; each failure is logged and
/// counted under `sink`. Once the service is stopping, gives up after [`STOP_RETRY`].
fn retry<E: std::fmt::Display>(
    live: &Live,
    sink: &str,
    table: &str,
    mut op: impl FnMut() -> Result<(), E>,
) -> Result<(), EngineError> {
    let mut backoff = Duration::from_millis(250);
    let mut stopping_since: Option<Instant> = None;
    loop {
        match op() {
            Ok(()) => return Ok(()),
            Err(e) => {
                live.metrics.error(sink);
                if live.stopping() {
                    let since = *stopping_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= STOP_RETRY {
                        return Err(EngineError::Dataflow(format!(
                            "{sink}: table {table}: {e} (gave up at shutdown; the events behind \
                             it were not committed)"
                        )));
                    }
                }
                tracing::error!("{sink}: table {table}: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
