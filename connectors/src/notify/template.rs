//! Message templates: the subject and body of a journey's message, written in Liquid (the
//! language Braze, Customer.io, Shopify and Jekyll users write), checked when loaded and
//! rendered per message action.
//!
//! Owns [`Templates`]: loading a templates directory (`NAME.liquid` files, the name being
//! the file stem, `[A-Za-z0-9_-]+`; other files and hidden files are ignored), the
//! Jekyll-style front matter that sets the subject (`front_matter`),
//!
//! ```text
//! ---
//! subject: "{{ traits.first_name | default: 'Hi' }}, your cart is waiting"
//! ---
//! Body text with {{ event.properties.total }} …
//! ```
//!
//! the checks at load, and rendering. Checks: Liquid syntax (liquid-rust's parser, its
//! message made one line and placed on the offending line), and variables (`scan`): a
//! template sees only `user.id`, `traits.*`, `event.*`,
//! `journey.{name,variant,step,instance}`, `message.{id,channel,template}` and the names
//! it binds itself. Every error names the file and, where there is one, the line in the
//! file. Rendering has Shopify's leniency (`data`): a key missing beneath `traits` or
//! `event`, at any depth and through loop and `assign` variables, renders as nothing
//! instead of failing, so `{{ traits.first_name | default: "there" }}` works.
//!
//! Not here: which journey step uses which template and whether email templates have a
//! subject (the engine's check), channels, addresses and delivery (`super::channel`,
//! `super::delivery`). No partials: `{% include %}` and `{% render %}` are rejected at
//! load.

mod data;
mod front_matter;
mod scan;

use std::collections::BTreeMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use herald_operators::journey::MessageAction;

use scan::Seg;

/// The root variables a template may read.
const ROOTS: [&str; 5] = ["user", "traits", "event", "journey", "message"];

/// The fields of the roots whose shape is fixed.
fn fields(root: &str) -> Option<&'static [&'static str]> {
    match root {
        "user" => Some(&["id"]),
        "journey" => Some(&["name", "variant", "step", "instance"]),
        "message" => Some(&["id", "channel", "template", "click_url", "open_url"]),
        _ => None,
    }
}

/// What is wrong with a template, or with rendering one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The templates directory or a template file cannot be read.
    #[error("{path}: cannot read: {detail}")]
    Read {
        /// The directory or file.
        path: String,
        /// The I/O error.
        detail: String,
    },
    /// A file stem that is not a template name.
    #[error("{file}: bad template name '{name}' (a name is letters, digits, '_' and '-')")]
    BadName {
        /// The file.
        file: String,
        /// The file stem.
        name: String,
    },
    /// Two sources with the same name (only [`Templates::from_sources`] can have them).
    #[error("{file}: defined twice")]
    Duplicate {
        /// The file.
        file: String,
    },
    /// Front matter that is not `subject: …` lines between `---` lines.
    #[error("{file}:{line}: front matter: {detail}")]
    FrontMatter {
        /// The file.
        file: String,
        /// Line in the file.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// Liquid that does not parse (liquid's message, on one line), or a tag Herald does
    /// not support.
    #[error("{file}:{line}: {detail}")]
    Syntax {
        /// The file.
        file: String,
        /// Line in the file.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// A variable the template cannot see.
    #[error("{file}:{line}: unknown variable '{name}' ({hint})")]
    UnknownVariable {
        /// The file.
        file: String,
        /// Line in the file.
        line: usize,
        /// The variable (`trait`, `user.idd`).
        name: String,
        /// What there is instead.
        hint: String,
    },
    /// A message action names a template that is not loaded.
    #[error("unknown template '{name}' (no {name}.liquid is loaded)")]
    UnknownTemplate {
        /// The template name.
        name: String,
    },
    /// Liquid failed while rendering (a filter given the wrong type, a missing key
    /// reached through a computed variable, …).
    #[error("{file}: cannot render: {detail}")]
    Render {
        /// The template's file.
        file: String,
        /// Liquid's message, on one line.
        detail: String,
    },
}

/// A rendered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The subject, for templates with one in their front matter.
    pub subject: Option<String>,
    /// The body.
    pub body: String,
    /// Whether the body is HTML (an email template whose body starts with `<`): sent as
    /// `text/html`, its data HTML-escaped, with the open pixel when tracking is on.
    pub html: bool,
}

/// A compiled subject or body.
struct Part {
    liquid: liquid::Template,
    /// Names the part binds with `assign`/`capture`: set to nil before rendering, so a
    /// read before the binding renders as nothing (liquid-rust would fail).
    assigned: Vec<String>,
    /// Key paths beneath `traits`/`event` read through loop and `assign` variables.
    fills: Vec<Vec<Seg>>,
    /// Key paths beneath `traits`/`event` read as values.
    reads: Vec<Vec<Seg>>,
    /// The fields of `message` it reads.
    message_fields: Vec<String>,
}

/// A loaded template.
struct Template {
    /// The file as errors show it.
    file: String,
    subject: Option<Part>,
    /// The target of `message.click_url` (rendered first, so it can use the user's data).
    link: Option<Part>,
    body: Part,
    /// Whether the subject or body reads `message.click_url` / `message.open_url`.
    tracked: bool,
    /// The scheme and host `link` starts with, literally: a rendered link must keep them.
    link_origin: Option<url::Origin>,
    /// The body's source starts with `<`: HTML (for email).
    html: bool,
}

/// The loaded, checked templates, by name. `Send + Sync`: shared by delivery tasks.
pub struct Templates {
    by_name: BTreeMap<String, Template>,
    tracking: Option<super::tracking::Tracking>,
}

// Shared by tokio tasks: checked at compile time.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Templates>();
};

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.by_name.keys()).finish()
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parser() -> liquid::Parser {
    // The stdlib parser has no fallible parts; `build` only fails for custom partials.
    liquid::ParserBuilder::with_stdlib()
        .build()
        .expect("the stdlib Liquid parser builds")
}

impl Templates {
    /// Loads and checks every `*.liquid` file in `dir` (other files and hidden files are
    /// ignored). Files are checked in name order and the first error is returned.
    pub fn load(dir: &Path) -> Result<Templates, TemplateError> {
        let read_err = |p: &Path, e: std::io::Error| TemplateError::Read {
            path: p.display().to_string(),
            detail: e.to_string(),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
            let path = entry.map_err(|e| read_err(dir, e))?.path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !hidden && path.extension().is_some_and(|x| x == "liquid") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        let parser = parser();
        let mut by_name = BTreeMap::new();
        for path in files {
            let file = path.display().to_string();
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            if !valid_name(&name) {
                return Err(TemplateError::BadName { file, name });
            }
            let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
            by_name.insert(name, compile(&parser, file, &text)?);
        }
        Ok(Templates {
            by_name,
            tracking: None,
        })
    }

    /// Builds from in-memory `(name, source)` pairs, with the same checks as
    /// [`Templates::load`]; errors name the file `NAME.liquid`.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Templates, TemplateError> {
        let parser = parser();
        let mut by_name = BTreeMap::new();
        for (name, text) in sources {
            let file = format!("{name}.liquid");
            if !valid_name(name) {
                let name = name.to_string();
                return Err(TemplateError::BadName { file, name });
            }
            if by_name.contains_key(name) {
                return Err(TemplateError::Duplicate { file });
            }
            by_name.insert(name.to_string(), compile(&parser, file, text)?);
        }
        Ok(Templates {
            by_name,
            tracking: None,
        })
    }

    /// Turns on signed tracking links (`message.click_url`, `message.open_url`, the open
    /// pixel of HTML email).
    pub fn with_tracking(mut self, tracking: Option<super::tracking::Tracking>) -> Templates {
        self.tracking = tracking;
        self
    }

    /// The templates that read `message.click_url` or `message.open_url` (they need
    /// `[notify] tracking_url`).
    pub fn reading_links(&self) -> Vec<&str> {
        self.names_where(|t| t.tracked)
    }

    /// The templates that read `message.click_url` but have no `link` to point it at.
    pub fn click_without_link(&self) -> Vec<&str> {
        self.names_where(|t| t.link.is_none() && t.reads_click())
    }

    fn names_where(&self, f: impl Fn(&Template) -> bool) -> Vec<&str> {
        let chosen = self.by_name.iter().filter(|(_, t)| f(t));
        chosen.map(|(n, _)| n.as_str()).collect()
    }

    /// The tracking links' base and key, when on.
    pub fn tracking(&self) -> Option<&super::tracking::Tracking> {
        self.tracking.as_ref()
    }

    /// Whether a template of that name is loaded.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The template names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Whether the template has a subject (false for an unknown template).
    pub fn has_subject(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|t| t.subject.is_some())
    }

    /// Renders the subject and body of the action's template.
    pub fn render(&self, action: &MessageAction) -> Result<Rendered, TemplateError> {
        let t =
            self.by_name
                .get(&action.template)
                .ok_or_else(|| TemplateError::UnknownTemplate {
                    name: action.template.clone(),
                })?;
        let parts = || t.subject.iter().chain(&t.link).chain([&t.body]);
        let html = action.channel == "email" && t.html;
        // An HTML email's data is HTML-escaped: a trait cannot add markup to it.
        let escaped;
        let action = if html {
            escaped = data::html_escaped(action);
            &escaped
        } else {
            action
        };
        let mut globals = data::globals(
            action,
            parts().flat_map(|p| &p.assigned),
            parts().flat_map(|p| &p.fills),
            &parts().flat_map(|p| &p.reads).map(Vec::as_slice).collect(),
        );
        if let Some(tracking) = &self.tracking {
            let target = t.link.as_ref().map(|p| t.render(p, &globals)).transpose()?;
            let target = target.map(|to| t.checked_link(to.trim())).transpose()?;
            let click = target.map(|to| tracking.click_url(&action.message_id, &to));
            data::set_links(&mut globals, click, tracking.open_url(&action.message_id));
        }
        let mut body = t.render(&t.body, &globals)?;
        if let (true, Some(tracking)) = (html, &self.tracking) {
            let pixel = tracking.open_url(&action.message_id);
            if let Some(b) = super::tracking::with_open_pixel(&body, &pixel) {
                body = b;
            }
        }
        Ok(Rendered {
            subject: t
                .subject
                .as_ref()
                .map(|p| t.render(p, &globals))
                .transpose()?,
            body,
            html,
        })
    }
}

/// The longest subject or body a template may render (a loop over data could otherwise
/// grow without bound).
const MAX_RENDERED: usize = 1 << 20;

/// A buffer that refuses to grow past [`MAX_RENDERED`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED {
            self.0.resize(MAX_RENDERED, 0);
            return Err(std::io::Error::other("message too long"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Template {
    /// A rendered link, if it is an http(s) URL on the host the template wrote literally
    /// (HTML entities from escaped data undone: the link is a URL, not markup).
    fn checked_link(&self, rendered: &str) -> Result<String, TemplateError> {
        let text = rendered.replace("&amp;", "&");
        let bad = |why: &str| TemplateError::Render {
            file: self.file.clone(),
            detail: format!("the rendered link '{text}' {why}"),
        };
        let url = url::Url::parse(&text).map_err(|e| bad(&format!("is not a URL ({e})")))?;
        if Some(url.origin()) != self.link_origin {
            return Err(bad(
                "leaves the scheme and host the template's 'link:' starts with",
            ));
        }
        Ok(url.to_string())
    }

    /// Renders one of its parts over `globals`.
    fn render(&self, p: &Part, globals: &data::Data) -> Result<String, TemplateError> {
        let mut out = Capped(Vec::new());
        let done = catch_unwind(AssertUnwindSafe(|| p.liquid.render_to(&mut out, globals)));
        let detail = match done {
            Ok(Ok(())) => return Ok(String::from_utf8_lossy(&out.0).into_owned()),
            Ok(Err(_)) if out.0.len() >= MAX_RENDERED => {
                format!("the message is longer than {MAX_RENDERED} bytes")
            }
            Ok(Err(e)) => describe(&e, true).1,
            Err(_) => "liquid panicked".to_string(),
        };
        Err(TemplateError::Render {
            file: self.file.clone(),
            detail,
        })
    }

    fn reads_click(&self) -> bool {
        self.subject
            .iter()
            .chain([&self.body])
            .any(|p| p.reads_message(&["click_url"]))
    }
}

impl Part {
    /// Whether the part reads one of `fields` of `message`.
    fn reads_message(&self, fields: &[&str]) -> bool {
        self.message_fields
            .iter()
            .any(|f| fields.contains(&f.as_str()))
    }
}

fn compile(parser: &liquid::Parser, file: String, text: &str) -> Result<Template, TemplateError> {
    let src = front_matter::split(&file, text)?;
    let subject = match &src.subject {
        Some((s, line)) => Some(part(parser, &file, s, *line)?),
        None => None,
    };
    let link = match &src.link {
        Some((s, line)) => Some(part(parser, &file, s, *line)?),
        None => None,
    };
    let link_origin = match &src.link {
        Some((s, line)) => Some(literal_origin(s).ok_or_else(|| {
            TemplateError::Syntax {
                file: file.clone(),
                line: *line,
                detail: "'link' must start with http:// or https:// and a host written out \
                     (no {{ }} before the first '/'), so that no trait can send a click \
                     to another site"
                    .into(),
            }
        })?),
        None => None,
    };
    if let (Some(l), Some((_, line))) = (&link, &src.link) {
        if l.reads_message(&["click_url", "open_url"]) {
            return Err(TemplateError::Syntax {
                file,
                line: *line,
                detail: "'link' cannot read message.click_url or message.open_url".into(),
            });
        }
    }
    let body = part(parser, &file, &src.body, src.body_line)?;
    let html = super::tracking::is_html(&src.body);
    let tracked = subject
        .iter()
        .chain([&body])
        .any(|p| p.reads_message(&["click_url", "open_url"]));
    Ok(Template {
        file,
        subject,
        link,
        body,
        tracked,
        link_origin,
        html,
    })
}

/// The origin (scheme, host, port) a link's source starts with, when it is written out
/// literally: `https://shop.example/…` yes, `https://{{ traits.host }}/…` no.
fn literal_origin(src: &str) -> Option<url::Origin> {
    let src = src.trim();
    let rest = src
        .strip_prefix("https://")
        .or_else(|| src.strip_prefix("http://"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host = &rest[..end];
    if host.is_empty()
        || host.contains(['{', '}', '@', '%', '\\'])
        || host.contains(char::is_whitespace)
    {
        return None;
    }
    let scheme_len = src.len() - rest.len();
    let url = url::Url::parse(&format!("{}/", &src[..scheme_len + end])).ok()?;
    Some(url.origin())
}

/// Parses and checks a subject or body that starts at line `first` of the file.
fn part(
    parser: &liquid::Parser,
    file: &str,
    text: &str,
    first: usize,
) -> Result<Part, TemplateError> {
    let at = |line: usize| first + line - 1;
    if let Some((line, detail)) = scan::too_deep(text) {
        let (file, line) = (file.to_string(), at(line));
        return Err(TemplateError::Syntax { file, line, detail });
    }
    let liquid = parse(parser, text).map_err(|e| {
        let (line, detail) = syntax(parser, text, &e);
        let (file, line) = (file.to_string(), at(line));
        TemplateError::Syntax { file, line, detail }
    })?;
    let scan = scan::scan(text);
    if let Some((line, detail)) = scan.unsupported {
        let (file, line) = (file.to_string(), at(line));
        return Err(TemplateError::Syntax { file, line, detail });
    }
    let mut message_fields = Vec::new();
    for r in &scan.refs {
        let root = r.path[0].as_str();
        if let ("message", Some(f)) = (root, r.path.get(1)) {
            message_fields.push(f.to_string());
        }
        let unknown = |name: String, hint: String| TemplateError::UnknownVariable {
            file: file.to_string(),
            line: at(r.line),
            name,
            hint,
        };
        if !ROOTS.contains(&root) {
            let hint = format!("the template sees {}", ROOTS.join(", "));
            return Err(unknown(root.to_string(), hint));
        }
        if let (Some(f), Some(second)) = (fields(root), r.path.get(1)) {
            if !f.contains(&second.as_str()) {
                let hint = format!("{root} has: {}", f.join(", "));
                return Err(unknown(format!("{root}.{second}"), hint));
            }
        }
    }
    Ok(Part {
        liquid,
        // A template variable named like a root would hide the data; it is set when bound.
        assigned: scan
            .assigned
            .into_iter()
            .filter(|n| !ROOTS.contains(&n.as_str()))
            .collect(),
        fills: scan.fills.into_iter().collect(),
        reads: scan.reads.into_iter().collect(),
        message_fields,
    })
}

/// liquid's parser, with a panic (none known) turned into an error.
fn parse(parser: &liquid::Parser, text: &str) -> Result<liquid::Template, liquid::Error> {
    catch_unwind(AssertUnwindSafe(|| parser.parse(text)))
        .unwrap_or_else(|_| Err(liquid::Error::with_msg("liquid panicked on this text")))
}

/// The line (within `text`) and a one-line message for a parse error. liquid points at
/// the end of the text for an unclosed block or delimiter, and gives no position at all
/// for an unknown filter or bad filter arguments: those are placed here.
fn syntax(parser: &liquid::Parser, text: &str, e: &liquid::Error) -> (usize, String) {
    let (pos, mut detail) = describe(e, false);
    if let Some(hint) = pos.and_then(|(l, c)| keyword_prefix(text, l, c)) {
        detail = format!("{detail} ({hint})");
    }
    let pos = pos.map(|p| p.0);
    let mut line = pos;
    if let Some(block) = detail
        .strip_prefix("'{% ")
        .and_then(|d| d.split_once(' '))
        .map(|d| d.0)
    {
        if detail.contains("is not closed") {
            line = scan::unclosed_block(text, block).or(line);
        }
    }
    if let (Some(p), Some((l, open))) = (pos, scan::unclosed_delimiter(text)) {
        // Past an unclosed `{{`, pest can only say what token it expected.
        if p >= l {
            let close = if open == "{{" { "}}" } else { "%}" };
            line = Some(l);
            detail = format!("'{open}' is not closed (no '{close}' after it)");
        }
    }
    let line = line.or_else(|| {
        // The first line whose prefix of the text fails the same way: liquid raises its
        // errors in text order, so a prefix cut outside tags fails the same way exactly
        // when it holds the culprit, and a binary search finds it.
        let target = e.to_string();
        let cuts = scan::line_cuts(text);
        let k = cuts.partition_point(|&end| {
            let same = parse(parser, &text[..end]).err().map(|e| e.to_string());
            same.as_ref() != Some(&target)
        });
        let prefix = &text[..*cuts.get(k)?];
        Some(
            prefix
                .strip_suffix('\n')
                .unwrap_or(prefix)
                .matches('\n')
                .count()
                + 1,
        )
    });
    (line.unwrap_or(1), detail)
}

/// A hint when the name at line `l`, column `c` starts with a literal: liquid-rust's
/// grammar reads `empty_cart` as `empty` and then fails on `_cart`.
fn keyword_prefix(text: &str, l: usize, c: usize) -> Option<String> {
    let line: Vec<char> = text.split('\n').nth(l.checked_sub(1)?)?.chars().collect();
    let ident = |k: &usize| {
        line.get(*k)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
    };
    let mut start = c.checked_sub(1)?.min(line.len());
    while start > 0 && ident(&(start - 1)) {
        start -= 1;
    }
    let word: String = (start..).take_while(ident).map(|k| line[k]).collect();
    let kw = ["empty", "blank", "true", "false", "nil", "null"];
    let kw = kw
        .iter()
        .find(|k| word.len() > k.len() && word.starts_with(*k))?;
    Some(format!(
        "a name cannot start with '{kw}' in liquid-rust: rename '{word}'"
    ))
}

/// liquid's error, made one line: the pest position's line if there is one, and the
/// message. liquid's `Display` is multi-line: pest's `--> L:C`, a source excerpt, `= msg`,
/// then `with:` `key=value` context lines and `from:` traces.
fn describe(e: &liquid::Error, render: bool) -> (Option<(usize, usize)>, String) {
    let s = e.to_string();
    let s = s.strip_prefix("liquid:").unwrap_or(&s);
    let (mut pos, mut msg, mut context, mut traces) = (None, None, Vec::new(), Vec::new());
    for l in s.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let art = l.starts_with('|')
            || l.split_once(" |")
                .is_some_and(|(n, _)| n.bytes().all(|b| b.is_ascii_digit()));
        if let Some(p) = l.strip_prefix("--> ") {
            let mut lc = p.split(':').map(|n| n.trim().parse::<usize>().ok());
            pos = lc.next().flatten().zip(lc.next().flatten());
        } else if let Some(m) = l.strip_prefix("= ") {
            msg = Some(m.to_string());
        } else if let Some(t) = l.strip_prefix("from: ") {
            traces.push(t.to_string());
        } else if art || l == "with:" {
        } else if msg.is_none() {
            msg = Some(l.to_string());
        } else if let Some((k, v)) = l.split_once('=') {
            // The lists of what is available are long; the name asked for is what helps.
            if !k.starts_with("available") {
                context.push((k.to_string(), v.to_string()));
            }
        }
    }
    let msg = msg.unwrap_or_default();
    let get = |key: &str| {
        context
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let detail = if let (true, Some(f)) = (msg == "Unknown filter", get("requested filter")) {
        format!("unknown filter '{f}'")
    } else if let (true, Some(t)) = (msg == "Unknown tag.", get("requested")) {
        if t.starts_with("end") || ["else", "elsif", "when"].contains(&t) {
            format!("'{{% {t} %}}' outside the block it belongs to")
        } else {
            format!("unknown tag '{t}'")
        }
    } else if let Some(end) = msg
        .strip_prefix("Unclosed block. {% end")
        .and_then(|m| m.split_once(' '))
    {
        format!(
            "'{{% {} %}}' is not closed ('{{% end{} %}}' expected)",
            end.0, end.0
        )
    } else {
        let mut d = msg.trim_end_matches('.').to_string();
        let extra: Vec<String> = context.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        if !extra.is_empty() {
            d = format!("{d} ({})", extra.join(", "));
        }
        // Traces that quote the template say where; the others ("Filter error") do not.
        let quoted: Vec<&String> = traces.iter().filter(|t| t.starts_with('{')).collect();
        if render && !quoted.is_empty() {
            let quoted: Vec<&str> = quoted.into_iter().map(String::as_str).collect();
            d = format!("{d}, in {}", quoted.join(" in "));
        }
        d
    };
    (pos, detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value as Json};

    fn action(template: &str, event: Option<Json>) -> MessageAction {
        let mut traits = Map::new();
        traits.insert("first_name".into(), json!("Ada"));
        traits.insert("plan".into(), json!("pro"));
        MessageAction {
            message_id: "m1".into(),
            journey: "cart".into(),
            user_id: "u1".into(),
            instance: 2,
            step_path: "steps[1]".into(),
            variant: Some("B".into()),
            channel: "email".into(),
            template: template.into(),
            address: Some("ada@example.com".into()),
            traits,
            event,
            time: 0,
        }
    }

    fn event() -> Json {
        json!({"event": "Cart Abandoned", "properties": {"total": 42.5,
            "items": [{"name": "Hat", "price": 3}, {"price": 4}],
            "products": [{"name": "A", "dims": {"w": 1}}, {"name": "B"}]}})
    }

    fn load_err(src: &str) -> String {
        Templates::from_sources([("cart", src)])
            .unwrap_err()
            .to_string()
    }

    fn render(src: &str, event: Option<Json>) -> String {
        let t = Templates::from_sources([("cart", src)]).unwrap();
        t.render(&action("cart", event)).unwrap().body
    }

    #[test]
    fn loads_the_liquid_files_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("welcome.liquid", "Hello {{ traits.first_name }}!\n");
        write(
            "cart.liquid",
            "---\nsubject: \"{{ traits.first_name | default: 'Hi' }}, your cart is waiting\"\n---\nTotal: {{ event.properties.total }}\n\n",
        );
        write("notes.txt", "{{ not a template");
        write(".cart.liquid.swp", "x");
        std::fs::create_dir(dir.path().join("old")).unwrap();
        let t = Templates::load(dir.path()).unwrap();
        assert_eq!(t.names().collect::<Vec<_>>(), ["cart", "welcome"]);
        assert!(t.contains("cart") && !t.contains("notes"));
        assert!(t.has_subject("cart") && !t.has_subject("welcome") && !t.has_subject("x"));
        let r = t.render(&action("cart", Some(event()))).unwrap();
        assert_eq!(r.subject.as_deref(), Some("Ada, your cart is waiting"));
        // One trailing newline (the file's last line ending) is dropped, no more.
        assert_eq!(r.body, "Total: 42.5\n");
        let r = t.render(&action("welcome", None)).unwrap();
        assert_eq!((r.subject, r.body.as_str()), (None, "Hello Ada!"));

        write("broken.liquid", "ok\n{% if traits.vip %}\nno end\n");
        let shown = dir.path().join("broken.liquid").display().to_string();
        let e = Templates::load(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{shown}:2: '{{% if %}}' is not closed ('{{% endif %}}' expected)")
        );
        write("bad name.liquid", "x");
        let shown = dir.path().join("bad name.liquid").display().to_string();
        let e = Templates::load(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{shown}: bad template name 'bad name' (a name is letters, digits, '_' and '-')"
            )
        );

        let missing = dir.path().join("nope");
        let e = Templates::load(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: cannot read: ", missing.display())),
            "{e}"
        );
    }

    #[test]
    fn front_matter_sets_the_subject() {
        let subject = |src: &str| {
            let t = Templates::from_sources([("cart", src)]).unwrap();
            t.render(&action("cart", None)).unwrap().subject
        };
        assert_eq!(
            subject("---\nsubject: Hi {{ user.id }}\n---\n").as_deref(),
            Some("Hi u1")
        );
        assert_eq!(
            subject("---\n# a comment\n\nsubject: 'It''s {{ journey.variant }}'\n---\nb")
                .as_deref(),
            Some("It's B")
        );
        assert_eq!(
            subject("---\r\nsubject: \"say \\\"hi\\\"\"\r\n---\r\nb\r\n").as_deref(),
            Some("say \"hi\"")
        );
        assert_eq!(subject("no front matter\n---\nsubject: x\n---\n"), None);
        let t = Templates::from_sources([("cart", "---\nsubject: s\n---\nline 4\n\nline 6\n")])
            .unwrap();
        assert_eq!(
            t.render(&action("cart", None)).unwrap().body,
            "line 4\n\nline 6"
        );
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_problem() {
        let sees = "(the template sees user, traits, event, journey, message)";
        let cases = [
            // Liquid syntax, at the offending line (liquid gives the end of the text or none).
            ("a\n{% if traits.vip %}\nb\nc", "cart.liquid:2: '{% if %}' is not closed ('{% endif %}' expected)"),
            ("a\n{% for i in (1..3) %}{% if true %}{% endif %}\nb", "cart.liquid:2: '{% for %}' is not closed ('{% endfor %}' expected)"),
            ("a\nb {{ traits.x | upcase | nofilter }}\nc", "cart.liquid:2: unknown filter 'nofilter'"),
            ("{% if traits.a %}\n{{ traits.x\n  | nofilter }}\n{% endif %}", "cart.liquid:3: unknown filter 'nofilter'"),
            ("{% if traits.a %}\n{% for x in event.items %}\n{{ x }}\n{% endfor %}\nb {{ x | nofilter }}\n{% endif %}\nc\nd", "cart.liquid:5: unknown filter 'nofilter'"),
            ("a\n\n{{ traits.x \nmore", "cart.liquid:3: '{{' is not closed (no '}}' after it)"),
            ("a\n{% if traits.x", "cart.liquid:2: '{%' is not closed (no '%}' after it)"),
            ("a\n{% for p in event.items %}\n{% endif %}", "cart.liquid:3: '{% endif %}' outside the block it belongs to"),
            ("a\n{% bogus %}", "cart.liquid:2: unknown tag 'bogus'"),
            ("{% assign empty_cart = 1 %}", "cart.liquid:1: unexpected FilterChain; expected Identifier (a name cannot start with 'empty' in liquid-rust: rename 'empty_cart')"),
            ("a\n{% if nilx %}{% endif %}", "cart.liquid:2: \"and\" or \"or\" expected (a name cannot start with 'nil' in liquid-rust: rename 'nilx')"),
            ("a\n{{ traits.x | default: }}", "cart.liquid:2: expected Identifier or Value"),
            ("a\n{{ traits.x | truncate: 1, 2, 3 }}", "cart.liquid:2: Invalid number of positional arguments (cause: expected at most 2 positional arguments, filter: truncate: 1, 2, 3)"),
            ("a\n{% comment %}\nb", "cart.liquid:2: '{% comment %}' is not closed ('{% endcomment %}' expected)"),
            ("a\n {% include 'footer' %}", "cart.liquid:2: '{% include %}' is not supported (a template cannot include another)"),
            ("{% cycle group: %}", "cart.liquid:1: '{% cycle %}' needs at least one value"),
            (&"{% if true %}\n".repeat(51), "cart.liquid:51: blocks nested more than 50 deep"),
            // Variables.
            ("hello\n\n{{ trait.first_name }}", &format!("cart.liquid:3: unknown variable 'trait' {sees}")),
            ("{{ user.idd }}", "cart.liquid:1: unknown variable 'user.idd' (user has: id)"),
            ("{{ journey['nam'] }}", "cart.liquid:1: unknown variable 'journey.nam' (journey has: name, variant, step, instance)"),
            ("{{ message.body }}", "cart.liquid:1: unknown variable 'message.body' (message has: id, channel, template, click_url, open_url)"),
            ("{{ traits.a | default: trait.b }}", &format!("cart.liquid:1: unknown variable 'trait' {sees}")),
            ("{% if traits.a and\n  vip %}{% endif %}", &format!("cart.liquid:2: unknown variable 'vip' {sees}")),
            ("{% for p in event.items %}{% endfor %}\n{{ p.name }}", &format!("cart.liquid:2: unknown variable 'p' {sees}")),
            ("{{ forloop.index }}", &format!("cart.liquid:1: unknown variable 'forloop' {sees}")),
            ("{% for i in (1..n) %}{% endfor %}", "cart.liquid:1: '(1..n)': a range's bounds must be whole numbers written out (a bound read from data could be any size)"),
            ("{% for i in event.items limit: max %}{% endfor %}", &format!("cart.liquid:1: unknown variable 'max' {sees}")),
            ("{{ traits[key] }}", &format!("cart.liquid:1: unknown variable 'key' {sees}")),
            ("{{ traits[event.k[\"]\"]][nope] }}", &format!("cart.liquid:1: unknown variable 'nope' {sees}")),
            ("{% case traits.plan %}{% when 'pro', other %}{% endcase %}", &format!("cart.liquid:1: unknown variable 'other' {sees}")),
            // Lines count from the top of the file, front matter included.
            ("---\nsubject: Hi {{ traits.first_name | nofilter }}\n---\nb", "cart.liquid:2: unknown filter 'nofilter'"),
            ("---\nsubject: Hi\n---\nbody\n{{ usr.id }}", &format!("cart.liquid:5: unknown variable 'usr' {sees}")),
            ("---\n\nsubject: Hi {{ user.name }}\n---\n", "cart.liquid:3: unknown variable 'user.name' (user has: id)"),
            // Front matter.
            ("---\nsubject: a\nfrom: b\n---\n", "cart.liquid:3: front matter: unknown key 'from' (only 'subject' and 'link' are allowed)"),
            ("---\nsubject: a\n", "cart.liquid:1: front matter: no closing '---' line"),
            ("---\nsubject a\n---\n", "cart.liquid:2: front matter: expected 'subject: …', found 'subject a'"),
            ("---\nsubject: a\nsubject: b\n---\n", "cart.liquid:3: front matter: 'subject' is given twice"),
            ("---\nsubject: \"a\n---\n", "cart.liquid:2: front matter: no closing \""),
            ("---\nsubject: 'a' b\n---\n", "cart.liquid:2: front matter: text after the closing quote: 'b'"),
            ("---\nsubject: ''\n---\n", "cart.liquid:2: front matter: 'subject' is empty"),
        ];
        for (src, want) in cases {
            assert_eq!(load_err(src), want, "{src:?}");
        }
    }

    #[test]
    fn names_the_template_binds_and_the_words_that_are_not_variables() {
        let ok = [
            "{% assign n = traits.first_name | upcase %}{{ n }}",
            "{{ later }}{% assign later = 1 %}",
            "{% capture c %}x{% endcapture %}{{ c | append: c }}",
            "{% increment k %}{% decrement k %}{{ k }}",
            "{% for p in event.items limit: 2 offset: 1 reversed %}{{ p.name }} {{ forloop.index }}{% endfor %}",
            "{% for i in (1..5) %}{{ i }}{% endfor %}",
            "{% tablerow p in event.items cols: 2 %}{{ p }} {{ tablerowloop.col }}{% endtablerow %}",
            "{% cycle 'a', 'b' %}{% cycle grp: 'a', traits.plan %}",
            "{% if traits.a == nil or traits.b == empty and traits.c contains 'x' %}{% elsif true %}{% endif %}",
            "{% unless traits.vip == blank %}{% endunless %}",
            "{% raw %}{{ anything }}{% endraw %}{% comment %}{{ nope }}{% comment %}{% endcomment %}{% endcomment %}",
            "{{ '{{ nope }}' }} {{ \"}}\" | append: 'x' }} {{ 3.5 | plus: -1 }}",
            "{{- traits.first_name -}} {%- if event -%}{%- endif -%}",
            "{{ traits['first name'] }} {{ traits[journey.name] }} {{ event.items[0].tags.first }}",
            "{{ traits[event.keys[traits['a]b']]] }}",
            "{{ user }}{{ traits }}{{ event }}{{ journey }}{{ message.channel }}",
        ];
        for src in ok {
            assert!(
                Templates::from_sources([("t", src)]).is_ok(),
                "{src:?}: {:?}",
                Templates::from_sources([("t", src)]).err()
            );
        }
    }

    #[test]
    fn missing_keys_render_as_nothing() {
        let e = || Some(event());
        assert_eq!(render("[{{ traits.missing }}]", e()), "[]");
        assert_eq!(
            render("{{ traits.missing | default: \"there\" }}", e()),
            "there"
        );
        assert_eq!(
            render("{% if traits.vip %}vip{% else %}not{% endif %}", e()),
            "not"
        );
        assert_eq!(render("{{ event.properties.items[0].name }}", e()), "Hat");
        let products = "{% for p in event.properties.products %}{{ p.name }};{% endfor %}";
        assert_eq!(render(products, e()), "A;B;");
        assert_eq!(render("{{ event.properties.items[1].name }}|{{ event.properties.items[9].name }}|{{ event.nope.deeper }}", e()), "||");
        assert_eq!(
            render("{{ traits.missing.deeper | default: 'd' }}", e()),
            "d"
        );
        assert_eq!(render("{{ event.properties.items.size }} {{ event.properties.size }} {{ traits.plan.size }}", e()), "2 3 3");
        // Through loop and assign variables too.
        let items =
            "{% for i in event.properties.items %}[{{ i.name | default: '?' }}]{% endfor %}";
        assert_eq!(render(items, e()), "[Hat][?]");
        let dims = "{% for p in event.properties.products %}[{{ p.dims.w }}]{% endfor %}";
        assert_eq!(render(dims, e()), "[1][]");
        let guarded = "{% for p in event.properties.products %}{% if p.dims %}{{ p.dims.w }}{% else %}-{% endif %}{% endfor %}";
        assert_eq!(render(guarded, e()), "1-");
        let assigned = "{% assign c = event.properties %}{{ c.total }}/{{ c.nope }}";
        assert_eq!(render(assigned, e()), "42.5/");
        // Without an event.
        assert_eq!(
            render(
                "[{{ event.properties.total }}]{% if event %}x{% endif %}",
                None
            ),
            "[]"
        );
        assert_eq!(render(products, None), "");
        assert_eq!(render(assigned, None), "/");
        // nil compares as nil, empty and blank.
        let cmp = "{% if traits.x == nil %}n{% endif %}{% if traits.x == empty %}e{% endif %}{% if traits.x == blank %}b{% endif %}";
        assert_eq!(render(cmp, e()), "neb");
        let all = "{{ user.id }} {{ journey.name }} {{ journey.variant }} {{ journey.step }} {{ journey.instance | plus: 1 }} {{ message.id }} {{ message.channel }} {{ message.template }}";
        assert_eq!(render(all, None), "u1 cart B steps[1] 3 m1 email cart");
        assert_eq!(
            render("{{ x }}{% assign x = traits.plan %}{{ x }}", None),
            "pro"
        );
    }

    #[test]
    fn render_errors_name_the_template() {
        let t = Templates::from_sources([("cart", "{{ traits.first_name | plus: 1 }}")]).unwrap();
        let e = t.render(&action("cart", None)).unwrap_err().to_string();
        assert_eq!(e, "cart.liquid: cannot render: Invalid argument (argument: operand, cause: Number expected, filter: plus : 1, input: \"Ada\")");
        let e = t.render(&action("gone", None)).unwrap_err().to_string();
        assert_eq!(e, "unknown template 'gone' (no gone.liquid is loaded)");
        let e = Templates::from_sources([("a.b", "x")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "a.b.liquid: bad template name 'a.b' (a name is letters, digits, '_' and '-')"
        );
        let e = Templates::from_sources([("a", "x"), ("a", "y")])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "a.liquid: defined twice");
    }

    #[test]
    fn no_panic_on_cut_or_garbled_templates() {
        let valid = "---\nsubject: \"Hi {{ traits.first_name | default: 'there' }}\"\n---\n\
            {% assign n = event.properties.items | size %}{% if n > 0 %}Your {{ n }} items:\n\
            {% for i in event.properties.items limit: 3 %}- {{ i.name | upcase }} ({{ i['price'] | times: 1.5 }}){% endfor %}\n\
            {% endif %}{% raw %}{{ raw }}{% endraw %}{% comment %} x {% endcomment %}é✓ {{ \"}}\" }}\n";
        let mut variants: Vec<String> = valid
            .char_indices()
            .map(|(i, _)| valid[..i].to_string())
            .collect();
        for (i, _) in valid.char_indices().step_by(7) {
            for junk in [
                "{", "}", "{{", "%}", "'", "\"", "[", "|", ":", "..", "-", "\n---\n",
            ] {
                variants.push(format!("{}{junk}{}", &valid[..i], &valid[i..]));
            }
        }
        let mut loaded = 0;
        for v in &variants {
            if let Ok(t) = Templates::from_sources([("t", v.as_str())]) {
                loaded += 1;
                let _ = t.render(&action("t", Some(event())));
                let _ = t.render(&action("t", None));
            }
        }
        assert!(
            loaded > 10 && loaded < variants.len(),
            "{loaded} of {}",
            variants.len()
        );
        assert!(Templates::from_sources([("t", valid)]).is_ok());
    }

    #[test]
    fn tracking_links_are_signed_links_to_the_rendered_target() {
        use crate::notify::tracking::{Kind, Tracking};
        let tracking = Tracking::new("https://t.example", b"0123456789abcdef").unwrap();
        let src =
            "---\nlink: \"https://shop.example/{{ user.id }}\"\n---\nGo: {{ message.click_url }}";
        let t = Templates::from_sources([("cart", src)])
            .unwrap()
            .with_tracking(Some(tracking.clone()));
        assert_eq!(t.reading_links(), vec!["cart"]);
        assert!(t.click_without_link().is_empty());
        let r = t.render(&action("cart", None)).unwrap();
        let a = action("cart", None);
        let want = tracking.click_url(
            &a.message_id,
            &format!("https://shop.example/{}", a.user_id),
        );
        assert_eq!(r.body, format!("Go: {want}"));
        let sig = want.rsplit_once("sig=").unwrap().1;
        let target = format!("https://shop.example/{}", a.user_id);
        assert!(tracking.verify(Kind::Click, &a.message_id, &target, sig));
        // An HTML email gets the pixel and is HTML; a text one neither.
        let html = Templates::from_sources([("m", "<p>Hi</p>")])
            .unwrap()
            .with_tracking(Some(tracking.clone()));
        let mut mail = action("m", None);
        mail.channel = "email".into();
        let r = html.render(&mail).unwrap();
        assert!(r.html);
        assert!(r.body.contains(&tracking.open_url(&mail.message_id)));
        mail.channel = "webhook".into();
        let r = html.render(&mail).unwrap();
        assert_eq!((r.html, r.body.as_str()), (false, "<p>Hi</p>"));
        // click_url without a link is reported; a link cannot read the links.
        let no_link = Templates::from_sources([("x", "{{ message.click_url }}")]).unwrap();
        assert_eq!(no_link.reading_links(), vec!["x"]);
        assert_eq!(no_link.click_without_link(), vec!["x"]);
        let e = Templates::from_sources([(
            "y",
            "---\nlink: \"https://x.example/{{ message.open_url }}\"\n---\nx",
        )])
        .err()
        .unwrap();
        assert!(e.to_string().contains("'link' cannot read"), "{e}");
    }

    #[test]
    fn a_trait_can_neither_move_a_link_to_another_host_nor_add_markup() {
        use crate::notify::tracking::Tracking;
        // The host must be written out.
        for link in [
            "https://shop.example{{ traits.p }}",
            "{{ traits.url }}",
            "javascript:alert(1)",
            "https://{{ traits.h }}/x",
        ] {
            let src = format!("---\nlink: \"{link}\"\n---\n{{{{ message.click_url }}}}");
            let e = Templates::from_sources([("t", src.as_str())]).err();
            assert!(
                e.is_some_and(|e| e.to_string().contains("host written out")),
                "{link}"
            );
        }
        // Data after the host stays on the host.
        let src =
            "---\nlink: \"https://shop.example/{{ traits.p }}\"\n---\n{{ message.click_url }}";
        let t = Templates::from_sources([("t", src)])
            .unwrap()
            .with_tracking(Some(
                Tracking::new("https://t.example", b"0123456789abcdef").unwrap(),
            ));
        let mut a = action("t", None);
        a.traits.insert("p".into(), Json::from("@evil.example/x"));
        let body = t.render(&a).unwrap().body;
        assert!(
            body.contains("to=https%3A%2F%2Fshop.example%2F%40evil.example%2Fx"),
            "{body}"
        );
        // An HTML email's data is escaped; a text one's is not; the choice is the source's.
        let t = Templates::from_sources([
            ("h", "<p>Hi {{ traits.name }}</p>"),
            ("p", "Hi {{ traits.name }}"),
        ])
        .unwrap();
        let mut a = action("h", None);
        a.channel = "email".into();
        a.traits
            .insert("name".into(), Json::from("<b>Ann</b> & co"));
        let r = t.render(&a).unwrap();
        assert!(r.html);
        assert_eq!(r.body, "<p>Hi &lt;b&gt;Ann&lt;/b&gt; &amp; co</p>");
        a.template = "p".into();
        a.traits.insert("name".into(), Json::from("<html>"));
        let r = t.render(&a).unwrap();
        assert!(!r.html, "a trait made a text template HTML");
        assert_eq!(r.body, "Hi <html>");
    }

    #[test]
    fn ranges_and_output_are_bounded() {
        for (src, want) in [
            (
                "{% for i in (1..100000000) %}x{% endfor %}",
                "at most 10000 values",
            ),
            ("{% for i in (1..traits.n) %}x{% endfor %}", "written out"),
            (
                "{% tablerow i in (traits.a..3) %}x{% endtablerow %}",
                "written out",
            ),
        ] {
            let e = Templates::from_sources([("t", src)])
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(want), "{src}: {e}");
        }
        assert!(
            Templates::from_sources([("t", "{% for i in (1..10) %}{{ i }}{% endfor %}")]).is_ok()
        );
        // Output past 1 MiB fails the message instead of growing.
        let t = Templates::from_sources([(
            "t",
            "{% for a in (1..2000) %}{% for b in (1..2000) %}xxxxxxxx{% endfor %}{% endfor %}",
        )])
        .unwrap();
        let e = t.render(&action("t", None)).unwrap_err().to_string();
        assert!(e.contains("longer than 1048576 bytes"), "{e}");
    }
}
