//! A small scanner over Liquid source, for what liquid-rust's parser does not tell:
//! which variables a template reads (liquid-rust has no API for it,
//! cobalt-org/liquid-rust#588), which names it binds itself, and where an unclosed
//! delimiter or block opens (liquid-rust reports those at the end of the text).
//!
//! It follows liquid-rust's grammar closely enough for well-formed templates (it runs
//! after the parser has accepted the text) and never panics on any other text. It does
//! not evaluate anything and knows nothing of the data.

use std::collections::{BTreeMap, BTreeSet};

/// A segment of a key path, for the nil-filling of paths reached through loop and
/// `assign` variables.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Seg {
    /// `.name` or `["name"]`.
    Key(String),
    /// Every element of an array (what a `for` variable stands for).
    Each,
}

/// A read of a variable the template does not bind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ref {
    /// The root and the static keys after it, up to the first computed index.
    pub path: Vec<String>,
    /// Line (1-based) of the reference in the scanned text.
    pub line: usize,
}

/// What [`scan`] finds.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Reads of names the template does not bind, in text order.
    pub refs: Vec<Ref>,
    /// Names bound by `assign` and `capture`: global for the rest of the render.
    pub assigned: BTreeSet<String>,
    /// Key paths beneath `traits` or `event` read through a loop or `assign` variable.
    pub fills: BTreeSet<Vec<Seg>>,
    /// Every key path beneath `traits` or `event` the template reads as a value (not
    /// the ones it only binds a variable to).
    pub reads: BTreeSet<Vec<Seg>>,
    /// The first tag Herald rejects although liquid parses it: (line, why).
    pub unsupported: Option<(usize, String)>,
}

/// Keywords that look like variables but are not.
const KEYWORDS: [&str; 9] = [
    "and", "or", "contains", "true", "false", "nil", "null", "empty", "blank",
];

/// Block tags, the ones with an `end…` tag.
const BLOCKS: [&str; 9] = [
    "if",
    "unless",
    "for",
    "case",
    "capture",
    "tablerow",
    "ifchanged",
    "comment",
    "raw",
];

/// Byte offsets of line starts, for offset → line.
struct Lines(Vec<usize>);

impl Lines {
    fn new(src: &str) -> Lines {
        let starts = std::iter::once(0).chain(src.match_indices('\n').map(|(i, _)| i + 1));
        Lines(starts.collect())
    }

    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&s| s <= offset).max(1)
    }
}

/// A `{{ }}` or `{% %}` found in the text.
struct Tag<'s> {
    /// `{{ }}` rather than `{% %}`.
    output: bool,
    /// Byte offset of the opening `{`.
    start: usize,
    /// The text between the delimiters, whitespace-control hyphens removed.
    inner: &'s str,
    /// Byte offset of `inner` in the text.
    inner_at: usize,
    /// Byte offset just past the closing delimiter.
    end: usize,
}

enum Next<'s> {
    Tag(Tag<'s>),
    /// An opening delimiter with no closing one anywhere after it.
    Unclosed {
        start: usize,
        output: bool,
    },
    Done,
}

/// The next tag at or after `from`.
fn next_tag(src: &str, from: usize) -> Next<'_> {
    let b = src.as_bytes();
    let mut i = from;
    let start = loop {
        let Some(off) = src.get(i..).and_then(|s| s.find('{')) else {
            return Next::Done;
        };
        let at = i + off;
        if matches!(b.get(at + 1), Some(b'{' | b'%')) {
            break at;
        }
        i = at + 1;
    };
    let output = b[start + 1] == b'{';
    let close = if output { "}}" } else { "%}" };
    let body = start + 2;
    // Quotes hide a closing delimiter (`{{ "}}" }}`), as in liquid's grammar; with an
    // unterminated quote, fall back to the first delimiter (the parser rejects it anyway).
    let mut quote = None;
    let mut found = None;
    for (k, &c) in b.iter().enumerate().skip(body) {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'"' || c == b'\'' => quote = Some(c),
            None if b[k..].starts_with(close.as_bytes()) => {
                found = Some(k);
                break;
            }
            None => {}
        }
    }
    let Some(close_at) = found.or_else(|| src[body..].find(close).map(|k| body + k)) else {
        return Next::Unclosed { start, output };
    };
    let mut inner_at = body;
    let mut inner = &src[body..close_at];
    if let Some(rest) = inner.strip_prefix('-') {
        inner = rest;
        inner_at += 1;
    }
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    Next::Tag(Tag {
        output,
        start,
        inner,
        inner_at,
        end: close_at + 2,
    })
}

/// The tag's name (first word) for `{% %}` tags.
fn tag_name<'s>(t: &Tag<'s>) -> &'s str {
    let s = t.inner.trim_start();
    let n = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..n]
}

/// Skips a `raw` or `comment` block's content: returns the offset just past its end tag,
/// or `None` when it is not closed. Comments nest, and a `raw` inside a comment hides
/// its content from the comment.
fn skip_block(src: &str, from: usize, name: &str) -> Option<usize> {
    let mut depth = 1;
    let mut pos = from;
    loop {
        match next_tag(src, pos) {
            Next::Tag(t) => {
                pos = t.end;
                if t.output {
                    continue;
                }
                let n = tag_name(&t);
                if name == "comment" && n == "raw" {
                    pos = skip_block(src, pos, "raw")?;
                } else if n == name && name == "comment" {
                    depth += 1;
                } else if n.strip_prefix("end") == Some(name) {
                    depth -= 1;
                    if depth == 0 {
                        return Some(pos);
                    }
                }
            }
            Next::Unclosed { .. } | Next::Done => return None,
        }
    }
}

/// The first opening `{{` or `{%` with no closing delimiter after it: (line, `{{` or
/// `{%`).
pub(crate) fn unclosed_delimiter(src: &str) -> Option<(usize, &'static str)> {
    let mut pos = 0;
    loop {
        match next_tag(src, pos) {
            Next::Tag(t) => pos = t.end,
            Next::Unclosed { start, output } => {
                let open = if output { "{{" } else { "{%" };
                return Some((Lines::new(src).line(start), open));
            }
            Next::Done => return None,
        }
    }
}

/// The offsets just past each line end that is outside every tag, and the text's end:
/// where a prefix of the text can be cut without cutting a tag.
pub(crate) fn line_cuts(src: &str) -> Vec<usize> {
    let mut spans = Vec::new();
    let mut pos = 0;
    loop {
        match next_tag(src, pos) {
            Next::Tag(t) => {
                spans.push((t.start, t.end));
                pos = t.end;
            }
            Next::Unclosed { start, .. } => {
                spans.push((start, src.len()));
                break;
            }
            Next::Done => break,
        }
    }
    let mut spans = spans.into_iter().peekable();
    let mut cuts = Vec::new();
    for (i, _) in src.match_indices('\n') {
        while spans.next_if(|&(_, end)| end <= i).is_some() {}
        if spans.peek().is_none_or(|&(start, _)| start > i) {
            cuts.push(i + 1);
        }
    }
    if cuts.last() != Some(&src.len()) {
        cuts.push(src.len());
    }
    cuts
}

/// The line of the innermost block named `name` still open at the end of the text.
pub(crate) fn unclosed_block(src: &str, name: &str) -> Option<usize> {
    let mut open: Vec<(&str, usize)> = Vec::new();
    let mut pos = 0;
    while let Next::Tag(t) = next_tag(src, pos) {
        pos = t.end;
        if t.output {
            continue;
        }
        let n = tag_name(&t);
        if BLOCKS.contains(&n) {
            open.push((n, t.start));
            if n == "raw" || n == "comment" {
                match skip_block(src, pos, n) {
                    Some(p) => {
                        open.pop();
                        pos = p;
                    }
                    None => break,
                }
            }
        } else if let Some(b) = n.strip_prefix("end") {
            if let Some(k) = open.iter().rposition(|(o, _)| *o == b) {
                open.truncate(k);
            }
        }
    }
    let (_, at) = open.iter().rev().find(|(o, _)| *o == name)?;
    Some(Lines::new(src).line(*at))
}

/// How deep blocks may nest, and `[…]` indexes: liquid-rust parses and renders
/// recursively and overflows the stack (an abort, not a panic) near 400 nested `for`s.
const MAX_DEPTH: usize = 50;

/// The first place where blocks or indexes nest deeper than [`MAX_DEPTH`]: (line, why).
/// Iterative, to run before anything recursive sees the text.
pub(crate) fn too_deep(src: &str) -> Option<(usize, String)> {
    let mut depth = 0usize;
    let mut pos = 0;
    let deep = |at: usize, what: &str| {
        let why = format!("{what} nested more than {MAX_DEPTH} deep");
        Some((Lines::new(src).line(at), why))
    };
    while let Next::Tag(t) = next_tag(src, pos) {
        pos = t.end;
        let (mut brackets, mut quote) = (0usize, None);
        for c in t.inner.bytes() {
            match (quote, c) {
                (Some(q), _) if c == q => quote = None,
                (Some(_), _) => {}
                (None, b'"' | b'\'') => quote = Some(c),
                (None, b'[') => brackets += 1,
                (None, b']') => brackets = brackets.saturating_sub(1),
                _ => {}
            }
            if brackets > MAX_DEPTH {
                return deep(t.start, "indexes");
            }
        }
        if t.output {
            continue;
        }
        let n = tag_name(&t);
        if n == "raw" {
            pos = skip_block(src, pos, "raw").unwrap_or(src.len());
        } else if BLOCKS.contains(&n) {
            depth += 1;
            if depth > MAX_DEPTH {
                return deep(t.start, "blocks");
            }
        } else if n.strip_prefix("end").is_some_and(|b| BLOCKS.contains(&b)) {
            depth = depth.saturating_sub(1);
        }
    }
    None
}

/// A token of a tag's inner text.
#[derive(Debug)]
enum Tok {
    /// A variable path.
    Path(PathTok),
    /// A string or number literal.
    Lit,
    /// Punctuation or an operator: `|`, `:`, `,`, `=`, `==`, `..`, `(`, …
    Sym(String),
}

#[derive(Debug)]
struct PathTok {
    /// Root and static keys, up to the first computed index.
    path: Vec<String>,
    /// Whether a computed index (`a[b]`) follows the static part.
    computed: bool,
    /// Paths used as indexes inside `[...]`.
    index_paths: Vec<PathTok>,
    /// Byte offset in the text.
    at: usize,
}

fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Tokens of `s`, which starts at byte offset `base` of the text.
fn tokens(s: &str, base: usize) -> Vec<Tok> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'"' || c == b'\'' {
            i = s[i + 1..]
                .find(c as char)
                .map_or(b.len(), |k| i + 1 + k + 1);
            out.push(Tok::Lit);
        } else if c.is_ascii_digit()
            || ((c == b'-' || c == b'+') && next.is_some_and(|n| n.is_ascii_digit()))
        {
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            // A fraction, but not the `..` of a range.
            if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            out.push(Tok::Lit);
        } else if c.is_ascii_alphabetic()
            || c == b'_'
            || (c == b'-' && next.is_some_and(ident_char))
        {
            let (p, end) = path(s, i, base);
            out.push(Tok::Path(p));
            i = end;
        } else {
            let two = s.get(i..i + 2).unwrap_or("");
            let n = if ["==", "!=", "<>", "<=", ">=", ".."].contains(&two) {
                2
            } else {
                s[i..].chars().next().map_or(1, char::len_utf8)
            };
            out.push(Tok::Sym(s[i..i + n].to_string()));
            i += n;
        }
    }
    out
}

/// The `]` that closes the `[` at `open`, outside quotes.
fn matching_bracket(b: &[u8], open: usize) -> Option<usize> {
    let (mut depth, mut quote) = (0usize, None);
    for (k, &c) in b.iter().enumerate().skip(open) {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(c),
            (None, b'[') => depth += 1,
            (None, b']') => {
                depth -= 1;
                if depth == 0 {
                    return Some(k);
                }
            }
            _ => {}
        }
    }
    None
}

/// The variable path starting at `i`: the token and the offset past it.
fn path(s: &str, mut i: usize, base: usize) -> (PathTok, usize) {
    let b = s.as_bytes();
    let ident = |mut k: usize| {
        while k < b.len() && ident_char(b[k]) {
            k += 1;
        }
        k
    };
    let at = i;
    let e = ident(i);
    let mut p = PathTok {
        path: vec![s[i..e].to_string()],
        computed: false,
        index_paths: Vec::new(),
        at: base + at,
    };
    i = e;
    loop {
        if b.get(i) == Some(&b'.')
            && b.get(i + 1)
                .is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_' || c == b'-')
        {
            let e = ident(i + 1);
            if !p.computed {
                p.path.push(s[i + 1..e].to_string());
            }
            i = e;
        } else if b.get(i) == Some(&b'[') {
            // liquid's grammar allows a single value (literal or variable) in brackets.
            let close = matching_bracket(b, i).unwrap_or(b.len());
            let inner = s[i + 1..close].trim();
            let quoted = inner.len() >= 2
                && (inner.starts_with('"') || inner.starts_with('\''))
                && inner.ends_with(&inner[..1]);
            if quoted && !p.computed {
                p.path.push(inner[1..inner.len() - 1].to_string());
            } else if !quoted
                && !inner.is_empty()
                && inner.bytes().all(|c| c.is_ascii_digit() || c == b'-')
            {
                // A numeric index: a static segment for the name check, but no key to fill.
                if !p.computed {
                    p.path.push(inner.to_string());
                }
            } else {
                p.computed = true;
                for t in tokens(&s[i + 1..close], base + i + 1) {
                    if let Tok::Path(q) = t {
                        p.index_paths.push(q);
                    }
                }
            }
            i = (close + 1).min(b.len());
        } else {
            return (p, i);
        }
    }
}

/// A `for` or `tablerow` scope: its names and what the loop variable stands for.
struct Scope {
    tag: String,
    names: [String; 2],
    alias: Option<Vec<Seg>>,
}

/// The scanner's state over one text.
struct Scanner<'s> {
    src: &'s str,
    lines: Lines,
    scopes: Vec<Scope>,
    /// `assign` variables that stand for a data path (the last such assign wins).
    aliases: BTreeMap<String, Vec<Seg>>,
    counters: BTreeSet<String>,
    /// Every read with whether a loop scope bound its root at that point.
    reads: Vec<(Ref, bool)>,
    out: Scan,
}

impl Scanner<'_> {
    /// What `p` stands for as a data path, and whether it went through a variable.
    fn resolve(&self, p: &PathTok) -> Option<(Vec<Seg>, bool)> {
        let root = &p.path[0];
        let keys = p.path[1..]
            .iter()
            .filter(|k| !k.bytes().all(|c| c.is_ascii_digit() || c == b'-'));
        let base = if let Some(s) = self.scopes.iter().rev().find(|s| s.names.contains(root)) {
            // `forloop` / `tablerowloop` stand for no data.
            if *root != s.names[0] {
                return None;
            }
            (s.alias.clone()?, true)
        } else if let Some(a) = self.aliases.get(root) {
            (a.clone(), true)
        } else if root == "traits" || root == "event" {
            (vec![Seg::Key(root.clone())], false)
        } else {
            return None;
        };
        // A numeric index picks one element: its keys are not filled (rare; kept simple).
        if p.path[1..].len() != keys.clone().count() {
            return None;
        }
        let mut path = base.0;
        path.extend(keys.map(|k| Seg::Key(k.clone())));
        Some((path, base.1))
    }

    /// Records a read of `p` (and of the paths in its indexes); `source` when a variable
    /// is bound to it rather than its value used.
    fn read(&mut self, p: &PathTok, source: bool) {
        let bound = self.scopes.iter().any(|s| s.names.contains(&p.path[0]));
        let line = self.lines.line(p.at);
        self.reads.push((
            Ref {
                path: p.path.clone(),
                line,
            },
            bound,
        ));
        if let Some((path, alias)) = self.resolve(p) {
            if alias && path.len() > 1 {
                self.out.fills.insert(path.clone());
            }
            if !source {
                self.out.reads.insert(path);
            }
        }
        for q in &p.index_paths {
            self.read(q, false);
        }
    }

    /// Reads in `toks`: paths, except filter names (after `|`), parameter names (before
    /// `:`), keywords and the words in `skip`. `source`: the first token is what a
    /// variable is bound to.
    fn reads(&mut self, toks: &[Tok], skip: &[&str], source: bool) {
        let mut after_pipe = false;
        for (k, t) in toks.iter().enumerate() {
            match t {
                Tok::Sym(s) => after_pipe = s == "|",
                Tok::Lit => after_pipe = false,
                Tok::Path(p) => {
                    let param = matches!(toks.get(k + 1), Some(Tok::Sym(s)) if s == ":");
                    let word = p.path.len() == 1 && !p.computed;
                    let keyword = word
                        && (KEYWORDS.contains(&p.path[0].as_str())
                            || skip.contains(&p.path[0].as_str()));
                    if !(after_pipe || param || keyword) {
                        self.read(p, source && k == 0);
                    }
                    after_pipe = false;
                }
            }
        }
    }

    fn reject(&mut self, t: &Tag<'_>, why: String) {
        if self.out.unsupported.is_none() {
            self.out.unsupported = Some((self.lines.line(t.start), why));
        }
    }

    fn tag(&mut self, t: &Tag<'_>) -> usize {
        let toks = tokens(t.inner, t.inner_at);
        if t.output {
            self.reads(&toks, &[], false);
            return t.end;
        }
        let name = tag_name(t);
        let var = |k: usize| match toks.get(k) {
            Some(Tok::Path(p)) if p.path.len() == 1 => Some(p.path[0].clone()),
            _ => None,
        };
        let rest = toks.get(1..).unwrap_or(&[]);
        match name {
            "raw" | "comment" => {
                return skip_block(self.src, t.end, name).unwrap_or(self.src.len())
            }
            "include" | "render" => {
                let why = format!(
                    "'{{% {name} %}}' is not supported (a template cannot include another)"
                );
                self.reject(t, why);
            }
            "cycle" => {
                // liquid-rust panics rendering a cycle without values (`{% cycle g: %}`).
                let named = matches!(toks.get(2), Some(Tok::Sym(s)) if s == ":");
                let values = toks.iter().skip(if named { 3 } else { 1 });
                if !values.into_iter().any(|t| !matches!(t, Tok::Sym(_))) {
                    self.reject(t, "'{% cycle %}' needs at least one value".into());
                }
                self.reads(rest, &[], false);
            }
            "assign" => {
                let value = toks.get(3..).unwrap_or(&[]);
                self.reads(value, &[], value.len() == 1);
                if let Some(x) = var(1) {
                    let alias = match value {
                        [Tok::Path(p)] if !p.computed => self.resolve(p).map(|r| r.0),
                        _ => None,
                    };
                    match alias {
                        Some(a) => self.aliases.insert(x.clone(), a),
                        None => self.aliases.remove(&x),
                    };
                    self.out.assigned.insert(x);
                }
            }
            "capture" => {
                if let Some(x) = var(1) {
                    self.aliases.remove(&x);
                    self.out.assigned.insert(x);
                }
            }
            "increment" | "decrement" => {
                if let Some(x) = var(1) {
                    self.counters.insert(x);
                }
            }
            "for" | "tablerow" => {
                // liquid-rust builds a range's every value before the loop starts: a
                // bound read from data (a trait anyone can set) or a huge literal one
                // would take all memory.
                if let Some(why) = unbounded_range(t.inner) {
                    self.reject(t, why);
                }
                let range = toks.get(3..).unwrap_or(&[]);
                self.reads(range, &["reversed"], true);
                if let Some(x) = var(1) {
                    let alias = match range.first() {
                        Some(Tok::Path(p)) if !p.computed => self.resolve(p).map(|mut r| {
                            r.0.push(Seg::Each);
                            r.0
                        }),
                        _ => None,
                    };
                    let lp = if name == "for" {
                        "forloop"
                    } else {
                        "tablerowloop"
                    };
                    self.scopes.push(Scope {
                        tag: name.to_string(),
                        names: [x, lp.to_string()],
                        alias,
                    });
                }
            }
            "endfor" | "endtablerow" => {
                if let Some(k) = self.scopes.iter().rposition(|s| s.tag == name[3..]) {
                    self.scopes.truncate(k);
                }
            }
            "if" | "elsif" | "unless" | "case" | "when" => self.reads(rest, &[], false),
            _ => {}
        }
        t.end
    }
}

/// Most values a `for` range may have.
pub(crate) const MAX_RANGE: i64 = 10_000;

/// Why a `for`/`tablerow` tag's range `(a..b)` is refused: bounds that are not whole
/// numbers written out, or more than [`MAX_RANGE`] values.
fn unbounded_range(inner: &str) -> Option<String> {
    let open = inner.find('(')?;
    let close = open + inner[open..].find(')')?;
    let (a, b) = inner[open + 1..close].split_once("..")?;
    let bounds = (a.trim().parse::<i64>(), b.trim().parse::<i64>());
    let why = match bounds {
        (Ok(a), Ok(b)) if b.saturating_sub(a) < MAX_RANGE => return None,
        (Ok(_), Ok(_)) => format!("a range has at most {MAX_RANGE} values"),
        _ => "a range's bounds must be whole numbers written out (a bound read from \
              data could be any size)"
            .to_string(),
    };
    Some(format!("'({}..{})': {why}", a.trim(), b.trim()))
}

/// Scans a Liquid text: the variables it reads but does not bind, the names it binds,
/// and the data paths it reads through its own variables.
pub(crate) fn scan(src: &str) -> Scan {
    let mut s = Scanner {
        src,
        lines: Lines::new(src),
        scopes: Vec::new(),
        aliases: BTreeMap::new(),
        counters: BTreeSet::new(),
        reads: Vec::new(),
        out: Scan::default(),
    };
    let mut pos = 0;
    while let Next::Tag(t) = next_tag(src, pos) {
        pos = s.tag(&t);
    }
    // `assign` and `capture` bind for the whole render (they are pre-set to nil), loop
    // variables only inside their loop.
    let Scanner {
        reads,
        counters,
        mut out,
        ..
    } = s;
    out.refs = reads
        .into_iter()
        .filter(|(r, bound)| {
            !bound && !out.assigned.contains(&r.path[0]) && !counters.contains(&r.path[0])
        })
        .map(|(r, _)| r)
        .collect();
    out
}
