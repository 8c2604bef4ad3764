//! `herald check`: load a segment file, report its first error or explain its plan.
//!
//! Owns [`load_segments`], the one place the engine reads and compiles a segment file,
//! so `replay` and `check` report errors identically (`FILE:line L, column C: message`).

use herald_operators::ast::SegmentFile;
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;

use crate::EngineError;

/// Reads (local path or object-store URL), parses, checks and compiles a segment file.
pub fn load_segments(path: &str) -> Result<(SegmentFile, Plan), EngineError> {
    let bytes = herald_connectors::store::read_all(path)?;
    let text = String::from_utf8(bytes.to_vec()).map_err(|e| {
        EngineError::Usage(format!("{path}: a segment file must be UTF-8 text ({e})"))
    })?;
    let file = parse_segments(&text).map_err(|err| EngineError::Segments {
        path: path.to_string(),
        err,
    })?;
    // Segment indices travel through the dataflow as u16.
    if file.segments.len() > usize::from(u16::MAX) {
        return Err(EngineError::Usage(format!(
            "{path}: {} segments; a segment file holds at most {}",
            file.segments.len(),
            u16::MAX
        )));
    }
    let plan = Plan::compile(&file);
    Ok((file, plan))
}

/// Validates a segment file; on success returns a report of its plan: each segment, the
/// aggregates and traits it reads, and which aggregates are shared.
pub fn check(path: &str) -> Result<String, EngineError> {
    let (file, plan) = load_segments(path)?;
    Ok(format!(
        "{path}: ok, {} segment(s), {} distinct aggregate(s), {} trait(s)\n\n{}",
        file.segments.len(),
        plan.aggs.len(),
        plan.traits.len(),
        plan.explain()
    ))
}
