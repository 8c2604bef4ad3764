//! `dead_letters.jsonl` of `herald run`, bounded: rotated by size, the oldest rotated
//! file deleted past a count, and a failed write counted instead of stopping the service.
//!
//! A dead letter records what was refused, for someone to look at; the refusal itself was
//! already answered (a 4xx with the reason to an HTTP client, a message kept on the Kafka
//! topic). So a full disk or a flood of bad requests must neither fill the disk nor stop
//! ingest: at most `http.dead_letter_file_bytes × (http.dead_letter_files + 1)` bytes are
//! kept, letters deleted with the oldest file are counted in
//! `herald_dead_letters_dropped_total`, and letters that cannot be written in
//! `herald_dead_letter_write_errors_total` (and logged once a minute at most).
//!
//! Files: `dead_letters.jsonl` (current), `dead_letters.1.jsonl` (the newest rotated)
//! … `dead_letters.N.jsonl` (the oldest).

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
}

impl DeadLetterFile {
    /// Opens (appending to) `dir/dead_letters.jsonl`.
    pub fn open(dir: &Path, max_bytes: u64, keep: usize, file: BufWriter<File>) -> DeadLetterFile {
        let bytes = file.get_ref().metadata().map_or(0, |m| m.len());
        DeadLetterFile {
            dir: dir.to_path_buf(),
            file: Some(file),
            bytes,
            max_bytes: max_bytes.max(1),
            keep,
            last_warned: None,
        }
    }

    fn path(&self, n: usize) -> PathBuf {
        match n {
            0 => self.dir.join("dead_letters.jsonl"),
            n => self.dir.join(format!("dead_letters.{n}.jsonl")),
        }
    }

    /// Appends one line (with its newline); rotates first when it would not fit.
    pub fn write(&mut self, line: &[u8], metrics: &Metrics) {
        if self.bytes > 0 && self.bytes + line.len() as u64 > self.max_bytes {
            if let Err(e) = self.rotate(metrics) {
                self.failed(metrics, &format!("cannot rotate dead_letters.jsonl: {e}"));
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
                    self.failed(metrics, &format!("cannot open dead_letters.jsonl: {e}"));
                    return;
                }
            }
        }
        let Some(f) = &mut self.file else { return };
        match f.write_all(line) {
            Ok(()) => self.bytes += line.len() as u64,
            Err(e) => {
                self.file = None;
                self.failed(metrics, &format!("cannot write dead_letters.jsonl: {e}"));
            }
        }
    }

    /// Flushes the buffer (a failure is counted, not returned).
    pub fn flush(&mut self, metrics: &Metrics) {
        if let Some(f) = &mut self.file {
            if let Err(e) = f.flush() {
                self.file = None;
                self.failed(metrics, &format!("cannot write dead_letters.jsonl: {e}"));
            }
        }
    }

    fn failed(&mut self, metrics: &Metrics, what: &str) {
        metrics.dead_letter_write_errors.inc();
        let quiet = self
            .last_warned
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if !quiet {
            self.last_warned = Some(Instant::now());
            tracing::error!("{what} (the letter is lost; ingest goes on)");
        }
    }

    /// current → .1 → .2 …; the one past `keep` is deleted and its letters counted.
    fn rotate(&mut self, metrics: &Metrics) -> std::io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        let oldest = self.path(self.keep);
        if self.keep == 0 || oldest.exists() {
            let gone = if self.keep == 0 { self.path(0) } else { oldest };
            metrics.dead_letters_dropped.inc_by(count_lines(&gone));
            std::fs::remove_file(&gone)?;
        }
        for n in (1..=self.keep).rev() {
            let from = self.path(n - 1);
            if from.exists() {
                std::fs::rename(&from, self.path(n))?;
            }
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(0))?;
        self.file = Some(BufWriter::with_capacity(64 * 1024, f));
        self.bytes = 0;
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
