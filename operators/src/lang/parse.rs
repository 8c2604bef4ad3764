//! Parsing a segment file into a checked [`SegmentFile`].
//!
//! Owns the statement layer (`CREATE SEGMENT name AS … | FROM CSV … | FROM WAREHOUSE …`),
//! segment names (syntax and uniqueness), the `in_segment` reference checks (every target
//! exists, no cycles) and [`SegmentError`], the one positioned error a bad file produces.
//! Tokens and expression syntax come from `sqlparser` (PostgreSQL dialect); lowering an
//! expression into [`Expr`] with name resolution and type checking lives
//! in the sibling `lower` module. Does not own evaluation or compilation to dataflow.
//!
//! Errors are reported in this order, and the first one wins: syntax, name and type errors
//! statement by statement in file order; then `in_segment` targets and cycles, again in
//! file order. Nothing of a bad file is returned.

use std::collections::{HashMap, VecDeque};

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Span, Token, TokenWithSpan, Tokenizer};

use super::ast::{Expr, Pos, SegmentBody, SegmentDef, SegmentFile};
pub use super::lower::ConditionScope;
use super::lower::{interval_text_ms, lower_condition, lower_journey_condition, SegmentRef};

/// A rejected segment file: where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {}, column {}: {message}", pos.line, pos.column)]
pub struct SegmentError {
    /// Where the problem is (1-based line and column).
    pub pos: Pos,
    /// What the problem is, in plain words for the analyst who wrote the file.
    pub message: String,
}

impl SegmentError {
    pub(crate) fn new(pos: Pos, message: impl Into<String>) -> SegmentError {
        SegmentError {
            pos,
            message: message.into(),
        }
    }
}

/// Parses and checks a segment file. Returns every segment in file order, or the first
/// error (with its line and column); nothing of a bad file is returned.
pub fn parse_segments(src: &str) -> Result<SegmentFile, SegmentError> {
    let source = Source::new(src)?;
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(source.tokens.clone());
    let mut segments: Vec<SegmentDef> = Vec::new();
    let mut refs: Vec<Vec<SegmentRef>> = Vec::new();
    let mut name_pos: HashMap<String, Pos> = HashMap::new();
    loop {
        // Empty statements (`;;`) are allowed, as in PostgreSQL.
        while parser.consume_token(&Token::SemiColon) {}
        if parser.peek_token_ref().token == Token::EOF {
            break;
        }
        let (def, at, stmt_refs) = statement(&mut parser, &source)?;
        if let Some(first) = name_pos.get(&def.name) {
            return Err(SegmentError::new(
                at,
                format!(
                    "segment '{}' is defined twice (first on line {})",
                    def.name, first.line
                ),
            ));
        }
        name_pos.insert(def.name.clone(), at);
        segments.push(def);
        refs.push(stmt_refs);
    }
    if segments.is_empty() {
        return Err(SegmentError::new(
            source.eof_pos(),
            "the file defines no segments; write CREATE SEGMENT name AS <condition>;",
        ));
    }
    check_references(&segments, &refs)?;
    Ok(SegmentFile { segments })
}

/// Parses and checks one `CREATE SEGMENT` statement (`src`, positions in it) as a
/// change to `file`: it replaces the segment of the same name or is added after the
/// others, and its `in_segment` references are checked against the result (targets
/// exist, no cycle through it). The final `;` may be left out. Returns the changed file
/// and the statement's index in it.
pub fn parse_statement_into(
    src: &str,
    file: &SegmentFile,
) -> Result<(SegmentFile, usize), SegmentError> {
    // On a line of its own, so a trailing comment does not swallow it.
    let closed;
    let src = if src.trim_end().ends_with(';') {
        src
    } else {
        closed = format!("{src}\n;");
        &closed
    };
    let source = Source::new(src)?;
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(source.tokens.clone());
    while parser.consume_token(&Token::SemiColon) {}
    if parser.peek_token_ref().token == Token::EOF {
        return Err(SegmentError::new(
            source.eof_pos(),
            "the body holds no statement; send CREATE SEGMENT name AS <condition>;",
        ));
    }
    let (def, at, refs) = statement(&mut parser, &source)?;
    while parser.consume_token(&Token::SemiColon) {}
    let rest = parser.peek_token();
    if rest.token != Token::EOF {
        return Err(SegmentError::new(
            source.pos(rest.span.start),
            "the body holds more than one statement; send one CREATE SEGMENT at a time",
        ));
    }
    let mut segments = file.segments.clone();
    let index = match segments.iter().position(|s| s.name == def.name) {
        Some(i) => {
            segments[i] = def;
            i
        }
        None => {
            segments.push(def);
            segments.len() - 1
        }
    };
    // The other segments' references were checked when they were defined; a cycle or a
    // missing target now runs through this statement, so it is reported at it.
    let all_refs: Vec<Vec<SegmentRef>> = segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if i == index {
                return refs.clone();
            }
            let mut out = Vec::new();
            if let SegmentBody::Expr(e) = &s.body {
                e.walk(&mut |x| {
                    if let Expr::InSegment(name) = x {
                        out.push(SegmentRef {
                            name: name.clone(),
                            pos: at,
                        });
                    }
                });
            }
            out
        })
        .collect();
    check_references(&segments, &all_refs)?;
    Ok((SegmentFile { segments }, index))
}

/// Parses and checks one condition (a journey's `when` or `where`), with the same syntax,
/// names and types as a segment condition; `scope` says whether the triggering event's
/// fields are in scope. Returns the expression and the segments it references by
/// `in_segment` (checking that they exist is the caller's job). Positions are in `src`.
pub fn parse_condition(
    src: &str,
    scope: ConditionScope,
) -> Result<(Expr, Vec<String>), SegmentError> {
    let source = Source::new(src)?;
    let dialect = PostgreSqlDialect {};
    let mut p = Parser::new(&dialect).with_tokens_with_locations(source.tokens.clone());
    let start = p.peek_token();
    if start.token == Token::EOF {
        return Err(SegmentError::new(
            source.eof_pos(),
            "the condition is empty",
        ));
    }
    let expr = p
        .parse_expr()
        .map_err(|e| source.parser_error(e, &p.peek_token()))?;
    let rest = p.peek_token();
    if rest.token != Token::EOF {
        return Err(source.expected("the end of the condition", &rest));
    }
    let (expr, refs) =
        lower_journey_condition(&expr, &source, source.pos(start.span.start), scope)?;
    Ok((expr, refs.into_iter().map(|r| r.name).collect()))
}

/// Parses one statement, up to and including its `;`. Returns the definition, the
/// position of its name and the `in_segment` references of its condition.
fn statement(
    p: &mut Parser<'_>,
    src: &Source,
) -> Result<(SegmentDef, Pos, Vec<SegmentRef>), SegmentError> {
    let create = p.peek_token();
    if !p.parse_keyword(Keyword::CREATE) {
        return Err(src.expected("CREATE SEGMENT", &create));
    }
    let pos = src.pos(create.span.start);
    let seg = p.next_token();
    if !is_word(&seg.token, "segment") {
        return Err(src.expected("SEGMENT after CREATE", &seg));
    }
    let (name, name_pos) = segment_name(p, src)?;
    let mut refs = Vec::new();
    let body = if p.parse_keyword(Keyword::AS) {
        let start = p.peek_token();
        let expr = p
            .parse_expr()
            .map_err(|e| src.parser_error(e, &p.peek_token()))?;
        // Syntax first: a condition cut short by a typo is not type-checked.
        expect_semicolon(p, src, "after the segment condition")?;
        let (expr, found) = lower_condition(&expr, src, src.pos(start.span.start))?;
        refs = found;
        SegmentBody::Expr(expr)
    } else if p.parse_keyword(Keyword::FROM) {
        if p.parse_keyword(Keyword::CSV) {
            let url = string_literal(
                p,
                src,
                "FROM CSV needs the file's location as a quoted string, like \
                 FROM CSV 's3://bucket/list.csv'",
            )?;
            expect_semicolon(p, src, "after the CSV location")?;
            SegmentBody::Csv { url }
        } else if p.parse_keyword(Keyword::WAREHOUSE) {
            warehouse(p, src)?
        } else {
            return Err(src.expected("CSV or WAREHOUSE after FROM", &p.peek_token()));
        }
    } else {
        return Err(src.expected("AS or FROM after the segment name", &p.peek_token()));
    };
    Ok((SegmentDef { name, pos, body }, name_pos, refs))
}

/// `'query' REFRESH EVERY INTERVAL '…' ;` after `FROM WAREHOUSE`.
fn warehouse(p: &mut Parser<'_>, src: &Source) -> Result<SegmentBody, SegmentError> {
    let query = string_literal(
        p,
        src,
        "FROM WAREHOUSE needs the query as a quoted string, like \
         FROM WAREHOUSE 'SELECT user_id FROM scores'",
    )?;
    for (kw, text) in [
        (
            Keyword::REFRESH,
            "REFRESH EVERY INTERVAL '…' after the warehouse query",
        ),
        (Keyword::EVERY, "EVERY after REFRESH"),
        (Keyword::INTERVAL, "INTERVAL after REFRESH EVERY"),
    ] {
        if !p.parse_keyword(kw) {
            return Err(src.expected(text, &p.peek_token()));
        }
    }
    let at = p.peek_token();
    let mut text = string_literal(
        p,
        src,
        "REFRESH EVERY INTERVAL needs a quoted interval, like INTERVAL '1 hour'",
    )?;
    // `INTERVAL '1' HOUR`
    if let Token::Word(w) = &p.peek_token().token {
        if w.quote_style.is_none() && is_interval_unit(&w.value) {
            text = format!("{text} {}", w.value);
            p.next_token();
        }
    }
    let refresh_ms =
        interval_text_ms(&text).map_err(|m| SegmentError::new(src.pos(at.span.start), m))?;
    if refresh_ms <= 0 {
        return Err(SegmentError::new(
            src.pos(at.span.start),
            "the refresh interval must be longer than zero",
        ));
    }
    expect_semicolon(p, src, "after the refresh interval")?;
    Ok(SegmentBody::Warehouse { query, refresh_ms })
}

fn is_interval_unit(word: &str) -> bool {
    matches!(
        word.to_ascii_lowercase().as_str(),
        "second"
            | "seconds"
            | "minute"
            | "minutes"
            | "hour"
            | "hours"
            | "day"
            | "days"
            | "week"
            | "weeks"
    )
}

/// The segment name after `CREATE SEGMENT`, checked against `[a-z][a-z0-9_]*`.
fn segment_name(p: &mut Parser<'_>, src: &Source) -> Result<(String, Pos), SegmentError> {
    let tok = p.peek_token();
    let pos = src.pos(tok.span.start);
    const RULE: &str = "names are lowercase letters, digits and _, starting with a letter";
    let name = match &tok.token {
        Token::Word(w)
            if w.quote_style.is_some() || !matches!(w.keyword, Keyword::AS | Keyword::FROM) =>
        {
            w.value.clone()
        }
        // `1abc` tokenizes as a number followed by a word: show the whole name.
        Token::Number(..) => {
            let shown = src.word_at(tok.span.start);
            return Err(SegmentError::new(
                pos,
                format!("segment name '{shown}' must start with a lowercase letter; {RULE}"),
            ));
        }
        _ => return Err(src.expected("a segment name after CREATE SEGMENT", &tok)),
    };
    p.next_token();
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(SegmentError::new(pos, "the segment name is empty")),
        Some(c) if c.is_ascii_lowercase() => {}
        Some(c) if c.is_ascii_uppercase() => {
            return Err(SegmentError::new(
                pos,
                format!("segment name '{name}' must be lowercase; {RULE}"),
            ))
        }
        Some(_) => {
            return Err(SegmentError::new(
                pos,
                format!("segment name '{name}' must start with a lowercase letter; {RULE}"),
            ))
        }
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        let why = if bad.is_ascii_uppercase() {
            "must be lowercase".to_string()
        } else {
            format!("contains '{bad}'")
        };
        return Err(SegmentError::new(
            pos,
            format!("segment name '{name}' {why}; {RULE}"),
        ));
    }
    Ok((name, pos))
}

/// Consumes a non-empty single-quoted string, or fails with `what` and the token found
/// instead.
fn string_literal(p: &mut Parser<'_>, src: &Source, what: &str) -> Result<String, SegmentError> {
    let tok = p.peek_token();
    match tok.token {
        Token::SingleQuotedString(s) | Token::EscapedStringLiteral(s) if !s.trim().is_empty() => {
            p.next_token();
            Ok(s)
        }
        Token::SingleQuotedString(_) | Token::EscapedStringLiteral(_) => Err(SegmentError::new(
            src.pos(tok.span.start),
            format!("{what}; found an empty string"),
        )),
        _ => Err(SegmentError::new(
            src.pos(tok.span.start),
            format!("{what}; found {}", describe(&tok.token)),
        )),
    }
}

/// Consumes the statement's `;`. A missing one is reported right after the last token
/// of the statement, where it belongs.
fn expect_semicolon(p: &mut Parser<'_>, src: &Source, after: &str) -> Result<(), SegmentError> {
    let tok = p.peek_token();
    if p.consume_token(&Token::SemiColon) {
        return Ok(());
    }
    // sqlparser gives up on `FILTER (` without WHERE after consuming both tokens.
    let filter_at = match src.before(tok.span.start, 2).as_slice() {
        [open, filter] if open.token == Token::LParen && is_word(&filter.token, "filter") => {
            Some(filter.span.start)
        }
        _ if is_word(&tok.token, "filter") => Some(tok.span.start),
        _ => None,
    };
    if let Some(at) = filter_at {
        return Err(SegmentError::new(
            src.pos(at),
            "FILTER must follow an aggregate and read FILTER (WHERE condition), \
             like count(*) FILTER (WHERE event = 'Signed Up')",
        ));
    }
    let message = format!("expected ';' {after}, found {}", describe(&tok.token));
    Err(SegmentError::new(src.end_before(tok.span.start), message))
}

fn is_word(token: &Token, word: &str) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

/// A token as an error message shows it.
pub(crate) fn describe(token: &Token) -> String {
    match token {
        Token::EOF => "the end of the file".to_string(),
        Token::SingleQuotedString(s) => format!("the string '{s}'"),
        Token::Number(n, _) => format!("the number {n}"),
        Token::Word(w) if w.quote_style.is_some() => format!("{w}"),
        other => format!("'{other}'"),
    }
}

/// Checks that every `in_segment` names a segment of the file and that the references
/// form no cycle. Walks statements in file order; a cycle is reported at the reference
/// that closes it.
fn check_references(segments: &[SegmentDef], refs: &[Vec<SegmentRef>]) -> Result<(), SegmentError> {
    let index: HashMap<&str, usize> = segments
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); segments.len()];
    for (i, stmt_refs) in refs.iter().enumerate() {
        for r in stmt_refs {
            let Some(&j) = index.get(r.name.as_str()) else {
                return Err(SegmentError::new(
                    r.pos,
                    format!("in_segment('{}') names no segment in this file", r.name),
                ));
            };
            if i == j {
                return Err(SegmentError::new(
                    r.pos,
                    format!(
                        "segment '{}' refers to itself through in_segment('{}')",
                        r.name, r.name
                    ),
                ));
            }
            edges[i].push(j);
            if let Some(mut cycle) = path(&edges, j, i) {
                // cycle is j -> … -> i; the new edge i -> j closes it.
                // Start the cycle at the segment that comes first in the file.
                let first = (0..cycle.len())
                    .min_by_key(|&k| cycle[k])
                    .unwrap_or_default();
                cycle.rotate_left(first);
                cycle.push(cycle[0]);
                let names: Vec<&str> = cycle.iter().map(|&k| segments[k].name.as_str()).collect();
                return Err(SegmentError::new(
                    r.pos,
                    format!("segments {} form a cycle", names.join(" -> ")),
                ));
            }
        }
    }
    Ok(())
}

/// A shortest path `from -> … -> to` in `edges`, if any (breadth first).
fn path(edges: &[Vec<usize>], from: usize, to: usize) -> Option<Vec<usize>> {
    let mut parent: Vec<Option<usize>> = vec![None; edges.len()];
    let mut seen = vec![false; edges.len()];
    let mut queue = VecDeque::from([from]);
    seen[from] = true;
    while let Some(n) = queue.pop_front() {
        if n == to {
            let mut out = vec![n];
            let mut cur = n;
            while let Some(prev) = parent[cur] {
                out.push(prev);
                cur = prev;
            }
            out.reverse();
            return Some(out);
        }
        for &m in &edges[n] {
            if !seen[m] {
                seen[m] = true;
                parent[m] = Some(n);
                queue.push_back(m);
            }
        }
    }
    None
}

/// The file's tokens with their positions, for statements and for error positions that
/// sqlparser's spans do not carry (operators, `NOT`, `TIMESTAMP`, `INTERVAL`).
pub(crate) struct Source<'a> {
    text: &'a str,
    /// Every token, whitespace and comments included, then an `EOF` token that carries
    /// the end-of-file position (so that sqlparser's errors at the end have one).
    tokens: Vec<TokenWithSpan>,
}

impl<'a> Source<'a> {
    fn new(text: &'a str) -> Result<Source<'a>, SegmentError> {
        let dialect = PostgreSqlDialect {};
        let mut tokens = Tokenizer::new(&dialect, text)
            .tokenize_with_location()
            .map_err(|e| {
                SegmentError::new(
                    Pos {
                        line: e.location.line.max(1),
                        column: e.location.column.max(1),
                    },
                    format!("syntax error: {}", lower_first(&e.message)),
                )
            })?;
        let end = end_location(text);
        tokens.push(TokenWithSpan::new(Token::EOF, Span::new(end, end)));
        Ok(Source { text, tokens })
    }

    /// The position of a sqlparser location (empty locations map to the file's end).
    pub(crate) fn pos(&self, loc: Location) -> Pos {
        if loc.line == 0 {
            return self.eof_pos();
        }
        Pos {
            line: loc.line,
            column: loc.column,
        }
    }

    fn eof_pos(&self) -> Pos {
        let end = end_location(self.text);
        Pos {
            line: end.line,
            column: end.column,
        }
    }

    fn index_at(&self, loc: Location) -> Option<usize> {
        self.tokens.iter().position(|t| t.span.start == loc)
    }

    /// Steps back `steps` tokens from the one starting at `loc`, skipping whitespace and
    /// opening parentheses: from an operand to its prefix operator or keyword.
    pub(crate) fn back(&self, loc: Location, steps: usize) -> Location {
        let Some(mut i) = self.index_at(loc) else {
            return loc;
        };
        for _ in 0..steps {
            loop {
                if i == 0 {
                    return self.tokens[0].span.start;
                }
                i -= 1;
                if !matches!(self.tokens[i].token, Token::Whitespace(_) | Token::LParen) {
                    break;
                }
            }
        }
        self.tokens[i].span.start
    }

    /// Up to `n` tokens before the one at `loc`, nearest first (whitespace skipped).
    fn before(&self, loc: Location, n: usize) -> Vec<&TokenWithSpan> {
        let i = self.index_at(loc).unwrap_or(self.tokens.len());
        self.tokens[..i]
            .iter()
            .rev()
            .filter(|t| !matches!(t.token, Token::Whitespace(_)))
            .take(n)
            .collect()
    }

    /// Where the last token before `loc` ends (whitespace and comments skipped).
    fn end_before(&self, loc: Location) -> Pos {
        match self.before(loc, 1).first() {
            Some(t) => self.pos(t.span.end),
            None => self.pos(loc),
        }
    }

    /// The run of identifier characters starting at `loc` (for messages).
    fn word_at(&self, loc: Location) -> String {
        let Some(line) = self.text.lines().nth(loc.line.saturating_sub(1) as usize) else {
            return String::new();
        };
        line.chars()
            .skip(loc.column.saturating_sub(1) as usize)
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    }

    /// "expected X, found Y" at the found token.
    fn expected(&self, what: &str, found: &TokenWithSpan) -> SegmentError {
        SegmentError::new(
            self.pos(found.span.start),
            format!("expected {what}, found {}", describe(&found.token)),
        )
    }

    /// Converts a sqlparser error; `at` is where the parser stood, used when the
    /// message carries no position.
    fn parser_error(&self, e: ParserError, at: &TokenWithSpan) -> SegmentError {
        let text = match e {
            ParserError::RecursionLimitExceeded => {
                return SegmentError::new(
                    self.pos(at.span.start),
                    "the condition is nested too deeply",
                )
            }
            ParserError::TokenizerError(s) | ParserError::ParserError(s) => s,
        };
        let (message, pos) = match text.rsplit_once(" at Line: ") {
            Some((msg, loc)) => {
                let mut nums = loc.split(", Column: ").map(|n| n.trim().parse::<u64>());
                match (nums.next(), nums.next()) {
                    (Some(Ok(line)), Some(Ok(column))) => (msg.to_string(), Pos { line, column }),
                    _ => (text.clone(), self.pos(at.span.start)),
                }
            }
            None => (text.clone(), self.pos(at.span.start)),
        };
        let message = match message.rsplit_once(", found: ") {
            Some((head, "EOF")) => format!("{head}, found the end of the file"),
            Some((head, token)) => format!("{head}, found '{token}'"),
            None => message,
        };
        let message = message.replace("Expected: ", "expected ");
        SegmentError::new(pos, format!("syntax error: {}", lower_first(&message)))
    }
}

/// The location just past the last character of `text` (1-based).
fn end_location(text: &str) -> Location {
    let line = text.matches('\n').count() as u64 + 1;
    let last = text.rsplit('\n').next().unwrap_or("");
    Location::new(line, last.chars().count() as u64 + 1)
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
