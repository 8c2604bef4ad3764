//! Deterministic random inputs for property tests: event streams, segment files and
//! profile snapshots, all seeded (`rand_chacha`), so a failing case replays from its seed.
//!
//! Owns [`random_events`], [`random_segment_file`] (source text, so it goes through the
//! real parser), [`random_snapshots`], the shared user-key scheme [`user_key`] and
//! [`event_to_json`] (an accepted event back to a Segment-spec message).
//!
//! Values are chosen so that floating-point order does not matter: revenues are
//! multiples of 0.25 below 1000, so every sum of them is exact whatever the order.

use std::collections::BTreeMap;

use herald_operators::event::{Event, EventType};
use herald_operators::time::format_rfc3339_ms;
use herald_operators::value::Value;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value as Json};

use crate::reference::Snapshot;

const HOUR: i64 = 3_600_000;

/// Track event names the generators use (and the generated segments filter on).
pub const TRACK_EVENTS: &[&str] = &[
    "Order Completed",
    "Signed Up",
    "Source Created",
    "Product Viewed",
    "Added to Cart",
];

/// Page names (page events' `event` field).
pub const PAGE_NAMES: &[&str] = &["Home", "Pricing", "Docs"];

const PLANS: &[&str] = &["free", "pro", "enterprise", "Pro"];
const COUNTRIES: &[&str] = &["IN", "US", "DE", "in", "FR"];

/// The key of user number `i`: `u{i}`, except every fifth user is anonymous
/// (`anon-{i}`, as if only `anonymousId` were known). Snapshots only hold `u…` users.
pub fn user_key(i: usize) -> String {
    if i % 5 == 4 {
        format!("anon-{i}")
    } else {
        format!("u{i}")
    }
}

fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn pick<'a>(rng: &mut ChaCha8Rng, items: &[&'a str]) -> &'a str {
    items.choose(rng).copied().unwrap_or("")
}

fn obj(j: Json) -> Map<String, Json> {
    match j {
        Json::Object(m) => m,
        _ => Map::new(),
    }
}

/// `n_events` accepted events (unique message ids, in no particular order) for
/// `n_users` users ([`user_key`]) with timestamps in `[t0_ms, t0_ms + span_ms]`.
///
/// Mix: track events named from [`TRACK_EVENTS`] (orders carry `properties.revenue`,
/// a number, now and then a string like `"12.50"` or missing; product events carry
/// `properties.product_id`, sometimes null), page views (some without a name), screens,
/// groups, and identify events writing `plan`, `country`, `age` and `signup_at`
/// (occasionally null, sometimes via `context.traits`). About a third of timestamps fall
/// on whole hours after `t0_ms` (so they meet snapshot instants) and some repeat an
/// earlier event's timestamp exactly (so the `message_id` tie-break matters).
pub fn random_events(
    seed: u64,
    n_users: usize,
    n_events: usize,
    t0_ms: i64,
    span_ms: i64,
) -> Vec<Event> {
    if n_users == 0 {
        return Vec::new();
    }
    let mut rng = rng_for(seed, 1);
    let span = span_ms.max(1);
    let mut out: Vec<Event> = Vec::with_capacity(n_events);
    for k in 0..n_events {
        let user = user_key(rng.random_range(0..n_users));
        let timestamp = match rng.random_range(0..10) {
            0 | 1 if !out.is_empty() => out[rng.random_range(0..out.len())].timestamp,
            2..=4 => t0_ms + rng.random_range(0..=span / HOUR) * HOUR,
            _ => t0_ms + rng.random_range(0..=span),
        };
        let mut e = Event {
            user,
            kind: EventType::Track,
            event: None,
            message_id: format!("m{seed:x}-{k:05}"),
            timestamp,
            properties: Map::new(),
            context: Map::new(),
            traits: Map::new(),
        };
        match rng.random_range(0..100) {
            0..=59 => {
                let name = pick(&mut rng, TRACK_EVENTS);
                e.event = Some(name.to_string());
                e.properties = track_properties(&mut rng, name);
            }
            60..=74 => {
                e.kind = EventType::Page;
                if rng.random_bool(0.8) {
                    let name = pick(&mut rng, PAGE_NAMES);
                    e.event = Some(name.to_string());
                    e.context =
                        obj(json!({ "page": { "path": format!("/{}", name.to_lowercase()) } }));
                }
            }
            75..=77 => {
                e.kind = EventType::Screen;
                e.event = Some("Dashboard".to_string());
            }
            78..=80 => e.kind = EventType::Group,
            _ => {
                e.kind = EventType::Identify;
                let traits = random_traits(&mut rng, t0_ms, span);
                if rng.random_bool(0.2) {
                    e.context = obj(json!({ "traits": Json::Object(traits) }));
                } else {
                    e.traits = traits;
                }
            }
        }
        out.push(e);
    }
    out
}

fn track_properties(rng: &mut ChaCha8Rng, name: &str) -> Map<String, Json> {
    let mut p = Map::new();
    match name {
        "Order Completed" => {
            let revenue = rng.random_range(0..4000) as f64 * 0.25;
            match rng.random_range(0..20) {
                0 | 1 => {
                    p.insert("revenue".into(), json!(format!("{revenue:.2}")));
                }
                2 => {}
                _ => {
                    p.insert("revenue".into(), json!(revenue));
                }
            }
            p.insert("currency".into(), json!("USD"));
        }
        "Product Viewed" | "Added to Cart" => {
            let id = if rng.random_bool(0.1) {
                Json::Null
            } else {
                json!(format!("p{}", rng.random_range(0..8)))
            };
            p.insert("product_id".into(), id);
        }
        _ => {}
    }
    p
}

fn random_traits(rng: &mut ChaCha8Rng, t0_ms: i64, span: i64) -> Map<String, Json> {
    let mut t = Map::new();
    let null = |rng: &mut ChaCha8Rng| rng.random_bool(0.15);
    if rng.random_bool(0.6) {
        let v = if null(rng) {
            Json::Null
        } else {
            json!(pick(rng, PLANS))
        };
        t.insert("plan".into(), v);
    }
    if rng.random_bool(0.5) {
        let v = if null(rng) {
            Json::Null
        } else {
            json!(pick(rng, COUNTRIES))
        };
        t.insert("country".into(), v);
    }
    if rng.random_bool(0.4) {
        let v = if null(rng) {
            Json::Null
        } else {
            json!(rng.random_range(16..70))
        };
        t.insert("age".into(), v);
    }
    if rng.random_bool(0.2) {
        let at = t0_ms - 5 * 24 * HOUR + rng.random_range(0..=span);
        t.insert("signup_at".into(), json!(format_rfc3339_ms(at)));
    }
    t
}

/// Zero to three profile snapshots for users `0..n_users` (only the non-anonymous keys of
/// [`user_key`], plus a few profile-only users `p{i}` with no events). Instants are
/// whole hours in `[t0, t0 + span]` (the first may be before `t0`); each user is in
/// each snapshot with probability 0.8, so users drop out of newer snapshots. Cells:
/// `plan`, `country` (strings), `age`, `lifetime_value` (numbers), `signup_at`
/// (timestamp), `is_employee` (boolean), each present with probability 0.85.
pub fn random_snapshots(seed: u64, n_users: usize, t0: i64, span: i64) -> Vec<Snapshot> {
    let mut rng = rng_for(seed, 2);
    let n = rng.random_range(0..=3);
    let hours = (span / HOUR).max(1);
    let mut keys: Vec<String> = (0..n_users).filter(|i| i % 5 != 4).map(user_key).collect();
    keys.extend((0..n_users.div_ceil(6)).map(|i| format!("p{i}")));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let at = t0 + rng.random_range(-24..=hours) * HOUR;
        let mut rows = BTreeMap::new();
        for key in &keys {
            if !rng.random_bool(0.8) {
                continue;
            }
            let mut cells = BTreeMap::new();
            // A cell holds a value, a NULL (a write of NULL), or is missing (no write).
            let mut cell = |rng: &mut ChaCha8Rng, name: &str, v: Value| {
                if rng.random_bool(0.85) {
                    cells.insert(name.to_string(), v);
                } else if rng.random_bool(0.5) {
                    cells.insert(name.to_string(), Value::Null);
                }
            };
            let plan = Value::Str(pick(&mut rng, PLANS).to_string());
            cell(&mut rng, "plan", plan);
            let country = Value::Str(pick(&mut rng, COUNTRIES).to_string());
            cell(&mut rng, "country", country);
            let age = Value::num(rng.random_range(16..70) as f64);
            cell(&mut rng, "age", age);
            let ltv = Value::num(rng.random_range(0..8000) as f64 * 0.25);
            cell(&mut rng, "lifetime_value", ltv);
            let signup = Value::Ts(t0 - 5 * 24 * HOUR + rng.random_range(0..=span));
            cell(&mut rng, "signup_at", signup);
            let employee = Value::Bool(rng.random_bool(0.1));
            cell(&mut rng, "is_employee", employee);
            rows.insert(key.clone(), cells);
        }
        out.push(Snapshot { at, rows });
    }
    out
}

/// An accepted event as a Segment-spec JSON message that parses back to the same event
/// (`userId`, or `anonymousId` for `anon-…` keys; `timestamp` as RFC 3339 with ms).
pub fn event_to_json(e: &Event) -> Json {
    let mut m = Map::new();
    m.insert("type".into(), json!(e.kind.as_str()));
    m.insert("messageId".into(), json!(e.message_id));
    let id_field = if e.user.starts_with("anon-") {
        "anonymousId"
    } else {
        "userId"
    };
    m.insert(id_field.into(), json!(e.user));
    match (e.kind, &e.event) {
        (EventType::Track, Some(name)) => {
            m.insert("event".into(), json!(name));
        }
        (EventType::Page | EventType::Screen, Some(name)) => {
            m.insert("name".into(), json!(name));
        }
        _ => {}
    }
    if e.kind == EventType::Alias {
        m.insert("previousId".into(), json!(format!("prev-{}", e.user)));
    }
    m.insert("timestamp".into(), json!(format_rfc3339_ms(e.timestamp)));
    for (key, map) in [
        ("properties", &e.properties),
        ("context", &e.context),
        ("traits", &e.traits),
    ] {
        if !map.is_empty() {
            m.insert(key.into(), Json::Object(map.clone()));
        }
    }
    Json::Object(m)
}

/// Source text of a valid segment file with `n_segments` (at least one) expression
/// segments named `s0`, `s1`, …. Conditions mix every aggregate kind (with and without
/// FILTER, with windows like `timestamp > now() - INTERVAL '30 hours'` and
/// `timestamp < now() - …`), comparisons of aggregates and traits with `now()`,
/// AND/OR/NOT, IS NULL, IN, BETWEEN, LIKE, coalesce, lower/upper, arithmetic, `hash_bucket`
/// and `in_segment` on earlier segments only (so there is never a cycle); about one in
/// seven segments reads no aggregate or trait (`hash_bucket(user_id, …)`, maybe with `NOT
/// in_segment(…)`).
///
/// `properties.revenue` is sometimes a string, so `min`/`max`/`sum`/`avg` over it exercise
/// the documented mixed-type rule.
pub fn random_segment_file(seed: u64, n_segments: usize) -> String {
    let mut g = SegGen {
        rng: rng_for(seed, 3),
        index: 0,
    };
    let mut out =
        format!("-- generated by herald_tests::gen::random_segment_file({seed}, {n_segments})\n");
    for i in 0..n_segments.max(1) {
        g.index = i;
        // Some segments read no aggregate or trait at all: their membership moves only
        // with the user's universe and the segments they reference.
        let cond = if g.rng.random_bool(0.15) {
            g.slot_free()
        } else {
            g.cond(0)
        };
        out.push_str(&format!("CREATE SEGMENT s{i} AS\n    {cond};\n\n"));
    }
    out
}

struct SegGen {
    rng: ChaCha8Rng,
    /// The segment being generated: `in_segment` may name only lower indexes.
    index: usize,
}

impl SegGen {
    fn n(&mut self, lo: i64, hi: i64) -> i64 {
        self.rng.random_range(lo..=hi)
    }

    fn one_of<'a>(&mut self, items: &[&'a str]) -> &'a str {
        pick(&mut self.rng, items)
    }

    fn cmp_op(&mut self) -> &'static str {
        self.one_of(&["=", "<>", "<", "<=", ">", ">=", "!="])
    }

    /// A boolean user-level condition.
    fn cond(&mut self, depth: u32) -> String {
        if depth >= 2 || self.rng.random_bool(0.45) {
            return self.atom();
        }
        match self.n(0, 5) {
            0 | 1 => format!("{} AND {}", self.cond(depth + 1), self.cond(depth + 1)),
            2 | 3 => format!("({} OR {})", self.cond(depth + 1), self.cond(depth + 1)),
            4 => format!("NOT ({})", self.cond(depth + 1)),
            _ => format!("({})", self.cond(depth + 1)),
        }
    }

    /// A condition over the user key and earlier segments only.
    fn slot_free(&mut self) -> String {
        let bucket = format!(
            "hash_bucket(user_id, 'salt{}', 2) = {}",
            self.n(0, 3),
            self.n(0, 1)
        );
        if self.index > 0 && self.rng.random_bool(0.5) {
            let target = self.n(0, self.index as i64 - 1);
            format!("{bucket} AND NOT in_segment('s{target}')")
        } else {
            bucket
        }
    }

    fn atom(&mut self) -> String {
        match self.n(0, 9) {
            0..=5 => self.agg_atom(),
            6..=8 => self.trait_atom(),
            _ if self.index > 0 => {
                let target = self.n(0, self.index as i64 - 1);
                format!("in_segment('s{target}')")
            }
            _ => self.trait_atom(),
        }
    }

    fn window(&mut self) -> String {
        if self.rng.random_bool(0.7) {
            format!("INTERVAL '{} hours'", self.n(1, 240))
        } else {
            format!("INTERVAL '{} days'", self.n(1, 9))
        }
    }

    /// `` or ` FILTER (WHERE …)`.
    fn filter(&mut self) -> String {
        if self.rng.random_bool(0.25) {
            String::new()
        } else {
            format!(" FILTER (WHERE {})", self.efilter(0))
        }
    }

    /// A boolean event-level condition.
    fn efilter(&mut self, depth: u32) -> String {
        if depth >= 2 || self.rng.random_bool(0.5) {
            return self.efilter_atom();
        }
        match self.n(0, 4) {
            0 | 1 => format!(
                "{} AND {}",
                self.efilter(depth + 1),
                self.efilter(depth + 1)
            ),
            2 | 3 => format!(
                "({} OR {})",
                self.efilter(depth + 1),
                self.efilter(depth + 1)
            ),
            _ => format!("NOT ({})", self.efilter(depth + 1)),
        }
    }

    fn efilter_atom(&mut self) -> String {
        match self.n(0, 17) {
            0..=3 => format!("event = '{}'", self.one_of(TRACK_EVENTS)),
            4 => "event IN ('Order Completed', 'Added to Cart', 'Home')".into(),
            5 => format!(
                "event LIKE '{}'",
                self.one_of(&["Order%", "%Viewed", "S%d %", "_ome"])
            ),
            6 => format!("type {} 'page'", self.one_of(&["=", "<>"])),
            7 => "type IN ('page', 'screen', 'identify')".into(),
            8 => format!(
                "properties.revenue {} {}",
                self.cmp_op(),
                self.n(0, 40) * 25
            ),
            9 => format!("properties.revenue IS {}NULL", self.one_of(&["", "NOT "])),
            10 => format!(
                "properties.product_id {}IN ('p1', 'p2', 'p3')",
                self.one_of(&["", "NOT "])
            ),
            11 | 12 => {
                let op = self.one_of(&[">", ">=", "<", "<="]);
                format!("timestamp {op} now() - {}", self.window())
            }
            13 => {
                let (a, b) = (self.n(2, 200), self.n(0, 1));
                format!("timestamp BETWEEN now() - INTERVAL '{a} hours' AND now() - INTERVAL '{b} hours'")
            }
            14 => format!("timestamp + {} > now()", self.window()),
            15 => format!("traits.plan = '{}'", self.one_of(PLANS)),
            16 => "context.page.path LIKE '/p%'".into(),
            _ => format!(
                "coalesce(properties.revenue, 0) {} {}",
                self.cmp_op(),
                self.n(0, 20) * 50
            ),
        }
    }

    fn agg_atom(&mut self) -> String {
        let f = self.filter();
        match self.n(0, 16) {
            0 | 1 => format!("count(*){f} {} {}", self.cmp_op(), self.n(0, 4)),
            2 => format!("count(properties.product_id){f} >= {}", self.n(0, 3)),
            3 => format!(
                "count(DISTINCT properties.product_id){f} {} {}",
                self.cmp_op(),
                self.n(0, 3)
            ),
            4 => format!(
                "coalesce(sum(properties.revenue){f}, 0) {} {}",
                self.cmp_op(),
                self.n(0, 8) * 125
            ),
            5 => format!("sum(properties.revenue){f} IS NULL"),
            6 => {
                let lo = self.n(0, 20) * 25;
                format!(
                    "avg(properties.revenue){f} BETWEEN {lo} AND {}",
                    lo + self.n(1, 20) * 25
                )
            }
            7 => {
                let kind = self.one_of(&["min", "max"]);
                let op = self.one_of(&["<", ">", "<=", ">="]);
                format!("{kind}(timestamp){f} {op} now() - {}", self.window())
            }
            8 => {
                let kind = self.one_of(&["min", "max"]);
                format!("now() - {} > {kind}(timestamp){f}", self.window())
            }
            9 => {
                let (a, b) = (self.n(25, 200), self.n(1, 24));
                format!(
                    "last(timestamp){f} BETWEEN now() - INTERVAL '{a} hours' AND now() - INTERVAL '{b} hours'"
                )
            }
            10 => format!("first(event){f} = '{}'", self.one_of(TRACK_EVENTS)),
            11 => format!(
                "last(properties.revenue){f} IS {}NULL",
                self.one_of(&["", "NOT "])
            ),
            12 => {
                let kind = self.one_of(&["min", "max"]);
                format!(
                    "{kind}(properties.revenue){f} {} {}",
                    self.cmp_op(),
                    self.n(0, 40) * 25
                )
            }
            13 => format!(
                "max(properties.product_id){f} {} 'p{}'",
                self.cmp_op(),
                self.n(0, 7)
            ),
            14 => format!("count(*){f} * 2 - 1 > {}", self.n(0, 6)),
            15 => format!(
                "coalesce(sum(properties.revenue){f}, 0) / count(properties.revenue){f} > {}",
                self.n(0, 20) * 25
            ),
            _ => format!(
                "lower(last(event){f}) LIKE '%{}%'",
                self.one_of(&["order", "up", "view"])
            ),
        }
    }

    fn trait_atom(&mut self) -> String {
        match self.n(0, 17) {
            0 => format!(
                "plan {}IN ('pro', 'enterprise')",
                self.one_of(&["", "NOT "])
            ),
            1 => format!(
                "country {} '{}'",
                self.one_of(&["=", "<>"]),
                self.one_of(COUNTRIES)
            ),
            2 => format!(
                "age {}BETWEEN {} AND {}",
                self.one_of(&["", "NOT "]),
                self.n(16, 40),
                self.n(30, 70)
            ),
            3 => format!(
                "{} IS {}NULL",
                self.one_of(&["age", "plan", "traits.country", "signup_at"]),
                self.one_of(&["", "NOT "])
            ),
            4 => format!("coalesce(age, 0) + 5 {} {}", self.cmp_op(), self.n(20, 60)),
            5 => format!("age * 2 >= {}", self.n(30, 120)),
            6 => format!("lower(country) = '{}'", self.one_of(&["in", "us", "de"])),
            7 => format!(
                "upper(plan) LIKE '{}'",
                self.one_of(&["PR%", "%E%", "F_EE"])
            ),
            8 => format!("plan {}LIKE '%r%'", self.one_of(&["", "NOT "])),
            9 => {
                let op = self.one_of(&["<", ">"]);
                format!("signup_at {op} now() - {}", self.window())
            }
            10 => format!("is_employee = {}", self.one_of(&["TRUE", "FALSE"])),
            11 => format!("lifetime_value {} {}", self.cmp_op(), self.n(0, 20) * 100),
            12 => format!(
                "coalesce(lifetime_value, 0) - coalesce(sum(properties.revenue){}, 0) > {}",
                self.filter(),
                self.n(0, 10) * 100
            ),
            13 => format!("user_id LIKE '{}'", self.one_of(&["u1%", "anon-%", "%3"])),
            14 => format!(
                "hash_bucket(user_id, 'salt{}', {}) {} {}",
                self.n(0, 3),
                self.n(2, 5),
                self.one_of(&["=", "<"]),
                self.n(0, 2)
            ),
            15 => format!(
                "coalesce(plan, country, 'none') = '{}'",
                self.one_of(&["none", "pro", "IN"])
            ),
            16 => format!("age / {} > 20", self.n(0, 2)),
            _ => "\"plan\" IN ('free', NULL)".to_string(),
        }
    }
}
