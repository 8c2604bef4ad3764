//! `herald report journeys DIR`: what the journeys did, per journey and variant.
//!
//! Owns [`journeys`]: reads `DIR/journey_events.jsonl` (a replay's output, local or object
//! store) and counts, per journey and variant, the instances that entered, the messages
//! sent, the sends suppressed by reason, and the instances that converted; the conversion
//! rate is converted / entered. Where a journey has a variant named `control`, every other
//! variant gets a two-sided two-proportion z-test of its rate against control's.
//!
//! An instance's variant is the one its split chose (rows before the split carry none, so
//! the instance's first non-empty variant counts); instances that never reached a split
//! are reported under variant `-`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value as Json;

use crate::EngineError;

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VariantReport {
    /// Journey name.
    pub journey: String,
    /// Variant (`-` when none was chosen).
    pub variant: String,
    /// Instances that entered.
    pub entered: u64,
    /// Messages sent.
    pub sent: u64,
    /// Sends suppressed, by reason.
    pub suppressed: BTreeMap<String, u64>,
    /// Instances that converted.
    pub converted: u64,
    /// converted / entered.
    pub conversion_rate: f64,
    /// Against `control`: rate difference, z and two-sided p-value.
    pub vs_control: Option<Test>,
}

/// A two-proportion z-test.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Test {
    /// This variant's rate minus control's.
    pub lift: f64,
    /// The z statistic (pooled standard error).
    pub z: f64,
    /// Two-sided p-value.
    pub p_value: f64,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JourneyReport {
    /// Lines, by journey then variant.
    pub variants: Vec<VariantReport>,
}

#[derive(Default)]
struct Inst {
    variant: Option<String>,
    entered: bool,
    converted: bool,
    sent: u64,
    suppressed: BTreeMap<String, u64>,
}

/// Reads `DIR/journey_events.jsonl` and builds the report.
pub fn journeys(dir: &str) -> Result<JourneyReport, EngineError> {
    let path = format!("{}/journey_events.jsonl", dir.trim_end_matches('/'));
    let bytes = herald_connectors::store::read_all(&path)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut instances: BTreeMap<(String, String, u64), Inst> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| EngineError::Usage(format!("{path}:{}: {what}", n + 1));
        let row: Json = serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let s = |k: &str| row.get(k).and_then(Json::as_str);
        let (Some(journey), Some(user), Some(instance), Some(kind)) = (
            s("journey"),
            s("user_id"),
            row.get("instance").and_then(Json::as_u64),
            s("kind"),
        ) else {
            return Err(bad(
                "a journey event needs journey, user_id, instance and kind",
            ));
        };
        let inst = instances
            .entry((journey.to_string(), user.to_string(), instance))
            .or_default();
        if inst.variant.is_none() {
            inst.variant = s("variant").map(str::to_string);
        }
        match kind {
            "entered" => inst.entered = true,
            "sent" => inst.sent += 1,
            "suppressed" => {
                *inst
                    .suppressed
                    .entry(s("reason").unwrap_or("unknown").to_string())
                    .or_default() += 1
            }
            "converted" => inst.converted = true,
            _ => {}
        }
    }
    let mut by: BTreeMap<(String, String), VariantReport> = BTreeMap::new();
    for ((journey, _, _), i) in instances {
        let variant = i.variant.unwrap_or_else(|| "-".into());
        let r = by
            .entry((journey.clone(), variant.clone()))
            .or_insert_with(|| VariantReport {
                journey,
                variant,
                entered: 0,
                sent: 0,
                suppressed: BTreeMap::new(),
                converted: 0,
                conversion_rate: 0.0,
                vs_control: None,
            });
        r.entered += u64::from(i.entered);
        r.converted += u64::from(i.converted);
        r.sent += i.sent;
        for (k, v) in i.suppressed {
            *r.suppressed.entry(k).or_default() += v;
        }
    }
    let mut variants: Vec<VariantReport> = by.into_values().collect();
    for r in &mut variants {
        r.conversion_rate = rate(r.converted, r.entered);
    }
    let controls: BTreeMap<String, (u64, u64)> = variants
        .iter()
        .filter(|r| r.variant == "control")
        .map(|r| (r.journey.clone(), (r.converted, r.entered)))
        .collect();
    for r in &mut variants {
        if r.variant == "control" || r.variant == "-" {
            continue;
        }
        if let Some(&(cc, cn)) = controls.get(&r.journey) {
            r.vs_control = two_proportion(r.converted, r.entered, cc, cn);
        }
    }
    Ok(JourneyReport { variants })
}

fn rate(k: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        k as f64 / n as f64
    }
}

/// Two-sided two-proportion z-test with the pooled standard error; `None` when it is
/// undefined (an empty group, or no variance at all).
pub fn two_proportion(k1: u64, n1: u64, k2: u64, n2: u64) -> Option<Test> {
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (p1, p2) = (rate(k1, n1), rate(k2, n2));
    let pooled = (k1 + k2) as f64 / (n1 + n2) as f64;
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    if se == 0.0 {
        return None;
    }
    let z = (p1 - p2) / se;
    Some(Test {
        lift: p1 - p2,
        z,
        p_value: erfc(z.abs() / std::f64::consts::SQRT_2),
    })
}

/// The complementary error function, by the Chebyshev fit of Numerical Recipes (`erfcc`,
/// fractional error below 1.2e-7 everywhere): ample for a p-value.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

impl JourneyReport {
    /// The report as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The report as an aligned text table.
    pub fn to_table(&self) -> String {
        let header = [
            "journey",
            "variant",
            "entered",
            "sent",
            "suppressed",
            "converted",
            "rate",
            "vs control",
        ];
        let mut rows: Vec<[String; 8]> = vec![header.map(String::from)];
        for r in &self.variants {
            let suppressed = if r.suppressed.is_empty() {
                "0".to_string()
            } else {
                r.suppressed
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let test = match &r.vs_control {
                Some(t) => format!(
                    "{:+.1} pp, z={:.2}, p={:.4}",
                    t.lift * 100.0,
                    t.z,
                    t.p_value
                ),
                None => "-".into(),
            };
            rows.push([
                r.journey.clone(),
                r.variant.clone(),
                r.entered.to_string(),
                r.sent.to_string(),
                suppressed,
                r.converted.to_string(),
                format!("{:.1}%", r.conversion_rate * 100.0),
                test,
            ]);
        }
        let widths: Vec<usize> = (0..8)
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for r in &rows {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_proportion_test_matches_a_textbook_example() {
        // 120/1000 vs 100/1000: pooled p = 0.11, se = 0.013993, z = 1.4293, p = 0.1529.
        let t = two_proportion(120, 1000, 100, 1000).unwrap();
        assert!((t.z - 1.4293).abs() < 1e-3, "{t:?}");
        assert!((t.p_value - 0.1529).abs() < 1e-3, "{t:?}");
        assert!(two_proportion(0, 0, 1, 2).is_none());
        assert!(two_proportion(0, 5, 0, 5).is_none());
    }

    #[test]
    fn erfc_at_known_points() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-6);
        assert!((erfc(1.0) - 0.157_299_2).abs() < 1e-6);
        assert!((erfc(-1.0) - 1.842_700_8).abs() < 1e-6);
    }
}
