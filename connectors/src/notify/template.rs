//! Message templates: Liquid (the language Braze, Customer.io and Shopify users write),
//! one file per template, checked when loaded.
//!
//! Owns [`Templates`]. A templates directory holds `NAME.liquid` files; the name is the
//! file stem (`[A-Za-z0-9_-]+`). Optional Jekyll-style front matter sets the subject:
//!
//! ```text
//! ---
//! subject: "{{ traits.first_name | default: 'Hi' }}, your cart is waiting"
//! ---
//! Body, with {{ event.properties.total }} …
//! ```
//!
//! What a template sees: `user.id`; `traits.*` (the user's traits at the send);
//! `event.*` (the event that entered the journey; an empty object for segment and API
//! triggers without one); `journey.name`, `journey.variant`, `journey.step`,
//! `journey.instance`; `message.id`, `message.channel`, `message.template`; and the
//! names the template binds itself (`assign`, `capture`, `for`, `increment`, …).
//!
//! Checks at load, each naming the file and line: Liquid syntax (liquid-rust's parser)
//! and unknown variables. liquid-rust cannot list a template's variables
//! (cobalt-org/liquid-rust#588), so [`scan`] reads the `{{ }}` and `{% %}` tags itself:
//! a root other than the ones above is an error, as is an unknown field of `user`,
//! `journey` or `message`. Keys beneath `traits` and `event` are data and cannot be
//! checked; a missing one renders as nothing (as in Shopify Liquid and Braze), so
//! `{{ traits.first_name | default: "there" }}` works. liquid-rust errors on a missing
//! key, so before rendering, every key path the template names is filled with nil where
//! the data lacks it. Keys reached through a loop variable are not filled: a missing one
//! there is a render error (a permanent failure of that message).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use herald_operators::journey::MessageAction;
use serde_json::{json, Map, Value as Json};

/// The root variables a template may use.
pub const ROOTS: [&str; 5] = ["user", "traits", "event", "journey", "message"];

/// Fields of the fixed roots.
fn fields(root: &str) -> Option<&'static [&'static str]> {
    match root {
        "user" => Some(&["id"]),
        "journey" => Some(&["name", "variant", "step", "instance"]),
        "message" => Some(&["id", "channel", "template"]),
        _ => None,
    }
}

/// What is wrong with a template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// The directory or a file cannot be read.
    #[error("{path}: {detail}")]
    Read {
        /// The directory or file.
        path: String,
        /// Why.
        detail: String,
    },
    /// A file name that is not a template name.
    #[error("{file}: a template name is letters, digits, '_' and '-' (the file stem)")]
    BadName {
        /// The file.
        file: String,
    },
    /// Front matter that does not parse.
    #[error("{file}:{line}: front matter: {detail}")]
    FrontMatter {
        /// The file.
        file: String,
        /// Line in the file.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// Liquid that does not parse.
    #[error("{file}:{line}: {detail}")]
    Syntax {
        /// The file.
        file: String,
        /// Line in the file.
        line: usize,
        /// Liquid's message.
        detail: String,
    },
    /// A variable the template cannot see.
    #[error("{file}:{line}: unknown variable '{name}' ({hint})")]
    UnknownVariable {
        /// The file.
        file: String,
        /// Line in the file.
        line: usize,
        /// The variable as written.
        name: String,
        /// What is available.
        hint: String,
    },
    /// A message names a template that is not loaded.
    #[error("unknown template '{0}'")]
    UnknownTemplate(String),
    /// Rendering failed.
    #[error("template '{name}': {detail}")]
    Render {
        /// Template name.
        name: String,
        /// Liquid's message.
        detail: String,
    },
}

/// A rendered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The subject, if the template has one.
    pub subject: Option<String>,
    /// The body.
    pub body: String,
}

struct Template {
    subject: Option<liquid::Template>,
    body: liquid::Template,
    /// Key paths beneath `traits` and `event` the template names.
    paths: Vec<Vec<String>>,
}

/// Loaded, checked templates by name.
pub struct Templates {
    by_name: BTreeMap<String, Template>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Templates {
    /// Loads and checks every `*.liquid` file in `dir` (in name order; the first error
    /// is returned).
    pub fn load(dir: &Path) -> Result<Templates, TemplateError> {
        let read_err = |p: &Path, e: std::io::Error| TemplateError::Read {
            path: p.display().to_string(),
            detail: e.to_string(),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| read_err(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "liquid"))
            .collect();
        files.sort();
        let mut by_name = BTreeMap::new();
        for f in files {
            let shown = f.display().to_string();
            let name = f
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|n| valid_name(n))
                .ok_or_else(|| TemplateError::BadName {
                    file: shown.clone(),
                })?
                .to_string();
            let text = std::fs::read_to_string(&f).map_err(|e| read_err(&f, e))?;
            by_name.insert(name, compile(&shown, &text)?);
        }
        Ok(Templates { by_name })
    }

    /// Builds from `(name, source)` pairs; errors name `NAME.liquid`.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Templates, TemplateError> {
        let mut by_name = BTreeMap::new();
        for (name, text) in sources {
            let file = format!("{name}.liquid");
            if !valid_name(name) {
                return Err(TemplateError::BadName { file });
            }
            by_name.insert(name.to_string(), compile(&file, text)?);
        }
        Ok(Templates { by_name })
    }

    /// Whether a template of that name is loaded.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Template names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Whether the template has a subject.
    pub fn has_subject(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|t| t.subject.is_some())
    }

    /// Renders the action's template.
    pub fn render(&self, a: &MessageAction) -> Result<Rendered, TemplateError> {
        let t = self
            .by_name
            .get(&a.template)
            .ok_or_else(|| TemplateError::UnknownTemplate(a.template.clone()))?;
        let mut traits = Json::Object(a.traits.clone());
        let mut event = a.event.clone().unwrap_or_else(|| Json::Object(Map::new()));
        for p in &t.paths {
            match p[0].as_str() {
                "traits" => fill(&mut traits, &p[1..]),
                "event" => fill(&mut event, &p[1..]),
                _ => {}
            }
        }
        let globals = json!({
            "user": {"id": a.user_id},
            "traits": traits,
            "event": event,
            "journey": {
                "name": a.journey,
                "variant": a.variant,
                "step": a.step_path,
                "instance": a.instance,
            },
            "message": {"id": a.message_id, "channel": a.channel, "template": a.template},
        });
        let render_err = |e: liquid::Error| TemplateError::Render {
            name: a.template.clone(),
            detail: one_line(&e.to_string()),
        };
        let globals = liquid::model::to_object(&globals).map_err(render_err)?;
        let subject = match &t.subject {
            Some(s) => Some(s.render(&globals).map_err(render_err)?),
            None => None,
        };
        let body = t.body.render(&globals).map_err(render_err)?;
        Ok(Rendered { subject, body })
    }
}

/// Puts nil at `path` where the data lacks it (creating objects on the way), so that
/// liquid renders a missing key as nothing.
fn fill(v: &mut Json, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Json::Object(m) = v else { return };
    let child = m.entry(first.clone()).or_insert_with(|| {
        if rest.is_empty() {
            Json::Null
        } else {
            Json::Object(Map::new())
        }
    });
    fill(child, rest);
}

/// Liquid's multi-line messages on one line.
fn one_line(s: &str) -> String {
    let s = s.strip_prefix("liquid: ").unwrap_or(s);
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Splits front matter off; returns (subject and its file line, body, the body's first
/// line number).
#[allow(clippy::type_complexity)]
fn front_matter(
    file: &str,
    text: &str,
) -> Result<(Option<(String, usize)>, String, usize), TemplateError> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let mut lines = text.split('\n');
    if lines.next().map(str::trim_end) != Some("---") {
        return Ok((None, text.to_string(), 1));
    }
    let mut subject = None;
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        if line.trim_end() == "---" {
            let body: Vec<&str> = text.split('\n').skip(n).collect();
            return Ok((subject, body.join("\n"), n + 1));
        }
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let bad = |detail: String| TemplateError::FrontMatter {
            file: file.to_string(),
            line: n,
            detail,
        };
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("'{}' is not `key: value`", line.trim())))?;
        if k.trim() != "subject" {
            return Err(bad(format!("unknown key '{}' (only subject)", k.trim())));
        }
        let v = v.trim();
        let v = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            &v[1..v.len() - 1]
        } else {
            v
        };
        subject = Some((v.to_string(), n));
    }
    Err(TemplateError::FrontMatter {
        file: file.to_string(),
        line: 1,
        detail: "no closing `---`".into(),
    })
}

fn compile(file: &str, text: &str) -> Result<Template, TemplateError> {
    let parser =
        liquid::ParserBuilder::with_stdlib()
            .build()
            .map_err(|e| TemplateError::Syntax {
                file: file.to_string(),
                line: 1,
                detail: one_line(&e.to_string()),
            })?;
    let (subject, body, body_line) = front_matter(file, text)?;
    let mut paths = Vec::new();
    let mut parse = |src: &str, first_line: usize| -> Result<liquid::Template, TemplateError> {
        let t = parser.parse(src).map_err(|e| TemplateError::Syntax {
            file: file.to_string(),
            line: first_line - 1 + error_line(&parser, src, &e),
            detail: syntax_detail(&e),
        })?;
        for v in scan(src) {
            check_var(file, first_line - 1 + v.line, &v)?;
            if matches!(v.path[0].as_str(), "traits" | "event") && v.path.len() > 1 {
                paths.push(v.path);
            }
        }
        Ok(t)
    };
    let subject = match subject {
        Some((s, line)) => Some(parse(&s, line)?),
        None => None,
    };
    let body = parse(&body, body_line)?;
    paths.sort();
    paths.dedup();
    Ok(Template {
        subject,
        body,
        paths,
    })
}

/// Liquid's message, short: pest's "expected …" line, or the first line.
fn syntax_detail(e: &liquid::Error) -> String {
    let s = e.to_string();
    if let Some(exp) = s.lines().find_map(|l| l.trim().strip_prefix("= ")) {
        return format!("syntax error: {exp}");
    }
    one_line(&s)
}

/// The line (1-based, within `src`) of a parse error: pest's ` --> L:C` when liquid
/// gives one, else the first line whose prefix fails with the same message.
fn error_line(parser: &liquid::Parser, src: &str, e: &liquid::Error) -> usize {
    let s = e.to_string();
    if let Some(pos) = s.split("--> ").nth(1) {
        if let Some(l) = pos.split(':').next().and_then(|l| l.trim().parse().ok()) {
            return l;
        }
    }
    let first = s.lines().next().unwrap_or_default().to_string();
    let lines: Vec<&str> = src.split('\n').collect();
    for k in 1..=lines.len() {
        if let Err(e2) = parser.parse(&lines[..k].join("\n")) {
            if e2.to_string().lines().next() == Some(first.as_str()) {
                return k;
            }
        }
    }
    1
}

fn check_var(file: &str, line: usize, v: &Var) -> Result<(), TemplateError> {
    let err = |name: String, hint: String| {
        Err(TemplateError::UnknownVariable {
            file: file.to_string(),
            line,
            name,
            hint,
        })
    };
    let root = v.path[0].as_str();
    if !ROOTS.contains(&root) {
        return err(
            root.to_string(),
            format!("the template sees {}", ROOTS.join(", ")),
        );
    }
    if let (Some(f), Some(second)) = (fields(root), v.path.get(1)) {
        if !f.contains(&second.as_str()) {
            return err(
                format!("{root}.{second}"),
                format!("{root} has: {}", f.join(", ")),
            );
        }
    }
    Ok(())
}

/// A variable reference found by [`scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Var {
    /// The root and the static keys after it (up to the first computed index).
    pub path: Vec<String>,
    /// Line within the scanned text (1-based).
    pub line: usize,
}

const KEYWORDS: [&str; 13] = [
    "true", "false", "nil", "null", "empty", "blank", "and", "or", "contains", "in", "limit",
    "offset", "reversed",
];

/// The free variables of a Liquid text: every variable path in `{{ }}` and `{% %}` tags
/// that the text does not bind itself, with its line.
pub fn scan(src: &str) -> Vec<Var> {
    let mut bound: BTreeSet<String> = ["forloop", "tablerowloop"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut refs = Vec::new();
    let mut pos = 0;
    let bytes = src.as_bytes();
    while let Some(off) = src[pos..].find('{') {
        let start = pos + off;
        let kind = bytes.get(start + 1).copied();
        if kind != Some(b'{') && kind != Some(b'%') {
            pos = start + 1;
            continue;
        }
        let close = if kind == Some(b'{') { "}}" } else { "%}" };
        let Some(end) = find_close(src, start + 2, close) else {
            break;
        };
        let inner = src[start + 2..end].trim_matches('-');
        let line = src[..start].matches('\n').count() + 1;
        pos = end + 2;
        let toks = tokens(inner);
        if kind == Some(b'{') {
            collect(&toks, 0, line, &mut refs);
            continue;
        }
        let Some(Tok::Path(tag)) = toks.first() else {
            continue;
        };
        let tag = tag[0].clone();
        match tag.as_str() {
            "raw" | "comment" => {
                let endtag = format!("end{tag}");
                let mut p = pos;
                // Skip to the matching end tag.
                while let Some(o) = src[p..].find("{%") {
                    let s = p + o;
                    let Some(e) = find_close(src, s + 2, "%}") else {
                        break;
                    };
                    p = e + 2;
                    if src[s + 2..e].trim_matches('-').trim() == endtag {
                        break;
                    }
                }
                pos = p;
            }
            "assign" => {
                if let Some(Tok::Path(x)) = toks.get(1) {
                    bound.insert(x[0].clone());
                }
                collect(&toks, 2, line, &mut refs);
            }
            "capture" | "increment" | "decrement" => {
                if let Some(Tok::Path(x)) = toks.get(1) {
                    bound.insert(x[0].clone());
                }
            }
            "for" | "tablerow" => {
                if let Some(Tok::Path(x)) = toks.get(1) {
                    bound.insert(x[0].clone());
                }
                collect(&toks, 2, line, &mut refs);
            }
            "if" | "elsif" | "unless" | "case" | "when" | "echo" | "cycle" => {
                collect(&toks, 1, line, &mut refs)
            }
            _ => {}
        }
    }
    refs.retain(|v| !bound.contains(&v.path[0]) && !KEYWORDS.contains(&v.path[0].as_str()));
    refs
}

/// The position of `close` after `from`, outside string literals.
fn find_close(src: &str, from: usize, close: &str) -> Option<usize> {
    let b = src.as_bytes();
    let mut i = from;
    let mut quote = None;
    while i + 1 < b.len() + 1 {
        let c = *b.get(i)?;
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'"' || c == b'\'' => quote = Some(c),
            None if src[i..].starts_with(close) => return Some(i),
            None => {}
        }
        i += 1;
    }
    None
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// A variable path: root and static keys (stops at a computed index).
    Path(Vec<String>),
    /// A literal or a keyword-free operator.
    Other,
    /// `|`.
    Pipe,
    /// A path inside `[...]`: a variable used as an index.
    Index(Vec<String>),
}

fn tokens(s: &str) -> Vec<Tok> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'?';
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += 1;
            }
            i += 1;
            out.push(Tok::Other);
        } else if c == b'|' {
            out.push(Tok::Pipe);
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let mut path = Vec::new();
            let st = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            path.push(s[st..i].to_string());
            let mut computed = false;
            loop {
                if i < b.len() && b[i] == b'.' && i + 1 < b.len() && b[i + 1] != b'.' {
                    let st = i + 1;
                    i += 1;
                    while i < b.len() && ident(b[i]) {
                        i += 1;
                    }
                    if !computed {
                        path.push(s[st..i].to_string());
                    }
                } else if i < b.len() && b[i] == b'[' {
                    let st = i + 1;
                    let mut depth = 1;
                    i += 1;
                    while i < b.len() && depth > 0 {
                        match b[i] {
                            b'[' => depth += 1,
                            b']' => depth -= 1,
                            _ => {}
                        }
                        i += 1;
                    }
                    let inner = s[st..i.saturating_sub(1)].trim();
                    let quoted = inner.len() >= 2
                        && (inner.starts_with('"') || inner.starts_with('\''))
                        && inner.ends_with(&inner[..1]);
                    if quoted && !computed {
                        path.push(inner[1..inner.len() - 1].to_string());
                    } else {
                        computed = true;
                        for t in tokens(inner) {
                            if let Tok::Path(p) = t {
                                out.push(Tok::Index(p));
                            }
                        }
                    }
                } else {
                    break;
                }
            }
            out.push(Tok::Path(path));
        } else {
            if !c.is_ascii_whitespace() {
                out.push(Tok::Other);
            }
            i += 1;
        }
    }
    out
}

/// Variable references among `toks[from..]`: paths, except filter names (the path right
/// after `|`) and parameter names (a path followed by `:` is caught by the keyword list
/// for `limit`/`offset`; filter arguments are values).
fn collect(toks: &[Tok], from: usize, line: usize, out: &mut Vec<Var>) {
    let mut after_pipe = false;
    for t in toks.iter().skip(from) {
        match t {
            Tok::Pipe => after_pipe = true,
            Tok::Path(p) if after_pipe => {
                after_pipe = false;
                let _ = p;
            }
            Tok::Path(p) | Tok::Index(p) => out.push(Var {
                path: p.clone(),
                line,
            }),
            Tok::Other => after_pipe = false,
        }
    }
}

#[cfg(test)]
mod tests;
