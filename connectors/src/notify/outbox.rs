//! The durable outbox: every message action Herald has accepted, keyed by `message_id`,
//! with where its delivery stands.
//!
//! Owns [`Outbox`], a [redb](https://docs.rs/redb) file (a pure-Rust embedded key-value
//! store with ACID transactions, fsync on commit). Two tables:
//!
//! - `messages`: `message_id` -> the [`Entry`] as JSON. An id is inserted once, so an
//!   action that arrives again (a replay, a redelivered event after a restart) is
//!   recognised and dropped: that is what makes "never twice" hold. Only
//!   [`Outbox::compact_blocking`] removes ids: finished ones whose action is older than
//!   any instant that can still be derived again.
//! - `open`: the ids that still need work: not yet in a final state, or final with the
//!   feedback event not yet handed on. A restart resumes from this table alone.
//!
//! Invariants: an attempt is recorded ([`State::Sending`]) and committed *before* the
//! request leaves, and its outcome after. So after a crash, an entry in `Sending` is "in
//! doubt" (the provider may or may not have it), and the delivery engine decides per
//! channel what to do with it (see `delivery`).
//!
//! Writes go through one writer thread that commits whatever has queued up in one
//! transaction (group commit): many deliveries in flight cost one fsync per batch, not
//! one each. Reads are concurrent.

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use herald_operators::journey::MessageAction;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

const MESSAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("messages");
const OPEN: TableDefinition<&str, ()> = TableDefinition::new("open");

/// Where a message's delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Accepted; no attempt under way (new, or waiting to retry).
    Queued,
    /// An attempt was started and its outcome not yet recorded.
    Sending,
    /// The provider accepted it.
    Sent,
    /// Given up: a permanent error, retries exhausted, or in doubt on a channel that
    /// cannot be retried safely.
    Failed,
}

/// One message in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The journey's message action.
    pub action: MessageAction,
    /// Where delivery stands.
    pub state: State,
    /// Attempts started so far.
    pub attempts: u32,
    /// The provider's id for the message (Twilio's `sid`, SMTP's queue id, …).
    pub provider_id: Option<String>,
    /// The last error, if any.
    pub error: Option<String>,
    /// When the entry last changed (ms since the epoch).
    pub updated: i64,
    /// Whether the outcome's feedback event has been handed on.
    pub feedback_done: bool,
}

impl Entry {
    /// A new entry for an action.
    pub fn new(action: MessageAction, now: i64) -> Entry {
        Entry {
            action,
            state: State::Queued,
            attempts: 0,
            provider_id: None,
            error: None,
            updated: now,
            feedback_done: false,
        }
    }

    /// Whether the entry still needs work.
    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Sent | State::Failed) || !self.feedback_done
    }
}

/// What can go wrong with the outbox file.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The file could not be opened or created.
    #[error("outbox {path}: {detail}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// A read or a commit failed (disk full, I/O error, a corrupt file).
    #[error("outbox {path}: {detail}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The writer thread is gone (the outbox is closing).
    #[error("outbox {0}: closed")]
    Closed(PathBuf),
}

enum WriteOp {
    /// Insert unless the id is known; the reply says whether it was new.
    Insert(Box<Entry>),
    /// Overwrite.
    Put(Box<Entry>),
    /// Forget a finished id.
    Remove(String),
}

struct WriteReq {
    ops: Vec<WriteOp>,
    reply: oneshot::Sender<Result<Vec<bool>, String>>,
}

/// The outbox. Cheap to share (`Arc`); closing happens when the last handle goes.
pub struct Outbox {
    path: PathBuf,
    db: Arc<Database>,
    writer: Option<std_mpsc::Sender<WriteReq>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Outbox {
    /// Lets the writer finish what is queued and release the file, so the outbox can be
    /// opened again at once.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Outbox {
    /// Opens (or creates) the outbox file and starts its writer thread.
    pub fn open(path: &Path) -> Result<Arc<Outbox>, OutboxError> {
        let open_err = |detail: String| OutboxError::Open {
            path: path.to_path_buf(),
            detail,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| open_err(e.to_string()))?;
        // Both tables exist from the start, so readers never see a missing table.
        let tx = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        tx.open_table(MESSAGES)
            .map_err(|e| open_err(e.to_string()))?;
        tx.open_table(OPEN).map_err(|e| open_err(e.to_string()))?;
        tx.commit().map_err(|e| open_err(e.to_string()))?;
        let db = Arc::new(db);
        let (tx, rx) = std_mpsc::channel::<WriteReq>();
        let writer_db = Arc::clone(&db);
        let thread = std::thread::Builder::new()
            .name("herald-outbox".into())
            .spawn(move || writer(&writer_db, &rx))
            .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
        Ok(Arc::new(Outbox {
            path: path.to_path_buf(),
            db,
            writer: Some(tx),
            thread: Some(thread),
        }))
    }

    fn storage(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError::Storage {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    fn submit(
        &self,
        ops: Vec<WriteOp>,
    ) -> Result<oneshot::Receiver<Result<Vec<bool>, String>>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .as_ref()
            .ok_or_else(|| OutboxError::Closed(self.path.clone()))?
            .send(WriteReq { ops, reply })
            .map_err(|_| OutboxError::Closed(self.path.clone()))?;
        Ok(rx)
    }

    /// Records new actions, durably, and returns the entries that were new (ids seen
    /// before, in any state, are dropped). Blocks until committed: call from a plain
    /// thread, not from async code.
    pub fn enqueue_blocking(
        &self,
        actions: Vec<MessageAction>,
        now: i64,
    ) -> Result<Vec<Entry>, OutboxError> {
        if actions.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<Entry> = actions.into_iter().map(|a| Entry::new(a, now)).collect();
        let ops = entries
            .iter()
            .map(|e| WriteOp::Insert(Box::new(e.clone())))
            .collect();
        let fresh = self
            .submit(ops)?
            .blocking_recv()
            .map_err(|_| OutboxError::Closed(self.path.clone()))?
            .map_err(|e| self.storage(e))?;
        Ok(entries
            .into_iter()
            .zip(fresh)
            .filter_map(|(e, new)| new.then_some(e))
            .collect())
    }

    /// Records an entry's new state, durably (async: for the delivery tasks).
    pub async fn put(&self, entry: &Entry) -> Result<(), OutboxError> {
        self.submit(vec![WriteOp::Put(Box::new(entry.clone()))])?
            .await
            .map_err(|_| OutboxError::Closed(self.path.clone()))?
            .map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// Records an entry's new state, durably, from a plain thread.
    pub fn put_blocking(&self, entry: &Entry) -> Result<(), OutboxError> {
        self.submit(vec![WriteOp::Put(Box::new(entry.clone()))])?
            .blocking_recv()
            .map_err(|_| OutboxError::Closed(self.path.clone()))?
            .map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// One entry, if the id is known.
    pub fn get(&self, message_id: &str) -> Result<Option<Entry>, OutboxError> {
        let rx = self.db.begin_read().map_err(|e| self.storage(e))?;
        let t = rx.open_table(MESSAGES).map_err(|e| self.storage(e))?;
        match t.get(message_id).map_err(|e| self.storage(e))? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| self.storage(format!("entry {message_id} does not parse: {e}"))),
            None => Ok(None),
        }
    }

    /// Every entry that still needs work, in id order.
    pub fn open_entries(&self) -> Result<Vec<Entry>, OutboxError> {
        let rx = self.db.begin_read().map_err(|e| self.storage(e))?;
        let open = rx.open_table(OPEN).map_err(|e| self.storage(e))?;
        let messages = rx.open_table(MESSAGES).map_err(|e| self.storage(e))?;
        let mut out = Vec::new();
        for item in open.iter().map_err(|e| self.storage(e))? {
            let (k, _) = item.map_err(|e| self.storage(e))?;
            let id = k.value();
            if let Some(v) = messages.get(id).map_err(|e| self.storage(e))? {
                out.push(
                    serde_json::from_slice(v.value())
                        .map_err(|e| self.storage(format!("entry {id} does not parse: {e}")))?,
                );
            }
        }
        Ok(out)
    }

    /// Forgets finished entries (sent or failed, feedback handed on) whose action's
    /// instant is before `before` (ms): no replay or restart can derive them again, so
    /// their ids need not be remembered. Returns how many went. Blocks: call from a plain
    /// thread.
    pub fn compact_blocking(&self, before: i64) -> Result<usize, OutboxError> {
        let mut ids = Vec::new();
        {
            let rx = self.db.begin_read().map_err(|e| self.storage(e))?;
            let messages = rx.open_table(MESSAGES).map_err(|e| self.storage(e))?;
            for item in messages.iter().map_err(|e| self.storage(e))? {
                let (k, v) = item.map_err(|e| self.storage(e))?;
                let e: Entry = serde_json::from_slice(v.value()).map_err(|e| {
                    self.storage(format!("entry {} does not parse: {e}", k.value()))
                })?;
                if !e.is_open() && e.action.time < before {
                    ids.push(k.value().to_string());
                }
            }
        }
        let n = ids.len();
        // In slices, so deliveries' writes are not held behind one huge transaction.
        let mut rest = ids.into_iter().peekable();
        while rest.peek().is_some() {
            let ops: Vec<WriteOp> = rest.by_ref().take(10_000).map(WriteOp::Remove).collect();
            self.submit(ops)?
                .blocking_recv()
                .map_err(|_| OutboxError::Closed(self.path.clone()))?
                .map_err(|e| self.storage(e))?;
        }
        Ok(n)
    }

    /// Every entry, in id order (for reports and tests).
    pub fn all_entries(&self) -> Result<Vec<Entry>, OutboxError> {
        let rx = self.db.begin_read().map_err(|e| self.storage(e))?;
        let messages = rx.open_table(MESSAGES).map_err(|e| self.storage(e))?;
        let mut out = Vec::new();
        for item in messages.iter().map_err(|e| self.storage(e))? {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            out.push(
                serde_json::from_slice(v.value()).map_err(|e| {
                    self.storage(format!("entry {} does not parse: {e}", k.value()))
                })?,
            );
        }
        Ok(out)
    }
}

/// The writer thread: takes every request queued, applies them in one transaction,
/// commits (fsync), then answers each. Ends when every sender is gone.
fn writer(db: &Database, rx: &std_mpsc::Receiver<WriteReq>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let result = apply(db, &batch);
        for (req, r) in batch.into_iter().zip(result) {
            let _ = req.reply.send(r);
        }
    }
}

fn apply(db: &Database, batch: &[WriteReq]) -> Vec<Result<Vec<bool>, String>> {
    let run = || -> Result<Vec<Vec<bool>>, String> {
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        let mut replies = Vec::with_capacity(batch.len());
        {
            let mut messages = tx.open_table(MESSAGES).map_err(|e| e.to_string())?;
            let mut open = tx.open_table(OPEN).map_err(|e| e.to_string())?;
            for req in batch {
                let mut reply = Vec::with_capacity(req.ops.len());
                for op in &req.ops {
                    let (entry, only_new) = match op {
                        WriteOp::Insert(e) => (e, true),
                        WriteOp::Put(e) => (e, false),
                        WriteOp::Remove(id) => {
                            // Never an open one (it may have been reopened meanwhile).
                            if open.get(id.as_str()).map_err(|e| e.to_string())?.is_none() {
                                messages.remove(id.as_str()).map_err(|e| e.to_string())?;
                            }
                            reply.push(true);
                            continue;
                        }
                    };
                    let id = entry.action.message_id.as_str();
                    if only_new && messages.get(id).map_err(|e| e.to_string())?.is_some() {
                        reply.push(false);
                        continue;
                    }
                    let bytes = serde_json::to_vec(entry.as_ref()).map_err(|e| e.to_string())?;
                    messages
                        .insert(id, bytes.as_slice())
                        .map_err(|e| e.to_string())?;
                    if entry.is_open() {
                        open.insert(id, ()).map_err(|e| e.to_string())?;
                    } else {
                        open.remove(id).map_err(|e| e.to_string())?;
                    }
                    reply.push(true);
                }
                replies.push(reply);
            }
        }
        tx.commit().map_err(|e| e.to_string())?;
        Ok(replies)
    };
    match run() {
        Ok(replies) => replies.into_iter().map(Ok).collect(),
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(id: &str) -> MessageAction {
        MessageAction {
            message_id: id.into(),
            journey: "j".into(),
            user_id: "u".into(),
            instance: 1,
            step_path: "steps[0]".into(),
            variant: None,
            channel: "webhook".into(),
            template: "t".into(),
            address: None,
            traits: Default::default(),
            event: None,
            time: 5,
        }
    }

    #[test]
    fn an_id_is_accepted_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/outbox.redb");
        {
            let o = Outbox::open(&path).unwrap();
            let fresh = o
                .enqueue_blocking(vec![action("a"), action("b")], 10)
                .unwrap();
            assert_eq!(fresh.len(), 2);
            let fresh = o
                .enqueue_blocking(vec![action("b"), action("c")], 11)
                .unwrap();
            assert_eq!(
                fresh
                    .iter()
                    .map(|e| e.action.message_id.as_str())
                    .collect::<Vec<_>>(),
                ["c"]
            );
            let mut a = o.get("a").unwrap().unwrap();
            a.state = State::Sent;
            a.feedback_done = true;
            o.put_blocking(&a).unwrap();
            let mut b = o.get("b").unwrap().unwrap();
            b.state = State::Sending;
            b.attempts = 1;
            o.put_blocking(&b).unwrap();
        }
        // Reopened (the writer thread of the first handle may still be finishing).
        let o = Outbox::open(&path).unwrap();
        let open: Vec<_> = o
            .open_entries()
            .unwrap()
            .into_iter()
            .map(|e| (e.action.message_id, e.state))
            .collect();
        assert_eq!(
            open,
            [
                ("b".to_string(), State::Sending),
                ("c".to_string(), State::Queued)
            ]
        );
        assert!(o
            .enqueue_blocking(vec![action("a")], 12)
            .unwrap()
            .is_empty());
        assert_eq!(o.all_entries().unwrap().len(), 3);
    }

    #[test]
    fn compaction_forgets_only_finished_entries_older_than_the_instant() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("outbox.redb")).unwrap();
        let at = |id: &str, time: i64| MessageAction { time, ..action(id) };
        o.enqueue_blocking(vec![at("old", 5), at("open", 5), at("new", 50)], 60)
            .unwrap();
        for id in ["old", "new"] {
            let mut e = o.get(id).unwrap().unwrap();
            e.state = State::Sent;
            e.feedback_done = true;
            o.put_blocking(&e).unwrap();
        }
        assert_eq!(o.compact_blocking(10).unwrap(), 1);
        let left: Vec<String> = o
            .all_entries()
            .unwrap()
            .into_iter()
            .map(|e| e.action.message_id)
            .collect();
        assert_eq!(left, ["new", "open"]);
        assert_eq!(o.open_entries().unwrap().len(), 1);
        // A forgotten id is new again; one still remembered is not.
        let fresh = o
            .enqueue_blocking(vec![at("old", 5), at("new", 50)], 70)
            .unwrap();
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].action.message_id, "old");
    }

    #[test]
    fn a_final_entry_stays_open_until_its_feedback_is_out() {
        let mut e = Entry::new(action("x"), 0);
        e.state = State::Failed;
        assert!(e.is_open());
        e.feedback_done = true;
        assert!(!e.is_open());
    }

    #[test]
    fn an_unwritable_path_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let Err(e) = Outbox::open(&file.join("outbox.redb")) else {
            panic!("opened below a file")
        };
        assert!(e.to_string().contains("outbox"), "{e}");
    }
}
