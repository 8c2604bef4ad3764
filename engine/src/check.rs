//! `herald check`: load a segment file, report its first error or explain its plan.
//!
//! Owns [`load_segments`], the one place the engine reads and compiles a segment file,
//! so `replay` and `check` report errors identically (`FILE:line L, column C: message`).

use herald_operators::ast::SegmentFile;
use herald_operators::journey::compile::Op;
use herald_operators::journey::{compile_journeys, parse_journeys, JourneySet};
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;

#[cfg(feature = "live")]
use std::path::Path;

#[cfg(feature = "live")]
use herald_connectors::notify::template::Templates;

use crate::EngineError;

/// Reads (local path or object-store URL), parses, checks and compiles a segment file.
pub fn load_segments(path: &str) -> Result<(SegmentFile, Plan), EngineError> {
    segments_from_text(path, &read_text(path, "segment")?)
}

/// Reads a definition file (a local path or an object-store URL) as UTF-8 text.
pub fn read_text(path: &str, what: &str) -> Result<String, EngineError> {
    let bytes = herald_connectors::store::read_all(path)?;
    String::from_utf8(bytes.to_vec())
        .map_err(|e| EngineError::Usage(format!("{path}: a {what} file must be UTF-8 text ({e})")))
}

/// [`load_segments`] of text already read from `path`.
pub fn segments_from_text(path: &str, text: &str) -> Result<(SegmentFile, Plan), EngineError> {
    let file = parse_segments(text).map_err(|err| EngineError::Segments {
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
    check_slots(path, &plan)?;
    Ok((file, plan))
}

/// Reads, parses and checks a journey file and compiles it with the segment file it
/// reads (unknown segments are errors here, at load).
pub fn load_journeys(path: &str, segments: &SegmentFile) -> Result<JourneySet, EngineError> {
    journeys_from_text(path, &read_text(path, "journey")?, segments)
}

/// [`load_journeys`] of text already read from `path`.
pub fn journeys_from_text(
    path: &str,
    text: &str,
    segments: &SegmentFile,
) -> Result<JourneySet, EngineError> {
    let err = |err| EngineError::Journeys {
        path: path.to_string(),
        err,
    };
    let defs = parse_journeys(text).map_err(err)?;
    let set = compile_journeys(segments, &defs).map_err(err)?;
    if set.plan.segments.len() > usize::from(u16::MAX) {
        return Err(EngineError::Usage(format!(
            "{path}: segments and journey conditions add up to {}; at most {} fit",
            set.plan.segments.len(),
            u16::MAX
        )));
    }
    check_slots(path, &set.plan)?;
    Ok(set)
}

/// Refuses a plan with more distinct aggregates, traits and lists than the segment state
/// numbers (16 bits).
fn check_slots(path: &str, plan: &Plan) -> Result<(), EngineError> {
    if plan.slot_count() > usize::from(u16::MAX) {
        return Err(EngineError::Usage(format!(
            "{path}: {} distinct aggregates, traits and lists; at most {} fit",
            plan.slot_count(),
            u16::MAX
        )));
    }
    Ok(())
}

/// Loads and checks a templates directory.
#[cfg(feature = "live")]
pub fn load_templates(dir: &str) -> Result<Templates, EngineError> {
    Templates::load(Path::new(dir)).map_err(|e| EngineError::Usage(e.to_string()))
}

/// Checks the journeys' `send` steps against the templates (the template exists; an
/// email's has a subject) and, when `channels` is given, against the channels that are
/// configured for delivery. Errors name the journey file, journey and step path.
#[cfg(feature = "live")]
pub fn check_sends(
    path: &str,
    set: &JourneySet,
    templates: &Templates,
    channels: Option<&[&str]>,
) -> Result<(), EngineError> {
    for (journey, step, channel, template) in set.sends() {
        let fail = |msg: String| {
            Err(EngineError::Usage(format!(
                "{path}: journey '{journey}': {step}.send: {msg}"
            )))
        };
        if !templates.contains(template) {
            return fail(format!("unknown template '{template}'"));
        }
        if channel == "email" && !templates.has_subject(template) {
            return fail(format!(
                "template '{template}' has no subject (front matter `subject:`), which email needs"
            ));
        }
        if let Some(c) = channels {
            if !c.contains(&channel) {
                return fail(format!(
                    "channel '{channel}' has no [notify.{channel}] section to deliver it"
                ));
            }
        }
    }
    if let Some(name) = templates.click_without_link().first() {
        return Err(EngineError::Usage(format!(
            "template '{name}' reads message.click_url but has no 'link:' in its front \
             matter (the click's target)"
        )));
    }
    Ok(())
}

/// Validates a segment file (and optionally a journey file and the templates its sends
/// use); on success returns a report.
pub fn check_all(
    path: &str,
    journeys: Option<&str>,
    templates: Option<&str>,
) -> Result<String, EngineError> {
    #[cfg_attr(not(feature = "live"), allow(unused_mut))]
    let mut report = check(path, journeys)?;
    #[cfg(not(feature = "live"))]
    if let Some(dir) = templates {
        return Err(EngineError::Usage(format!(
            "--templates {dir}: this herald was built without notifications (cargo feature \
             `live`)"
        )));
    }
    #[cfg(feature = "live")]
    if let Some(dir) = templates {
        let t = load_templates(dir)?;
        if let Some(jpath) = journeys {
            let (file, _) = load_segments(path)?;
            let set = load_journeys(jpath, &file)?;
            check_sends(jpath, &set, &t, None)?;
        }
        report.push_str(&format!(
            "\n{dir}: ok, {} template(s): {}\n",
            t.names().count(),
            t.names().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(report)
}

/// Validates a segment file; on success returns a report of its plan: each segment, the
/// aggregates and traits it reads, and which aggregates are shared.
/// With `journeys`, also validates that journey file against the segments and reports
/// each journey's steps.
pub fn check(path: &str, journeys: Option<&str>) -> Result<String, EngineError> {
    let (file, plan) = load_segments(path)?;
    let mut report = format!(
        "{path}: ok, {} segment(s), {} distinct aggregate(s), {} trait(s)\n\n{}",
        file.segments.len(),
        plan.aggs.len(),
        plan.traits.len(),
        plan.explain()
    );
    if let Some(jpath) = journeys {
        let set = load_journeys(jpath, &file)?;
        report.push_str(&format!(
            "\n{jpath}: ok, {} journey(s), {} hidden condition segment(s), traits read: {}\n",
            set.journeys.len(),
            set.plan.segments.len() - set.plan.visible,
            set.traits.join(", ")
        ));
        for j in &set.journeys {
            report.push_str(&format!("\njourney {}:\n", j.name));
            for (op, path) in j.ops.iter().zip(&j.paths) {
                if !matches!(op, Op::Jump(_)) {
                    report.push_str(&format!("  {path}: {}\n", op_label(op)));
                }
            }
        }
    }
    Ok(report)
}

fn op_label(op: &Op) -> String {
    match op {
        Op::Wait(ms) => format!("wait {ms} ms"),
        Op::WaitUntil { event, timeout, .. } => match timeout {
            Some(t) => format!("wait until '{event}' (timeout {t} ms)"),
            None => format!("wait until '{event}'"),
        },
        Op::Branch { arms, .. } => format!("branch ({} when)", arms.len()),
        Op::Split { variants, .. } => format!("split ({} variants)", variants.len()),
        Op::Send {
            channel, template, ..
        } => format!("send {channel} {template}"),
        Op::UpdateTrait { name, .. } => format!("update trait {name}"),
        Op::Jump(to) => format!("jump {to}"),
        Op::End => "end".into(),
    }
}
