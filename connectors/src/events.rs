//! Event JSONL files: one Segment-spec message (or `batch` envelope) per line.
//!
//! Owns [`read_events`]: sources are read in the given order and lines in order; every
//! non-blank line goes through [`parse_message`] (in parallel over chunks of lines), and
//! the results are merged in input order, so the output does not depend on the number of
//! threads. Rejections become [`DeadLetter`]s (with the line's original text and a reason)
//! and are counted per reason; duplicates are dropped by the shared rule
//! ([`herald_operators::dedup::Dedup`]: same identifier and `messageId` within the horizon).
//! Does not own the acceptance rules themselves (`herald_operators::event`).
//!
//! Gzip-compressed input is refused with a clear error: decompress it first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use herald_operators::dedup::{Dedup, Keyed};
use herald_operators::event::{parse_message, Event, Limits, RejectReason, Rejection};
use herald_operators::plan::Plan;
use herald_operators::project::Projected;
use serde::{Deserialize, Serialize};

use crate::error::ConnectorError;
use crate::store::read_all;

/// The default dedup horizon: 24 hours, in milliseconds.
pub const DEFAULT_DEDUP_HORIZON_MS: i64 = 24 * 60 * 60 * 1000;

/// Below this many bytes a source is parsed on the calling thread alone.
const MIN_PARALLEL_BYTES: usize = 256 * 1024;

/// Where an event came from: the index of its source in the list given to
/// [`read_events`] and its 1-based line. Events of one `batch` envelope share a position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Index of the source file in the list passed to [`read_events`].
    pub source: usize,
    /// 1-based line number in that file.
    pub line: u64,
}

/// A rejected message, as written to the dead-letter output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The source file or URL, as given.
    pub source: String,
    /// 1-based line number in the source.
    pub line: u64,
    /// Index inside a `batch` envelope, when the message came from one.
    pub batch_index: Option<usize>,
    /// Why the message was rejected.
    pub reason: RejectReason,
    /// A sentence naming the problem.
    pub detail: String,
    /// The original line (the whole envelope for a batch item), lossy UTF-8.
    pub raw: String,
}

/// Everything read from a list of event files: whole [`Event`]s by default, or a plan's
/// [`Projected`] events ([`read_projected`]).
#[derive(Clone, Debug, PartialEq)]
pub struct EventBatch<T = Event> {
    /// Accepted, deduplicated events in input order, with their positions.
    pub events: Vec<(T, Position)>,
    /// Rejected messages in input order.
    pub dead_letters: Vec<DeadLetter>,
    /// Number of rejected messages per reason (the [`RejectReason::as_str`] names).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Number of messages dropped as duplicates.
    pub duplicates: u64,
    /// Number of lines read, blank lines included.
    pub lines: u64,
    /// Number of bytes read.
    pub bytes: u64,
}

impl<T> Default for EventBatch<T> {
    fn default() -> Self {
        EventBatch {
            events: Vec::new(),
            dead_letters: Vec::new(),
            rejected_by_reason: BTreeMap::new(),
            duplicates: 0,
            lines: 0,
            bytes: 0,
        }
    }
}

/// How a line becomes accepted records: [`Whole`] events, or [`ByPlan`] projections.
pub trait LineParser: Sync {
    /// The accepted record.
    type Out: Keyed + Send;
    /// Parses one non-blank line (as [`parse_message`] with no receive time).
    fn parse(&self, line: &[u8], limits: Limits) -> (Vec<Self::Out>, Vec<Rejection>);
    /// The record of an event read from an events archive.
    fn archived(&self, ev: Event) -> Self::Out;
}

/// Lines to whole [`Event`]s.
pub struct Whole;

impl LineParser for Whole {
    type Out = Event;
    fn parse(&self, line: &[u8], limits: Limits) -> (Vec<Event>, Vec<Rejection>) {
        parse_message(line, None, limits)
    }
    fn archived(&self, ev: Event) -> Event {
        ev
    }
}

/// Lines to a plan's [`Projected`] events ([`Plan::parse_projected`]); `keep_whole` says,
/// by event name, which events keep their whole body (journeys listen to them).
pub struct ByPlan<'a> {
    /// The compiled segment set.
    pub plan: &'a Plan,
    /// Which event names journeys listen to.
    pub keep_whole: &'a (dyn Fn(Option<&str>) -> bool + Sync),
}

impl LineParser for ByPlan<'_> {
    type Out = Projected;
    fn parse(&self, line: &[u8], limits: Limits) -> (Vec<Projected>, Vec<Rejection>) {
        self.plan.parse_projected(line, limits, self.keep_whole)
    }
    fn archived(&self, ev: Event) -> Projected {
        let keep = (self.keep_whole)(ev.event.as_deref());
        self.plan.project(ev, keep)
    }
}

/// Reads event JSONL files and events archives.
///
/// `sources` are local paths or URLs (see [`crate::store::open`]), read in order. A
/// source ending in `.parquet` or `/`, or a local directory, is an events archive
/// ([`crate::tables::read_archived_events`]); its rows count as lines.
/// `threads` is the number of parsing threads (0 means the machine's parallelism); the
/// result is the same for any value. `dedup_horizon_ms` is usually
/// [`DEFAULT_DEDUP_HORIZON_MS`]. Bad messages never fail the call; only an unreadable
/// source (missing, gzip-compressed, storage failure) does.
pub fn read_events(
    sources: &[String],
    limits: Limits,
    dedup_horizon_ms: i64,
    threads: usize,
) -> Result<EventBatch, ConnectorError> {
    read_with(sources, limits, dedup_horizon_ms, threads, &Whole)
}

/// [`read_events`], keeping only what `plan` reads of each event ([`ByPlan`]): the
/// replay path, which never builds the JSON trees of the events it does not keep whole.
pub fn read_projected(
    sources: &[String],
    limits: Limits,
    dedup_horizon_ms: i64,
    threads: usize,
    plan: &Plan,
    keep_whole: &(dyn Fn(Option<&str>) -> bool + Sync),
) -> Result<EventBatch<Projected>, ConnectorError> {
    let parser = ByPlan { plan, keep_whole };
    read_with(sources, limits, dedup_horizon_ms, threads, &parser)
}

/// Local files are read in blocks of this many bytes (whole lines each), so the raw
/// input is never held whole; remote objects are fetched whole.
const BLOCK_BYTES: usize = 32 * 1024 * 1024;

/// [`read_events`] with any [`LineParser`].
pub fn read_with<P: LineParser>(
    sources: &[String],
    limits: Limits,
    dedup_horizon_ms: i64,
    threads: usize,
    parser: &P,
) -> Result<EventBatch<P::Out>, ConnectorError> {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    let mut out = EventBatch::default();
    let mut dedup = Dedup::new(dedup_horizon_ms);
    for (index, source) in sources.iter().enumerate() {
        if crate::tables::is_archive(source) {
            let archived = crate::tables::read_archived_events(source)?;
            out.lines += archived.len() as u64;
            dedup.reserve(archived.len());
            for (i, (event, _received)) in archived.into_iter().enumerate() {
                // A journey's trait write: the replay's journeys write it again.
                if herald_operators::journey::compile::is_archived_write(&event) {
                    continue;
                }
                let (user, id, ts) = event.dedup_key();
                if dedup.admit(user, id, ts, 0) {
                    let line = i as u64 + 1;
                    out.events.push((
                        parser.archived(event),
                        Position {
                            source: index,
                            line,
                        },
                    ));
                } else {
                    out.duplicates += 1;
                }
            }
            continue;
        }
        let mut blocks = Blocks::open(source)?;
        let size = blocks.size;
        let mut lines_before = 0;
        let mut sized = false;
        while let Some(block) = blocks.next_block()? {
            let block_len = block.len();
            let mut parsed = parse_jsonl_with(block, index, source, limits, threads, parser);
            if !sized {
                // Size the event list and the dedup table once, from the first block's
                // bytes per event, rather than growing them block by block.
                sized = true;
                if let Some(size) = size.filter(|_| !parsed.events.is_empty()) {
                    let per_event = block_len / parsed.events.len();
                    let estimate = (size as usize / per_event.max(1)).min(1 << 28);
                    out.events
                        .reserve(estimate.saturating_sub(out.events.len()));
                    dedup.reserve(estimate);
                }
            }
            for (_, pos) in &mut parsed.events {
                pos.line += lines_before;
            }
            for dl in &mut parsed.dead_letters {
                dl.line += lines_before;
            }
            lines_before += parsed.lines;
            out.lines += parsed.lines;
            let before = parsed.events.len();
            parsed.events.retain(|(event, _)| {
                let (user, id, ts) = event.dedup_key();
                dedup.admit(user, id, ts, 0)
            });
            out.duplicates += (before - parsed.events.len()) as u64;
            out.events.append(&mut parsed.events);
            for dl in &parsed.dead_letters {
                *out.rejected_by_reason
                    .entry(dl.reason.as_str().to_string())
                    .or_default() += 1;
            }
            out.dead_letters.extend(parsed.dead_letters);
        }
        out.bytes += blocks.bytes;
    }
    Ok(out)
}

/// A source's bytes in blocks of whole lines: local files block by block through one
/// reused buffer, remote objects in one piece.
struct Blocks<'s> {
    source: &'s str,
    file: Option<std::fs::File>,
    whole: Option<bytes::Bytes>,
    buf: Vec<u8>,
    /// Bytes at the end of `buf` past the last block handed out (an unfinished line).
    carry: usize,
    /// The source's size in bytes, when known up front (local files).
    size: Option<u64>,
    bytes: u64,
}

/// The error for gzip-compressed input.
fn gzip_refused(source: &str) -> ConnectorError {
    ConnectorError::input(
        source,
        "gzip-compressed input is not supported; decompress it first",
    )
}

impl<'s> Blocks<'s> {
    fn open(source: &'s str) -> Result<Blocks<'s>, ConnectorError> {
        let named_gz = source.to_ascii_lowercase().ends_with(".gz");
        let mut blocks = Blocks {
            source,
            file: None,
            whole: None,
            buf: Vec::new(),
            carry: 0,
            size: None,
            bytes: 0,
        };
        if !source.contains("://") || source.starts_with("file://") {
            let local = source.strip_prefix("file://").unwrap_or(source);
            // Missing or unreadable: the store below gives the error that names the problem.
            if let Ok(file) = std::fs::File::open(local) {
                if named_gz {
                    return Err(gzip_refused(source));
                }
                blocks.size = file.metadata().ok().map(|m| m.len());
                blocks.file = Some(file);
                return Ok(blocks);
            }
        }
        let whole = read_all(source)?;
        if named_gz || whole.starts_with(&[0x1f, 0x8b]) {
            return Err(gzip_refused(source));
        }
        blocks.bytes = whole.len() as u64;
        blocks.size = Some(blocks.bytes);
        blocks.whole = Some(whole);
        Ok(blocks)
    }

    /// The next block of whole lines (the last one may lack its newline), or `None` at the end.
    fn next_block(&mut self) -> Result<Option<&[u8]>, ConnectorError> {
        use std::io::Read as _;
        if let Some(whole) = self.whole.take() {
            self.buf = whole.to_vec();
            return Ok(Some(&self.buf));
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(None);
        };
        // Move the unfinished line to the front and fill the rest (no zeroing: read_to_end
        // reads into the spare capacity).
        let first = self.bytes == 0;
        let len = self.buf.len();
        self.buf.drain(..len - self.carry);
        loop {
            let before = self.buf.len();
            let want = (BLOCK_BYTES.saturating_sub(before)).max(64 * 1024);
            self.buf.reserve(want);
            let n = file
                .by_ref()
                .take(want as u64)
                .read_to_end(&mut self.buf)
                .map_err(|e| ConnectorError::input(self.source, format!("reading: {e}")))?;
            self.bytes += n as u64;
            if first && self.buf.starts_with(&[0x1f, 0x8b]) {
                return Err(gzip_refused(self.source));
            }
            if n == 0 {
                // The end of the file: whatever is left is the last block.
                self.file = None;
                self.carry = 0;
                return Ok((!self.buf.is_empty()).then_some(&self.buf[..]));
            }
            if let Some(p) = self.buf[before..].iter().rposition(|&b| b == b'\n') {
                let end = before + p + 1;
                self.carry = self.buf.len() - end;
                return Ok(Some(&self.buf[..end]));
            }
            // No newline yet (a line longer than what was read): read on.
        }
    }
}

/// The parse of one source, before deduplication.
#[derive(Debug)]
pub struct ParsedLines<T = Event> {
    /// Accepted events in input order.
    pub events: Vec<(T, Position)>,
    /// Rejected messages in input order.
    pub dead_letters: Vec<DeadLetter>,
    /// Number of lines, blank lines included.
    pub lines: u64,
}

impl<T> Default for ParsedLines<T> {
    fn default() -> Self {
        ParsedLines {
            events: Vec::new(),
            dead_letters: Vec::new(),
            lines: 0,
        }
    }
}

/// Parses the bytes of one JSONL source (no deduplication, no counters): `source_index`
/// and `source` label positions and dead letters. Deterministic for any `threads`.
pub fn parse_jsonl(
    bytes: &[u8],
    source_index: usize,
    source: &str,
    limits: Limits,
    threads: usize,
) -> ParsedLines {
    parse_jsonl_with(bytes, source_index, source, limits, threads, &Whole)
}

/// [`parse_jsonl`] with any [`LineParser`].
pub fn parse_jsonl_with<P: LineParser>(
    bytes: &[u8],
    source_index: usize,
    source: &str,
    limits: Limits,
    threads: usize,
    parser: &P,
) -> ParsedLines<P::Out> {
    let threads = threads.max(1);
    if threads == 1 || bytes.len() < MIN_PARALLEL_BYTES {
        return parse_chunk(bytes, source_index, source, limits, parser);
    }
    let chunks = split_at_newlines(bytes, threads * 4);
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, ParsedLines<P::Out>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.min(chunks.len()))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(chunk) = chunks.get(i) else { break };
                        done.push((i, parse_chunk(chunk, source_index, source, limits, parser)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(done) => done,
                // A panic in the parser is a bug; re-raise it rather than lose lines.
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    results.sort_by_key(|(i, _)| *i);
    let mut out = ParsedLines {
        events: Vec::with_capacity(results.iter().map(|(_, p)| p.events.len()).sum()),
        ..ParsedLines::default()
    };
    for (_, mut part) in results {
        let offset = out.lines;
        for (_, pos) in &mut part.events {
            pos.line += offset;
        }
        for dl in &mut part.dead_letters {
            dl.line += offset;
        }
        out.events.append(&mut part.events);
        out.dead_letters.append(&mut part.dead_letters);
        out.lines += part.lines;
    }
    out
}

/// Splits bytes into about `n` chunks, each ending just after a newline (the last one at
/// the end of the input), so that no line is cut.
fn split_at_newlines(bytes: &[u8], n: usize) -> Vec<&[u8]> {
    let target = bytes.len().div_ceil(n.max(1)).max(1);
    let mut chunks = Vec::with_capacity(n + 1);
    let mut start = 0;
    while start < bytes.len() {
        let want = (start + target).min(bytes.len());
        let end = match bytes[want..].iter().position(|&b| b == b'\n') {
            Some(p) => want + p + 1,
            None => bytes.len(),
        };
        chunks.push(&bytes[start..end]);
        start = end;
    }
    chunks
}

/// Parses a run of whole lines, numbering them from 1.
fn parse_chunk<P: LineParser>(
    bytes: &[u8],
    source_index: usize,
    source: &str,
    limits: Limits,
    parser: &P,
) -> ParsedLines<P::Out> {
    let mut out = ParsedLines {
        events: Vec::with_capacity(bytes.iter().filter(|&&b| b == b'\n').count() + 1),
        ..ParsedLines::default()
    };
    let mut line_no = 0;
    let mut rest = bytes;
    while !rest.is_empty() {
        let (line, tail) = match rest.iter().position(|&b| b == b'\n') {
            Some(p) => (&rest[..p], &rest[p + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = tail;
        line_no += 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.trim_ascii().is_empty() {
            continue;
        }
        let (events, rejections) = parser.parse(line, limits);
        let position = Position {
            source: source_index,
            line: line_no,
        };
        out.events.extend(events.into_iter().map(|e| (e, position)));
        if !rejections.is_empty() {
            let raw = String::from_utf8_lossy(line).into_owned();
            for r in rejections {
                out.dead_letters.push(DeadLetter {
                    source: source.to_string(),
                    line: line_no,
                    batch_index: r.batch_index,
                    reason: r.reason,
                    detail: r.detail,
                    raw: raw.clone(),
                });
            }
        }
    }
    out.lines = line_no;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_end_at_newlines_and_cover_the_input() {
        let data = b"a\nbb\n\nccc\nd";
        for n in 1..8 {
            let chunks = split_at_newlines(data, n);
            assert_eq!(chunks.concat(), data.to_vec());
            for c in &chunks[..chunks.len() - 1] {
                assert_eq!(c.last(), Some(&b'\n'));
            }
        }
        assert!(split_at_newlines(b"", 4).is_empty());
    }

    #[test]
    fn counts_lines_including_blank_ones_and_crlf() {
        let p = parse_jsonl(b"\r\n  \n{\"x\":1}\r\n", 0, "s", Limits::default(), 1);
        assert_eq!(p.lines, 3);
        assert_eq!(p.dead_letters.len(), 1);
        assert_eq!(p.dead_letters[0].line, 3);
        assert_eq!(p.dead_letters[0].raw, "{\"x\":1}");
    }
}
