//! Signed tracking links: the click link and the open pixel Herald puts in messages, and
//! their check when a recipient's client follows them.
//!
//! A link carries an HMAC-SHA256 (keyed with `[notify] tracking_secret`) of its kind, the
//! message id and the target, truncated to 128 bits and hex-encoded:
//!
//! ```text
//! {tracking_url}/v1/t/click/{message_id}?to={target, percent-encoded}&sig={hmac}
//! {tracking_url}/v1/t/open/{message_id}?sig={hmac}
//! ```
//!
//! so nobody without the secret can make Herald record an open or a click for a message,
//! or redirect through Herald to a target no message links to.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Where tracking links point and the key that signs them.
#[derive(Clone)]
pub struct Tracking {
    /// The public base URL of Herald's ingest listener.
    pub base: url::Url,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracking")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A tracked link's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A click, redirected to its target.
    Click,
    /// An email open (a 1×1 image).
    Open,
}

impl Kind {
    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Click => "click",
            Kind::Open => "open",
        }
    }

    /// From the path segment.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "click" => Some(Kind::Click),
            "open" => Some(Kind::Open),
            _ => None,
        }
    }
}

impl Tracking {
    /// From the public base URL (an http(s) URL) and the secret.
    pub fn new(base: &str, secret: &[u8]) -> Result<Tracking, String> {
        let base = url::Url::parse(base).map_err(|e| format!("'{base}' is not a URL: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(format!("'{base}' is not an http(s) URL"));
        }
        Ok(Tracking {
            base,
            secret: secret.to_vec(),
        })
    }

    /// The MAC of a link: kind, message id and target, each ended by a NUL.
    fn mac(&self, kind: Kind, message_id: &str, target: &str) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes a key of any length");
        for part in [kind.as_str(), message_id, target] {
            mac.update(part.as_bytes());
            mac.update(&[0]);
        }
        mac
    }

    fn sign(&self, kind: Kind, message_id: &str, target: &str) -> String {
        let mac = self.mac(kind, message_id, target);
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// `{base}/v1/t/{kind}/{message_id}` with the query pairs, each part encoded for
    /// where it goes (the id as a path segment, so the router decodes it back).
    fn link(&self, kind: Kind, message_id: &str, query: &[(&str, &str)]) -> String {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty()
                .extend(["v1", "t", kind.as_str(), message_id]);
        }
        url.query_pairs_mut().extend_pairs(query);
        url.to_string()
    }

    /// The click link of a message to `target`.
    pub fn click_url(&self, message_id: &str, target: &str) -> String {
        let sig = self.sign(Kind::Click, message_id, target);
        self.link(Kind::Click, message_id, &[("to", target), ("sig", &sig)])
    }

    /// The open pixel's URL of a message.
    pub fn open_url(&self, message_id: &str) -> String {
        let sig = self.sign(Kind::Open, message_id, "");
        self.link(Kind::Open, message_id, &[("sig", &sig)])
    }

    /// Whether `sig` is this Herald's signature of the link (in constant time).
    pub fn verify(&self, kind: Kind, message_id: &str, target: &str, sig: &str) -> bool {
        let Ok(given) = hex::decode(sig) else {
            return false;
        };
        given.len() == 16
            && self
                .mac(kind, message_id, target)
                .verify_truncated_left(&given)
                .is_ok()
    }
}

/// Puts the open pixel in an HTML email body: before `</body>` if it has one, else at the
/// end. Bodies that are not HTML (not starting with `<`) are returned unchanged.
pub fn with_open_pixel(body: &str, open_url: &str) -> Option<String> {
    if !is_html(body) {
        return None;
    }
    let src = open_url.replace('&', "&amp;");
    let pixel = format!(r#"<img src="{src}" width="1" height="1" alt="" style="display:none">"#);
    let lower = body.to_ascii_lowercase();
    Some(match lower.rfind("</body>") {
        Some(at) => format!("{}{pixel}{}", &body[..at], &body[at..]),
        None => format!("{body}{pixel}"),
    })
}

/// Whether an email body is HTML: it starts (after whitespace) with `<`.
pub fn is_html(body: &str) -> bool {
    body.trim_start().starts_with('<')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_verifies_and_a_changed_one_does_not() {
        let t = Tracking::new("https://h.example/", b"s3cret").unwrap();
        let url = t.click_url("m-1", "https://shop.example/cart?a=1&b=2");
        assert!(url.starts_with("https://h.example/v1/t/click/m-1?to=https%3A%2F%2Fshop"));
        // An id that needs encoding goes into the path as a segment.
        let odd = t.click_url("a b/c", "https://x.example/");
        assert!(
            odd.starts_with("https://h.example/v1/t/click/a%20b%2Fc?"),
            "{odd}"
        );
        let sig = url.rsplit_once("sig=").unwrap().1;
        assert!(t.verify(Kind::Click, "m-1", "https://shop.example/cart?a=1&b=2", sig));
        assert!(!t.verify(Kind::Click, "m-2", "https://shop.example/cart?a=1&b=2", sig));
        assert!(!t.verify(Kind::Click, "m-1", "https://evil.example/", sig));
        assert!(!t.verify(Kind::Open, "m-1", "", sig));
        assert!(!t.verify(
            Kind::Click,
            "m-1",
            "https://shop.example/cart?a=1&b=2",
            &sig[..20]
        ));
        let other = Tracking::new("https://h.example", b"other").unwrap();
        assert!(!other.verify(Kind::Click, "m-1", "https://shop.example/cart?a=1&b=2", sig));
        let open = t.open_url("m-1");
        let sig = open.rsplit_once("sig=").unwrap().1;
        assert!(t.verify(Kind::Open, "m-1", "", sig));
    }

    #[test]
    fn the_pixel_goes_before_the_body_end_of_html_only() {
        let html = "<html><body><p>Hi</p></BODY></html>";
        let out = with_open_pixel(html, "https://h/v1/t/open/m?sig=a&x=1").unwrap();
        assert!(
            out.ends_with(r#"style="display:none"></BODY></html>"#),
            "{out}"
        );
        assert!(out.contains("sig=a&amp;x=1"));
        assert_eq!(with_open_pixel("Hi there", "u"), None);
        assert_eq!(
            with_open_pixel("<p>Hi</p>", "u").unwrap(),
            r#"<p>Hi</p><img src="u" width="1" height="1" alt="" style="display:none">"#
        );
    }
}
