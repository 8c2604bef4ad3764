//! Herald benchmark helpers: memory readings for the replay throughput run.

/// Resident set size now and its peak since the last [`reset_peak_rss`], in bytes, from
/// `/proc/self/status` (Linux). `None` elsewhere.
pub fn rss() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the kernel's peak-RSS mark for this process (`/proc/self/clear_refs` = 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// What the replay benches read before the dataflow runs: accepted, projected events
/// (deduplicated as `herald replay` does) and the profile snapshots with their instants.
pub struct Inputs {
    /// The events, in file order.
    pub events: Vec<herald_operators::project::Projected>,
    /// The snapshots, `(instant, rows)`.
    pub snapshots: Vec<(i64, std::sync::Arc<herald_operators::plan::SnapshotRows>)>,
}

/// Reads `events` (JSONL files) projected by `plan`, and `profiles` (`PATH@RFC3339`).
pub fn read_inputs(
    plan: &herald_operators::plan::Plan,
    events: &[String],
    profiles: &[String],
) -> anyhow::Result<Inputs> {
    let batch = herald_connectors::events::read_projected(
        events,
        herald_operators::event::Limits::default(),
        herald_connectors::events::DEFAULT_DEDUP_HORIZON_MS,
        0,
        plan,
        &|_| false,
    )?;
    let mut snapshots = Vec::new();
    for p in profiles {
        let (path, at) = herald_engine::replay::parse_profile_arg(p)?;
        let rows = herald_connectors::snapshot::read_snapshot(&path)?.rows;
        snapshots.push((at, std::sync::Arc::new(rows)));
    }
    Ok(Inputs {
        events: batch.events.into_iter().map(|(e, _)| e).collect(),
        snapshots,
    })
}

/// The replay benches' common arguments: what to replay and how far.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Segment file.
    #[arg(long)]
    pub segments: String,
    /// Event JSONL files.
    #[arg(long, num_args = 1.., required = true)]
    pub events: Vec<String>,
    /// Profile snapshots, PATH@RFC3339.
    #[arg(long)]
    pub profiles: Vec<String>,
    /// Clock horizon: the instant the state is brought to.
    #[arg(long)]
    pub until: String,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}
