//! Message ids as state keeps them: a canonical UUID in 16 bytes, anything else as text.
//!
//! Owns [`MsgId`]. The state keeps a message id only to break ties between writes at one
//! millisecond, where the spec orders by `messageId` as text. Most SDKs send lowercase
//! canonical UUIDs (`8-4-4-4-12` hex digits), whose text order is the order of their 16
//! bytes (the hyphens sit at the same places, and `0-9` sort before `a-f` as nibbles do),
//! so those are kept as bytes and compared as bytes; any other id is kept as its text, and
//! a comparison that mixes the two forms compares texts.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// A message id; see the module docs. Its order is the order of the ids as text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MsgId {
    /// A lowercase canonical UUID, as its 16 bytes.
    Uuid([u8; 16]),
    /// Any other id, as written.
    Text(Box<str>),
}

const HYPHENS: [usize; 4] = [8, 13, 18, 23];

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || HYPHENS.iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let mut out = [0u8; 16];
    let mut digits = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !HYPHENS.contains(i))
        .map(|(_, &c)| c);
    for byte in &mut out {
        let hi = nibble(digits.next()?)?;
        let lo = nibble(digits.next()?)?;
        *byte = hi << 4 | lo;
    }
    Some(out)
}

impl MsgId {
    /// The id of `s`.
    pub fn new(s: &str) -> MsgId {
        match parse_uuid(s) {
            Some(u) => MsgId::Uuid(u),
            None => MsgId::Text(s.into()),
        }
    }

    /// The id as text.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            MsgId::Text(t) => std::borrow::Cow::Borrowed(t),
            MsgId::Uuid(u) => {
                let mut s = String::with_capacity(36);
                for (i, byte) in u.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        s.push('-');
                    }
                    s.push_str(&format!("{byte:02x}"));
                }
                std::borrow::Cow::Owned(s)
            }
        }
    }

    /// Compares with an id given as text, in text order.
    pub fn cmp_text(&self, other: &str) -> Ordering {
        match (self, parse_uuid(other)) {
            (MsgId::Uuid(a), Some(b)) => a.cmp(&b),
            _ => (*self.text()).cmp(other),
        }
    }

    /// Bytes on the heap (a text id's).
    pub fn heap_bytes(&self) -> usize {
        match self {
            MsgId::Uuid(_) => 0,
            MsgId::Text(t) => t.len(),
        }
    }
}

impl Ord for MsgId {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (MsgId::Uuid(a), MsgId::Uuid(b)) => a.cmp(b),
            _ => self.text().cmp(&other.text()),
        }
    }
}

impl PartialOrd for MsgId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: &[&str] = &[
        "4d399571-3c10-4a63-9b27-f6dc08c28e0f",
        "4d399571-3c10-4a63-9b27-f6dc08c28e10",
        "716cf755-a8fb-4bdf-8d20-f0698a80555a",
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "716CF755-A8FB-4BDF-8D20-F0698A80555A",
        "716cf755a8fb4bdf8d20f0698a80555a",
        "716cf755-a8fb-4bdf-8d20-f0698a80555",
        "716cf755-a8fb-4bdf-8d20-f0698a80555a0",
        "716cf755-a8fb-4bdf-8d20-f0698a80555g",
        "m1",
        "",
        "gen-00ab12cd34ef5678",
        "716cf755-",
        "8",
        "716cf755-a8fb-4bdf-8d20_f0698a80555a",
    ];

    #[test]
    fn order_is_text_order_whatever_the_form() {
        for a in IDS {
            let ia = MsgId::new(a);
            assert_eq!(ia.text(), *a, "{a} round-trips");
            for b in IDS {
                let ib = MsgId::new(b);
                assert_eq!(ia.cmp(&ib), a.cmp(b), "{a} vs {b}");
                assert_eq!(ia.cmp_text(b), a.cmp(b), "{a} vs text {b}");
            }
        }
        assert!(matches!(MsgId::new(IDS[0]), MsgId::Uuid(_)));
        assert!(
            matches!(MsgId::new(IDS[5]), MsgId::Text(_)),
            "uppercase stays text"
        );
    }
}
