//! `herald check --explain`: the plan in words: segments in evaluation order, the
//! aggregates and traits they read, and which are shared.

use std::fmt::Write as _;

use super::{Plan, SegmentKind};
use crate::ast::Expr;

impl Plan {
    /// A human-readable plan: slots and which segments share them.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "segments ({}), in evaluation order:",
            self.segments.len()
        );
        for &i in &self.order {
            let seg = &self.segments[i];
            match &seg.kind {
                SegmentKind::Expr(_) => {
                    let aggs: Vec<String> = self
                        .aggs
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| a.used_by.contains(&seg.name))
                        .map(|(k, _)| format!("a{k}"))
                        .collect();
                    let traits: Vec<String> = self
                        .traits
                        .iter()
                        .filter(|(_, u)| u.contains(&seg.name))
                        .map(|(n, _)| n.clone())
                        .collect();
                    let expr = seg
                        .source
                        .as_ref()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    let _ = writeln!(s, "  {}: {}", seg.name, expr);
                    let _ = writeln!(
                        s,
                        "      reads aggregates [{}], traits [{}]",
                        aggs.join(", "),
                        traits.join(", ")
                    );
                }
                SegmentKind::List { url, .. } => {
                    let _ = writeln!(s, "  {}: static list from {url}", seg.name);
                }
                SegmentKind::Warehouse {
                    query, refresh_ms, ..
                } => {
                    let _ = writeln!(
                        s,
                        "  {}: warehouse query {query:?} every {} s",
                        seg.name,
                        refresh_ms / 1000
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "aggregates ({}), each kept once per user in the segment state and read by every segment that uses it:",
            self.aggs.len()
        );
        for (k, a) in self.aggs.iter().enumerate() {
            let shared = if a.used_by.len() > 1 {
                "  [shared]"
            } else {
                ""
            };
            let window = if a.temporal {
                "  [temporal: facts enter/leave at exact instants]"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "  a{k} = {}  used by {}{shared}{window}",
                Expr::Agg(Box::new(a.agg.clone())),
                a.used_by.join(", ")
            );
        }
        let _ = writeln!(s, "traits ({}):", self.traits.len());
        for (name, users) in &self.traits {
            let _ = writeln!(s, "  {name}  used by {}", users.join(", "));
        }
        s
    }
}
