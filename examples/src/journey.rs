//! Simulating users: who they are, and the compact event records of their journeys.
//!
//! Owns [`simulate`]: users (id, anonymous id, signup instant, country, plan, email,
//! employee flag, activity level) and one [`Rec`] per valid event, sorted by a jittered
//! key so that the file is only roughly in time order. Records are small (no strings)
//! so that millions of them fit in memory; `write` turns them into JSON.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Config;

const SECOND: i64 = 1000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// Countries (ISO codes) users come from, with weights.
pub(crate) const COUNTRIES: &[(&str, u32)] = &[
    ("US", 35),
    ("IN", 25),
    ("GB", 10),
    ("DE", 10),
    ("BR", 10),
    ("FR", 10),
];
/// Plans; index 0 is where everyone starts.
pub(crate) const PLANS: &[&str] = &["free", "starter", "pro", "enterprise"];
/// Page paths and names.
pub(crate) const PAGES: &[(&str, &str)] = &[
    ("/", "Home"),
    ("/pricing", "Pricing"),
    ("/products", "Products"),
    ("/blog", "Blog"),
    ("/docs", "Docs"),
];
/// Product categories.
pub(crate) const CATEGORIES: &[&str] = &["shoes", "bags", "shirts", "hats", "watches"];
/// Currencies of orders (mostly USD).
pub(crate) const CURRENCIES: &[&str] = &["USD", "USD", "USD", "USD", "EUR", "INR"];
/// Number of products in the catalogue.
pub(crate) const PRODUCTS: u16 = 400;

/// The price of a product in cents: deterministic, 5.00 to 400.00.
pub(crate) fn price_cents(product: u16) -> u32 {
    let h = (u32::from(product)).wrapping_mul(2_654_435_761) >> 8;
    500 + h % 39_500
}

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A page view before signup, `anonymousId` only. `aux` = page index.
    AnonPage,
    /// A product view before signup, `anonymousId` only.
    AnonProduct,
    /// `Signed Up`.
    SignedUp,
    /// The signup `identify` (email, plan, country, signup_at).
    IdentifySignup,
    /// A later `identify` changing the plan. `aux` = plan index.
    IdentifyPlan,
    /// A page view. `aux` = page index.
    Page,
    /// `Product Viewed`.
    ProductViewed,
    /// `Product Added` (add to cart). `aux` = quantity.
    ProductAdded,
    /// `Checkout Started`. `cents` = cart value.
    CheckoutStarted,
    /// `Order Completed`. `cents` = revenue, `aux` = currency index (high bit: revenue
    /// sent as a string, as a buggy SDK would).
    OrderCompleted,
    /// `Source Created`.
    SourceCreated,
}

/// One valid event, without strings.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rec {
    /// File order key: `ts` plus jitter.
    pub(crate) key: i64,
    /// The event's instant (ms).
    pub(crate) ts: i64,
    /// Index into [`World::users`].
    pub(crate) user: u32,
    /// Sequence number (unique; the message id derives from it).
    pub(crate) seq: u32,
    pub(crate) kind: Kind,
    pub(crate) product: u16,
    pub(crate) aux: u8,
    pub(crate) cents: u32,
}

/// A simulated user.
#[derive(Clone, Debug)]
pub(crate) struct User {
    /// Signup instant (ms).
    pub(crate) signup: i64,
    /// Index into [`COUNTRIES`].
    pub(crate) country: u8,
    /// Plan index at signup.
    pub(crate) plan: u8,
    /// A later plan and when it was set, if the user changes plan.
    pub(crate) upgrade: Option<(i64, u8)>,
    /// Staff account.
    pub(crate) employee: bool,
    /// Email domain index: 0 example.com, 1 gmail.com, 2 herald.dev (staff).
    pub(crate) email_domain: u8,
    /// Revenue of orders at or before the snapshot instant, in cents.
    pub(crate) revenue_to_snapshot: u64,
}

impl User {
    /// The plan at instant `t`.
    pub(crate) fn plan_at(&self, t: i64) -> u8 {
        match self.upgrade {
            Some((at, p)) if at <= t => p,
            _ => self.plan,
        }
    }
}

/// The simulated world: users and their events in (rough) file order.
pub(crate) struct World {
    pub(crate) users: Vec<User>,
    pub(crate) recs: Vec<Rec>,
    pub(crate) snapshot_at: i64,
    pub(crate) end_ms: i64,
}

/// The user id of user `i`.
pub(crate) fn user_id(i: u32) -> String {
    format!("user-{i:07}")
}

/// The anonymous id of user `i` (a stable pseudo-random hex string).
pub(crate) fn anonymous_id(seed: u64, i: u32) -> String {
    format!("anon-{:016x}", mix(seed ^ 0xA11CE, u64::from(i)))
}

/// SplitMix64 of `seed` and `n`: stable pseudo-random ids.
pub(crate) fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed
        .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn weighted(rng: &mut ChaCha8Rng, items: &[(&str, u32)]) -> u8 {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut x = rng.random_range(0..total.max(1));
    for (i, (_, w)) in items.iter().enumerate() {
        if x < *w {
            return i as u8;
        }
        x -= w;
    }
    0
}

/// Simulates every user's journey. Deterministic for a given config.
pub(crate) fn simulate(cfg: &Config) -> World {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let start = cfg.start_ms;
    let span = ((cfg.days * DAY as f64) as i64).max(HOUR);
    let end = start + span;
    let snapshot_at = start + span / 2;
    let n = cfg.users;

    // Activity weights: log-normal, so a few users are very busy.
    let weights: Vec<f64> = (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random_range(1e-9..1.0), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (z * 0.9).exp()
        })
        .collect();
    let total: f64 = weights.iter().sum();
    let mut quotas: Vec<usize> = weights
        .iter()
        .map(|w| ((cfg.events as f64) * w / total).floor() as usize)
        .collect();
    let assigned: usize = quotas.iter().sum();
    for k in 0..cfg.events.saturating_sub(assigned) {
        quotas[k % n] += 1;
    }

    let mut users = Vec::with_capacity(n);
    let mut recs: Vec<Rec> = Vec::with_capacity(cfg.events);
    for (i, quota) in quotas.into_iter().enumerate() {
        // Signups are front-loaded: most users exist by the middle of the window.
        let u: f64 = rng.random();
        let signup = start + ((0.8 * u * u) * span as f64) as i64;
        let employee = rng.random_bool(0.02);
        let plan = if rng.random_bool(0.85) { 0 } else { 1 };
        let upgrade = rng.random_bool(0.15).then(|| {
            let at = signup + rng.random_range(HOUR..=(end - signup).max(HOUR + 1));
            (at, rng.random_range(1..PLANS.len() as u8))
        });
        let mut user = User {
            signup,
            country: weighted(&mut rng, COUNTRIES),
            plan,
            upgrade,
            employee,
            email_domain: if employee { 2 } else { rng.random_range(0..2) },
            revenue_to_snapshot: 0,
        };
        let mut j = Journey {
            rng: &mut rng,
            recs: &mut recs,
            user: i as u32,
            left: quota,
            end,
        };
        j.run(&mut user, snapshot_at);
        users.push(user);
    }
    // Rough time order: each line is late by up to 5 minutes, a few by up to 3 hours.
    for r in recs.iter_mut() {
        let late = if rng.random_bool(0.005) {
            rng.random_range(0..3 * HOUR)
        } else {
            rng.random_range(0..5 * MINUTE)
        };
        r.key = r.ts + late;
    }
    recs.sort_by_key(|r| (r.key, r.seq));
    World {
        users,
        recs,
        snapshot_at,
        end_ms: end,
    }
}

/// One user's journey, spending a quota of events.
struct Journey<'a> {
    rng: &'a mut ChaCha8Rng,
    recs: &'a mut Vec<Rec>,
    user: u32,
    left: usize,
    end: i64,
}

impl Journey<'_> {
    fn emit(&mut self, ts: i64, kind: Kind, product: u16, aux: u8, cents: u32) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        let seq = self.recs.len() as u32;
        self.recs.push(Rec {
            key: 0,
            // Anonymous browsing may start a little before the window; nothing ends after it.
            ts: ts.min(self.end),
            user: self.user,
            seq,
            kind,
            product,
            aux,
            cents,
        });
        true
    }

    fn product(&mut self) -> u16 {
        // Popular products are viewed more: squash towards low ids.
        let u: f64 = self.rng.random();
        ((u * u) * f64::from(PRODUCTS)) as u16 % PRODUCTS
    }

    fn run(&mut self, user: &mut User, snapshot_at: i64) {
        let signup = user.signup;
        // Anonymous browsing shortly before signing up.
        if self.left >= 4 {
            let k = self.rng.random_range(1..=3).min(self.left - 3);
            let mut t = signup - self.rng.random_range(10 * MINUTE..3 * HOUR);
            for _ in 0..k {
                if self.rng.random_bool(0.5) {
                    let page = self.rng.random_range(0..PAGES.len()) as u8;
                    self.emit(t, Kind::AnonPage, 0, page, 0);
                } else {
                    let p = self.product();
                    self.emit(t, Kind::AnonProduct, p, 0, price_cents(p));
                }
                t += self.rng.random_range(10 * SECOND..5 * MINUTE);
            }
        }
        self.emit(signup, Kind::SignedUp, 0, 0, 0);
        self.emit(signup + SECOND, Kind::IdentifySignup, 0, 0, 0);
        if self.rng.random_bool(0.6) {
            let at = signup + self.rng.random_range(HOUR..6 * DAY);
            if at <= self.end {
                self.emit(at, Kind::SourceCreated, 0, 0, 0);
            }
        }
        if let Some((at, plan)) = user.upgrade {
            if at <= self.end {
                self.emit(at, Kind::IdentifyPlan, 0, plan, 0);
            }
        }
        // Buyers convert carts more often than browsers.
        let buyer = self.rng.random_range(0.2..0.9);
        while self.left > 0 {
            let latest = (self.end - HOUR).max(signup + MINUTE);
            let t0 = self.rng.random_range(signup + MINUTE..=latest);
            self.session(user, t0, buyer, snapshot_at);
        }
    }

    fn session(&mut self, user: &mut User, mut t: i64, buyer: f64, snapshot_at: i64) {
        let len = self.rng.random_range(2..14usize);
        let page = self.rng.random_range(0..PAGES.len()) as u8;
        self.emit(t, Kind::Page, 0, page, 0);
        let mut cart: u32 = 0;
        for _ in 1..len {
            t += self.rng.random_range(5 * SECOND..3 * MINUTE);
            let roll: f64 = self.rng.random();
            if cart > 0 && roll < 0.3 {
                if !self.emit(t, Kind::CheckoutStarted, 0, 0, cart) {
                    return;
                }
                if self.rng.random_bool(buyer) {
                    t += self.rng.random_range(30 * SECOND..5 * MINUTE);
                    let mut currency = self.rng.random_range(0..CURRENCIES.len()) as u8;
                    if self.rng.random_bool(0.005) {
                        currency |= 0x80;
                    }
                    if !self.emit(t, Kind::OrderCompleted, 0, currency, cart) {
                        return;
                    }
                    if t <= snapshot_at {
                        user.revenue_to_snapshot += u64::from(cart);
                    }
                }
                cart = 0;
            } else if roll < 0.75 {
                let p = self.product();
                if !self.emit(t, Kind::ProductViewed, p, 0, price_cents(p)) {
                    return;
                }
                if self.rng.random_bool(0.35) {
                    t += self.rng.random_range(5 * SECOND..MINUTE);
                    let qty = self.rng.random_range(1..=2u8);
                    if !self.emit(t, Kind::ProductAdded, p, qty, price_cents(p)) {
                        return;
                    }
                    cart += price_cents(p) * u32::from(qty);
                }
            } else {
                let page = self.rng.random_range(0..PAGES.len()) as u8;
                if !self.emit(t, Kind::Page, 0, page, 0) {
                    return;
                }
            }
        }
    }
}
