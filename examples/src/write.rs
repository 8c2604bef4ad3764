//! Writing the simulated world: `events.jsonl` (with bad lines and redeliveries mixed
//! in), `profiles.parquet` (Arrow + `ArrowWriter`) and `beta.csv`.
//!
//! JSON is formatted by hand into a reused buffer: every string written is generated
//! here from fixed alphabets (no escaping needed), and this is the hot loop of a
//! million-event run.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::journey::{
    anonymous_id, mix, user_id, Kind, Rec, User, World, CATEGORIES, COUNTRIES, CURRENCIES, PAGES,
    PLANS,
};
use crate::{rfc3339_ms, Config, Summary};

const EMAIL_DOMAINS: &[&str] = &["example.com", "gmail.com", "herald.dev"];

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("cannot write {}: {e}", path.display())
}

/// Writes `events.jsonl` and fills the line counts of `summary`.
pub(crate) fn events_jsonl(
    cfg: &Config,
    world: &World,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let path = summary.events_path.clone();
    let file = File::create(&path).map_err(io_err(&path))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x005E_ED0F_11E5);
    let mut line = Vec::with_capacity(1024);
    // A redelivery waiting to be written again, and after how many more lines.
    let mut pending: Option<(Vec<u8>, u32)> = None;
    for rec in &world.recs {
        line.clear();
        event_json(cfg.seed, world, rec, &mut rng, &mut line);
        line.push(b'\n');
        out.write_all(&line).map_err(io_err(&path))?;
        summary.events += 1;
        summary.lines += 1;
        match pending.take() {
            Some((bytes, 0)) => {
                out.write_all(&bytes).map_err(io_err(&path))?;
                summary.duplicates += 1;
                summary.lines += 1;
            }
            Some((bytes, n)) => pending = Some((bytes, n - 1)),
            None if rng.random_bool(0.003) => {
                pending = Some((line.clone(), rng.random_range(0..200)));
            }
            None => {}
        }
        if rng.random_bool(0.002) {
            bad_line(cfg.seed, rec, &line, &mut rng, &mut out).map_err(io_err(&path))?;
            summary.malformed += 1;
            summary.lines += 1;
        }
    }
    if let Some((bytes, _)) = pending {
        out.write_all(&bytes).map_err(io_err(&path))?;
        summary.duplicates += 1;
        summary.lines += 1;
    }
    out.flush().map_err(io_err(&path))?;
    Ok(())
}

fn message_id(seed: u64, seq: u64, out: &mut Vec<u8>) {
    let a = mix(seed, seq);
    let b = mix(seed ^ 0xD1CE, seq);
    let _ = write!(
        out,
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    );
}

fn money(cents: u32, out: &mut Vec<u8>) {
    let _ = write!(out, "{}.{:02}", cents / 100, cents % 100);
}

/// One valid Segment message for `rec`, without the newline.
fn event_json(seed: u64, world: &World, rec: &Rec, rng: &mut ChaCha8Rng, out: &mut Vec<u8>) {
    let user = &world.users[rec.user as usize];
    let anonymous = matches!(rec.kind, Kind::AnonPage | Kind::AnonProduct);
    let kind = match rec.kind {
        Kind::AnonPage | Kind::Page => "page",
        Kind::IdentifySignup | Kind::IdentifyPlan => "identify",
        _ => "track",
    };
    let _ = write!(out, "{{\"type\":\"{kind}\",\"messageId\":\"");
    message_id(seed, u64::from(rec.seq), out);
    out.extend_from_slice(b"\",");
    if !anonymous {
        let _ = write!(out, "\"userId\":\"{}\",", user_id(rec.user));
    }
    let _ = write!(out, "\"anonymousId\":\"{}\",", anonymous_id(seed, rec.user));
    let name = match rec.kind {
        Kind::SignedUp => Some("Signed Up"),
        Kind::ProductViewed | Kind::AnonProduct => Some("Product Viewed"),
        Kind::ProductAdded => Some("Product Added"),
        Kind::CheckoutStarted => Some("Checkout Started"),
        Kind::OrderCompleted => Some("Order Completed"),
        Kind::SourceCreated => Some("Source Created"),
        _ => None,
    };
    if let Some(name) = name {
        let _ = write!(out, "\"event\":\"{name}\",");
    }
    let page = PAGES[usize::from(rec.aux) % PAGES.len()];
    if matches!(rec.kind, Kind::Page | Kind::AnonPage) {
        let _ = write!(out, "\"name\":\"{}\",", page.1);
    }
    match rec.kind {
        Kind::AnonPage | Kind::Page => {
            let _ = write!(
                out,
                "\"properties\":{{\"path\":\"{0}\",\"url\":\"https://shop.example.com{0}\"}},",
                page.0
            );
        }
        Kind::AnonProduct | Kind::ProductViewed | Kind::ProductAdded => {
            let _ = write!(
                out,
                "\"properties\":{{\"product_id\":\"sku-{:04}\",\"category\":\"{}\",\"price\":",
                rec.product,
                CATEGORIES[usize::from(rec.product) % CATEGORIES.len()]
            );
            money(rec.cents, out);
            if rec.kind == Kind::ProductAdded {
                let _ = write!(out, ",\"quantity\":{}", rec.aux);
            }
            out.extend_from_slice(b"},");
        }
        Kind::CheckoutStarted => {
            out.extend_from_slice(b"\"properties\":{\"value\":");
            money(rec.cents, out);
            out.extend_from_slice(b"},");
        }
        Kind::OrderCompleted => {
            out.extend_from_slice(b"\"properties\":{\"order_id\":\"o-");
            let _ = write!(out, "{}", rec.seq);
            out.extend_from_slice(b"\",\"revenue\":");
            // A buggy SDK now and then sends the revenue as a string.
            let as_string = rec.aux & 0x80 != 0;
            if as_string {
                out.push(b'"');
            }
            money(rec.cents, out);
            if as_string {
                out.push(b'"');
            }
            let currency = CURRENCIES[usize::from(rec.aux & 0x7f) % CURRENCIES.len()];
            let _ = write!(out, ",\"currency\":\"{currency}\"}},");
        }
        Kind::SignedUp => {
            let _ = write!(
                out,
                "\"properties\":{{\"method\":\"{}\"}},",
                if rec.seq.is_multiple_of(3) {
                    "google"
                } else {
                    "email"
                }
            );
        }
        Kind::IdentifySignup => {
            let _ = write!(
                out,
                "\"traits\":{{\"email\":\"{}@{}\",\"plan\":\"{}\",\"country\":\"{}\",\"signup_at\":\"",
                user_id(rec.user),
                EMAIL_DOMAINS[usize::from(user.email_domain) % EMAIL_DOMAINS.len()],
                PLANS[usize::from(user.plan) % PLANS.len()],
                COUNTRIES[usize::from(user.country) % COUNTRIES.len()].0
            );
            rfc3339_ms(user.signup, out);
            out.extend_from_slice(b"\"},");
        }
        Kind::IdentifyPlan => {
            let _ = write!(
                out,
                "\"traits\":{{\"plan\":\"{}\"}},",
                PLANS[usize::from(rec.aux) % PLANS.len()]
            );
        }
        Kind::SourceCreated => {
            let _ = write!(
                out,
                "\"properties\":{{\"source_type\":\"{}\"}},",
                ["javascript", "ios", "android", "http"][rec.seq as usize % 4]
            );
        }
    }
    let library = if rec.user.is_multiple_of(4) {
        "analytics-ios"
    } else {
        "analytics.js"
    };
    let _ = write!(
        out,
        "\"context\":{{\"library\":{{\"name\":\"{library}\"}}}},"
    );
    if rng.random_bool(0.01) {
        // No `timestamp`: the device clock and the spec's clock-skew correction give
        // the same instant back.
        let skew = rng.random_range(-90_000..90_000i64);
        out.extend_from_slice(b"\"originalTimestamp\":\"");
        rfc3339_ms(rec.ts + skew, out);
        out.extend_from_slice(b"\",\"sentAt\":\"");
        rfc3339_ms(rec.ts + skew + 1_000, out);
        out.extend_from_slice(b"\",\"receivedAt\":\"");
        rfc3339_ms(rec.ts + 1_000, out);
        out.extend_from_slice(b"\"}");
    } else {
        out.extend_from_slice(b"\"timestamp\":\"");
        rfc3339_ms(rec.ts, out);
        out.extend_from_slice(b"\"}");
    }
}

/// Writes one bad line near `rec`: cut-off JSON, a message with no user id, or a track
/// without `event`.
fn bad_line(
    seed: u64,
    rec: &Rec,
    good: &[u8],
    rng: &mut ChaCha8Rng,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    match rng.random_range(0..3) {
        0 => {
            let cut = good.len().saturating_sub(1) / 2;
            buf.extend_from_slice(&good[..cut]);
        }
        1 => {
            buf.extend_from_slice(
                b"{\"type\":\"track\",\"event\":\"Product Viewed\",\"messageId\":\"",
            );
            message_id(seed ^ 0xBAD, u64::from(rec.seq), &mut buf);
            buf.extend_from_slice(b"\",\"timestamp\":\"");
            rfc3339_ms(rec.ts, &mut buf);
            buf.extend_from_slice(b"\"}");
        }
        _ => {
            let _ = write!(
                buf,
                "{{\"type\":\"track\",\"userId\":\"{}\",\"messageId\":\"",
                user_id(rec.user)
            );
            message_id(seed ^ 0xBAD, u64::from(rec.seq), &mut buf);
            buf.extend_from_slice(b"\",\"properties\":{\"revenue\":10},\"timestamp\":\"");
            rfc3339_ms(rec.ts, &mut buf);
            buf.extend_from_slice(b"\"}");
        }
    }
    buf.push(b'\n');
    out.write_all(&buf)
}

/// Writes `profiles.parquet`: about 95% of the users signed up by the snapshot instant.
/// Returns the number of rows.
pub(crate) fn profiles_parquet(cfg: &Config, world: &World, path: &Path) -> anyhow::Result<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x9A_C0E7);
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Utf8, false),
        Field::new("plan", DataType::Utf8, true),
        Field::new("country", DataType::Utf8, true),
        Field::new("lifetime_value", DataType::Float64, true),
        Field::new(
            "signup_at",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("is_employee", DataType::Boolean, true),
    ]));
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = File::create(path).map_err(io_err(path))?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
        .with_context(|| format!("cannot write {}", path.display()))?;
    let mut rows = 0u64;
    for chunk in world.users.chunks(64 * 1024).enumerate() {
        let (c, users) = chunk;
        let mut ids = StringBuilder::new();
        let mut plans = StringBuilder::new();
        let mut countries = StringBuilder::new();
        let mut ltv = Float64Builder::new();
        let mut signup = TimestampMillisecondBuilder::new().with_timezone("UTC");
        let mut staff = BooleanBuilder::new();
        for (k, user) in users.iter().enumerate() {
            let i = (c * 64 * 1024 + k) as u32;
            if user.signup > world.snapshot_at || !rng.random_bool(0.95) {
                continue;
            }
            ids.append_value(user_id(i));
            plans.append_value(PLANS[usize::from(user.plan_at(world.snapshot_at)) % PLANS.len()]);
            if rng.random_bool(0.03) {
                countries.append_null();
            } else {
                countries.append_value(COUNTRIES[usize::from(user.country) % COUNTRIES.len()].0);
            }
            ltv.append_value(profile_ltv(user, &mut rng));
            signup.append_value(user.signup);
            staff.append_value(user.employee);
            rows += 1;
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(ids.finish()),
            Arc::new(plans.finish()),
            Arc::new(countries.finish()),
            Arc::new(ltv.finish()),
            Arc::new(signup.finish()),
            Arc::new(staff.finish()),
        ];
        let batch =
            RecordBatch::try_new(schema.clone(), columns).context("building the profiles batch")?;
        writer
            .write(&batch)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    writer
        .close()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(rows)
}

/// Lifetime value in the CRM: orders seen up to the snapshot, plus purchases made
/// before the event window for some users (in currency units, cents precision).
fn profile_ltv(user: &User, rng: &mut ChaCha8Rng) -> f64 {
    let prior = if rng.random_bool(0.3) {
        rng.random_range(0..200_000u64)
    } else {
        0
    };
    (user.revenue_to_snapshot + prior) as f64 / 100.0
}

/// Writes `beta.csv` (`user_id,email`): about 5% of the users plus a few ids that never
/// send an event. Returns the number of ids.
pub(crate) fn beta_csv(cfg: &Config, world: &World, path: &Path) -> anyhow::Result<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xBE7A);
    let file = File::create(path).map_err(io_err(path))?;
    let mut out = BufWriter::new(file);
    let mut n = 0u64;
    writeln!(out, "user_id,email").map_err(io_err(path))?;
    for (i, user) in world.users.iter().enumerate() {
        if rng.random_bool(0.05) || (user.employee && rng.random_bool(0.5)) {
            let id = user_id(i as u32);
            let domain = EMAIL_DOMAINS[usize::from(user.email_domain) % EMAIL_DOMAINS.len()];
            writeln!(out, "{id},{id}@{domain}").map_err(io_err(path))?;
            n += 1;
        }
    }
    for k in 0..3 {
        writeln!(out, "beta-invite-{k},invitee{k}@example.com").map_err(io_err(path))?;
        n += 1;
    }
    out.flush().map_err(io_err(path))?;
    Ok(n)
}
