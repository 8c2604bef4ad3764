//! `dead_letters.jsonl` of `herald run`, bounded: rotated by size, the oldest rotated
//! file deleted past a count, and a failed write counted instead of stopping the service.
//!
//! A dead letter records what was refused, for someone to look at; the refusal itself was
//! already answered (a 4xx with the reason to an HTTP client, a message kept on the Kafka
//! topic). So a full disk or a flood of bad requests must neither fill the disk nor stop
//! ingest: at most `http.dead_letter_file_bytes × (http.dead_letter_files + 1)` bytes are
//! kept, letters deleted with the oldest file are counted in
//! `herald_dead_letters_dropped_total`, and letters that cannot be written in
//! `herald_dead_letter_write_errors_total` (and logged once a minute at most). A rotation
//! that fails (a rename refused) is counted in `herald_errors_total{sink="dead_letters"}`,
//! the letters stay in the current file, and it is tried again a file's size later.
//!
//! Files: `dead_letters.jsonl` (current), `dead_letters.1.jsonl` (the newest rotated)
//! … `dead_letters.N.jsonl` (the oldest). Rotated files past N (left by a run that kept
//! more) are removed at start.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::metrics::Metrics;

/// The current dead-letter file and its rotation.
pub(super) struct DeadLetterFile {
    dir: PathBuf,
    file: Option<BufWriter<File>>,
    bytes: u64,
    max_bytes: u64,
    keep: usize,
    last_warned: Option<Instant>,
    /// Letters in each file by rotation number (0: current), where known: the files
    /// written in this run; older ones are counted when deleted.
    letters: Vec<Option<u64>>,
    /// After a failed rotation, the size at which to try again (not at every write).
    retry_rotation_at: Option<u64>,
}

impl DeadLetterFile {
    /// Opens (appending to) `dir/dead_letters.jsonl`.
    pub fn open(dir: &Path, max_bytes: u64, keep: usize, file: BufWriter<File>) -> DeadLetterFile {
        let bytes = file.get_ref().metadata().map_or(0, |m| m.len());
        let d = DeadLetterFile {
            dir: dir.to_path_buf(),
            file: Some(file),
            bytes,
            max_bytes: max_bytes.max(1),
            keep,
            last_warned: None,
            letters: vec![None; keep + 1],
            retry_rotation_at: None,
        };
        d.prune();
        d
    }

    fn path(&self, n: usize) -> PathBuf {
        match n {
            0 => self.dir.join("dead_letters.jsonl"),
            n => self.dir.join(format!("dead_letters.{n}.jsonl")),
        }
    }

    /// Removes rotated files past `keep`, left by a run that kept more.
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name
                .strip_prefix("dead_letters.")
                .and_then(|r| r.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<usize>().ok());
            if n.is_some_and(|n| n > self.keep) {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => tracing::info!("removed {name}: past http.dead_letter_files"),
                    Err(err) => tracing::warn!("cannot remove {name}: {err}"),
                }
            }
        }
    }

    /// Letters in the buffer, not yet written (lost if the write fails).
    fn buffered_letters(&self) -> u64 {
        self.file.as_ref().map_or(0, |f| {
            f.buffer().iter().filter(|b| **b == b'\n').count() as u64
        })
    }

    /// Appends one line (with its newline); rotates first when it would not fit.
    pub fn write(&mut self, line: &[u8], metrics: &Metrics) {
        let due = self.bytes > 0 && self.bytes + line.len() as u64 > self.max_bytes;
        if due && self.retry_rotation_at.is_none_or(|at| self.bytes >= at) {
            match self.rotate(metrics) {
                Ok(()) => self.retry_rotation_at = None,
                Err(e) => {
                    self.retry_rotation_at = Some(self.bytes + self.max_bytes);
                    metrics.error("dead_letters");
                    self.warn(&format!("cannot rotate dead_letters.jsonl: {e}"));
                }
            }
        }
        if self.file.is_none() {
            // Opened again after a failure (the disk may have room now).
            match OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(0))
            {
                Ok(f) => {
                    self.bytes = f.metadata().map_or(0, |m| m.len());
                    self.file = Some(BufWriter::with_capacity(64 * 1024, f));
                }
                Err(e) => {
                    self.lost(metrics, 1, &format!("cannot open dead_letters.jsonl: {e}"));
                    return;
                }
            }
        }
        let buffered = self.buffered_letters();
        let Some(f) = &mut self.file else { return };
        match f.write_all(line) {
            Ok(()) => {
                self.bytes += line.len() as u64;
                if let Some(n) = &mut self.letters[0] {
                    *n += 1;
                }
            }
            Err(e) => {
                self.file = None;
                let what = format!("cannot write dead_letters.jsonl: {e}");
                self.lost(metrics, buffered + 1, &what);
            }
        }
    }

    /// Flushes the buffer (a failure is counted, not returned).
    pub fn flush(&mut self, metrics: &Metrics) {
        let buffered = self.buffered_letters();
        if let Some(f) = &mut self.file {
            if let Err(e) = f.flush() {
                self.file = None;
                let what = format!("cannot write dead_letters.jsonl: {e}");
                self.lost(metrics, buffered, &what);
            }
        }
    }

    /// `n` letters could not be written.
    fn lost(&mut self, metrics: &Metrics, n: u64, what: &str) {
        metrics.dead_letter_write_errors.inc_by(n.max(1));
        self.warn(&format!("{what} (lost; ingest goes on)"));
    }

    fn warn(&mut self, what: &str) {
        let quiet = self
            .last_warned
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if !quiet {
            self.last_warned = Some(Instant::now());
            tracing::error!("dead letters: {what}");
        }
    }

    /// current → .1 → .2 …; the one past `keep` is deleted and its letters counted.
    fn rotate(&mut self, metrics: &Metrics) -> std::io::Result<()> {
        let buffered = self.buffered_letters();
        if let Some(f) = &mut self.file {
            if let Err(e) = f.flush() {
                self.file = None;
                metrics.dead_letter_write_errors.inc_by(buffered);
                return Err(e);
            }
        }
        self.file = None;
        let oldest = self.path(self.keep);
        if self.keep == 0 || oldest.exists() {
            let gone = if self.keep == 0 { self.path(0) } else { oldest };
            let n = self.letters[self.keep].unwrap_or_else(|| count_lines(&gone));
            std::fs::remove_file(&gone)?;
            metrics.dead_letters_dropped.inc_by(n);
        }
        for n in (1..=self.keep).rev() {
            let from = self.path(n - 1);
            if from.exists() {
                std::fs::rename(&from, self.path(n))?;
            }
            self.letters[n] = self.letters[n - 1];
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(0))?;
        self.file = Some(BufWriter::with_capacity(64 * 1024, f));
        self.bytes = 0;
        self.letters[0] = Some(0);
        Ok(())
    }
}

fn count_lines(path: &Path) -> u64 {
    let Ok(mut f) = File::open(path) else {
        return 0;
    };
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    while let Ok(k) = f.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|b| **b == b'\n').count() as u64;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_keeps_n_files_and_counts_what_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::default();
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("dead_letters.jsonl"))
            .unwrap();
        let mut d = DeadLetterFile::open(dir.path(), 100, 2, BufWriter::new(f));
        let line = [b'x'; 39]
            .iter()
            .copied()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        for _ in 0..20 {
            d.write(&line, &metrics);
        }
        d.flush(&metrics);
        let size = |n: &str| std::fs::metadata(dir.path().join(n)).map(|m| m.len()).ok();
        // 2 lines (80 bytes) per file: 20 lines = 10 files, 3 kept.
        assert_eq!(size("dead_letters.jsonl"), Some(80));
        assert_eq!(size("dead_letters.1.jsonl"), Some(80));
        assert_eq!(size("dead_letters.2.jsonl"), Some(80));
        assert_eq!(size("dead_letters.3.jsonl"), None);
        assert_eq!(metrics.dead_letters_dropped.get(), 14);
        // A run that keeps fewer files removes the rest at start.
        let f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("dead_letters.jsonl"))
            .unwrap();
        let _ = DeadLetterFile::open(dir.path(), 100, 1, BufWriter::new(f));
        assert_eq!(size("dead_letters.2.jsonl"), None);
        assert_eq!(size("dead_letters.1.jsonl"), Some(80));
        assert_eq!(metrics.dead_letter_write_errors.get(), 0);
    }

    #[test]
    fn a_failing_disk_is_counted_not_fatal() {
        let metrics = Metrics::default();
        let f = OpenOptions::new().append(true).open("/dev/full").unwrap();
        let mut d = DeadLetterFile::open(
            Path::new("/nonexistent-dir"),
            1 << 20,
            1,
            BufWriter::with_capacity(8, f),
        );
        d.write(b"a long enough line to overflow the buffer\n", &metrics);
        d.flush(&metrics);
        d.write(b"again\n", &metrics);
        assert!(metrics.dead_letter_write_errors.get() >= 2);
    }
}
