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
