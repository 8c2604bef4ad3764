//! Jekyll-style front matter: the `---` lines at the top of a template file that set its
//! subject. A few lines of `key: value` do not need a YAML parser; only `subject` and
//! `link` (the target of `{{ message.click_url }}`) are allowed, and a value may be quoted
//! as in YAML (`"…"` with `\"` and `\\`, `'…'` with `''`) or bare.

use super::TemplateError;

/// A template's text split at its front matter.
pub(super) struct Source {
    /// The subject and its line in the file.
    pub subject: Option<(String, usize)>,
    /// The click link's target and its line in the file.
    pub link: Option<(String, usize)>,
    /// The text after the front matter.
    pub body: String,
    /// The line in the file where the body starts.
    pub body_line: usize,
}

/// Splits off the front matter: `---`, `key: value` lines (blank and `#` lines
/// skipped), `---`.
pub(super) fn split(file: &str, text: &str) -> Result<Source, TemplateError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // The file's last line ending is not part of the body: editors add it.
    let text = text
        .strip_suffix('\n')
        .map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
    let mut lines = text.split_inclusive('\n');
    if lines.next().map(str::trim_end) != Some("---") {
        let (subject, body, body_line) = (None, text.to_string(), 1);
        return Ok(Source {
            subject,
            link: None,
            body,
            body_line,
        });
    }
    let err = |line: usize, detail: String| TemplateError::FrontMatter {
        file: file.to_string(),
        line,
        detail,
    };
    let mut subject = None;
    let mut link = None;
    let mut offset = text.find('\n').map_or(text.len(), |n| n + 1);
    for (i, raw) in lines.enumerate() {
        let line = i + 2;
        offset += raw.len();
        let l = raw.trim();
        if l == "---" {
            let body = text[offset..].to_string();
            return Ok(Source {
                subject,
                link,
                body,
                body_line: line + 1,
            });
        }
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let Some((key, value)) = l.split_once(':') else {
            return Err(err(line, format!("expected 'subject: …', found '{l}'")));
        };
        let key = key.trim();
        let slot = match key {
            "subject" => &mut subject,
            "link" => &mut link,
            _ => {
                return Err(err(
                    line,
                    format!("unknown key '{key}' (only 'subject' and 'link' are allowed)"),
                ))
            }
        };
        if slot.is_some() {
            return Err(err(line, format!("'{key}' is given twice")));
        }
        let value = unquote(value.trim()).map_err(|d| err(line, d))?;
        if value.trim().is_empty() {
            return Err(err(line, format!("'{key}' is empty")));
        }
        *slot = Some((value, line));
    }
    Err(err(1, "no closing '---' line".into()))
}

/// A front matter value without its quotes: YAML's `"…"` (with `\"` and `\\`), `'…'`
/// (with `''`), or bare.
fn unquote(v: &str) -> Result<String, String> {
    let Some(q) = v.chars().next().filter(|c| *c == '"' || *c == '\'') else {
        return Ok(v.to_string());
    };
    let mut out = String::new();
    let mut chars = v[1..].chars();
    while let Some(c) = chars.next() {
        match (q, c) {
            ('"', '\\') => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                Some(e) => out.extend(['\\', e]),
                None => break,
            },
            ('\'', '\'') if chars.as_str().starts_with('\'') => {
                out.push('\'');
                chars.next();
            }
            _ if c == q => {
                let rest = chars.as_str().trim();
                if rest.is_empty() || rest.starts_with('#') {
                    return Ok(out);
                }
                return Err(format!("text after the closing quote: '{rest}'"));
            }
            _ => out.push(c),
        }
    }
    Err(format!("no closing {q}"))
}
