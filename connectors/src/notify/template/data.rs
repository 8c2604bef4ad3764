//! The data a template sees, as liquid-rust values over which a missing key is nil (at
//! any depth, and nil's own keys are nil) as in Shopify Liquid and Braze; liquid-rust's
//! own values fail on a missing key.
//!
//! liquid copies a value into its own types (`to_value`) when it looks a variable up, so
//! the leniency covers paths from the roots (`traits.a.b`, `event.items[3].name`). Loop
//! and `assign` variables hold liquid's values, strict again: the key paths the template
//! reads through them are filled with nil beforehand ([`fill`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use herald_operators::journey::MessageAction;
use liquid::model::{DisplayCow, KString, KStringCow, Scalar, ScalarCow, State, Value};
use liquid::{ObjectView, ValueView};
use serde_json::{Map, Value as Json};

use super::scan::Seg;

/// The globals of a render: `user`, `traits`, `event`, `journey`, `message`, and the
/// template's `assigned` names as nil; `fills` filled in, `reads` being the paths the
/// template reads as values.
pub(super) fn globals<'a>(
    action: &MessageAction,
    assigned: impl Iterator<Item = &'a String>,
    fills: impl Iterator<Item = &'a Vec<Seg>>,
    reads: &BTreeSet<&[Seg]>,
) -> Data {
    let mut traits = Data::object(&action.traits);
    let mut event = action.event.as_ref().map_or(Data::Nil, Data::from);
    for path in fills {
        let mut at = path[..1].to_vec();
        match path.split_first() {
            Some((Seg::Key(r), rest)) if r == "traits" => fill(&mut traits, rest, &mut at, reads),
            Some((Seg::Key(r), rest)) if r == "event" => fill(&mut event, rest, &mut at, reads),
            _ => {}
        }
    }
    let text = |s: &str| Data::Scalar(Scalar::new(s.to_string()));
    let object = |kv: Vec<(&str, Data)>| {
        Data::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    };
    let mut globals: BTreeMap<String, Data> = assigned.map(|n| (n.clone(), Data::Nil)).collect();
    let instance = Data::Scalar(Scalar::new(i64::from(action.instance)));
    let roots = [
        ("user", object(vec![("id", text(&action.user_id))])),
        ("traits", traits),
        ("event", event),
        (
            "journey",
            object(vec![
                ("name", text(&action.journey)),
                ("variant", action.variant.as_deref().map_or(Data::Nil, text)),
                ("step", text(&action.step_path)),
                ("instance", instance),
            ]),
        ),
        (
            "message",
            object(vec![
                ("id", text(&action.message_id)),
                ("channel", text(&action.channel)),
                ("template", text(&action.template)),
            ]),
        ),
    ];
    globals.extend(roots.into_iter().map(|(k, v)| (k.to_string(), v)));
    Data::Object(globals)
}

/// The action with every string of the user's data (`user.id`, traits, the event)
/// HTML-escaped, for an HTML email.
pub(super) fn html_escaped(action: &MessageAction) -> MessageAction {
    fn escape(v: &mut Json) {
        match v {
            Json::String(s) => *s = escape_text(s),
            Json::Array(a) => a.iter_mut().for_each(escape),
            Json::Object(m) => m.values_mut().for_each(escape),
            _ => {}
        }
    }
    let mut a = action.clone();
    a.user_id = escape_text(&a.user_id);
    a.traits.values_mut().for_each(escape);
    if let Some(e) = &mut a.event {
        escape(e);
    }
    a
}

fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Sets `message.click_url` (when the template has a link) and `message.open_url`.
pub(super) fn set_links(globals: &mut Data, click: Option<String>, open: String) {
    let Data::Object(g) = globals else { return };
    let Some(Data::Object(m)) = g.get_mut("message") else {
        return;
    };
    if let Some(c) = click {
        m.insert("click_url".into(), Data::Scalar(Scalar::new(c)));
    }
    m.insert("open_url".into(), Data::Scalar(Scalar::new(open)));
}

/// A value a template sees.
#[derive(Debug)]
pub(super) enum Data {
    Nil,
    Scalar(Scalar),
    Array(Vec<Data>),
    Object(BTreeMap<String, Data>),
}

static NIL: Data = Data::Nil;

impl Data {
    fn object(m: &Map<String, Json>) -> Data {
        Data::Object(m.iter().map(|(k, v)| (k.clone(), Data::from(v))).collect())
    }
}

impl From<&Json> for Data {
    fn from(v: &Json) -> Data {
        match v {
            Json::Null => Data::Nil,
            Json::Bool(b) => Data::Scalar(Scalar::new(*b)),
            Json::Number(n) => Data::Scalar(match n.as_i64() {
                Some(i) => Scalar::new(i),
                None => Scalar::new(n.as_f64().unwrap_or(f64::NAN)),
            }),
            Json::String(s) => Data::Scalar(Scalar::new(s.clone())),
            Json::Array(a) => Data::Array(a.iter().map(Data::from).collect()),
            Json::Object(m) => Data::object(m),
        }
    }
}

/// Sets `path` (beneath `d`, which `at` reaches) to nil where it is missing, through
/// every element at [`Seg::Each`]. On the way, a missing or nil key (or an absent
/// `event`) becomes an empty object so that the keys below it can be filled, unless the
/// template reads that key's value itself (`reads`): it stays nil then, so that
/// `{% if p.dims %}` stays false.
fn fill(d: &mut Data, path: &[Seg], at: &mut Vec<Seg>, reads: &BTreeSet<&[Seg]>) {
    let Some((seg, rest)) = path.split_first() else {
        return;
    };
    if matches!(d, Data::Nil) && !reads.contains(at.as_slice()) && *seg != Seg::Each {
        *d = Data::Object(BTreeMap::new());
    }
    at.push(seg.clone());
    match (seg, d) {
        (Seg::Each, Data::Array(items)) => items.iter_mut().for_each(|i| fill(i, rest, at, reads)),
        // `size` of an object is its key count, which a nil key would hide.
        (Seg::Key(k), Data::Object(m)) if k != "size" => {
            fill(m.entry(k.clone()).or_insert(Data::Nil), rest, at, reads)
        }
        _ => {}
    }
    at.pop();
}

/// `Display` of an owned liquid value.
struct Shown(Value, bool);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 {
            write!(f, "{}", self.0.render())
        } else {
            write!(f, "{}", self.0.source())
        }
    }
}

impl ValueView for Data {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        match self {
            Data::Nil => DisplayCow::Borrowed(&""),
            Data::Scalar(s) => s.render(),
            _ => DisplayCow::Owned(Box::new(Shown(self.to_value(), true))),
        }
    }
    fn source(&self) -> DisplayCow<'_> {
        match self {
            Data::Scalar(s) => s.source(),
            _ => DisplayCow::Owned(Box::new(Shown(self.to_value(), false))),
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            Data::Nil => "nil",
            Data::Scalar(s) => s.type_name(),
            Data::Array(_) => "array",
            Data::Object(_) => "object",
        }
    }
    fn query_state(&self, state: State) -> bool {
        match self {
            Data::Nil => state != State::Truthy,
            Data::Scalar(s) => s.query_state(state),
            Data::Array(a) => state == State::Truthy || a.is_empty(),
            Data::Object(m) => state == State::Truthy || m.is_empty(),
        }
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        match self {
            Data::Scalar(s) => s.to_kstr(),
            _ => KStringCow::from_string(self.render().to_string()),
        }
    }
    fn to_value(&self) -> Value {
        match self {
            Data::Nil => Value::Nil,
            Data::Scalar(s) => Value::Scalar(s.clone()),
            Data::Array(a) => Value::Array(a.iter().map(ValueView::to_value).collect()),
            Data::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| (KString::from_ref(k), v.to_value()))
                    .collect(),
            ),
        }
    }
    fn as_scalar(&self) -> Option<ScalarCow<'_>> {
        match self {
            Data::Scalar(s) => Some(s.as_ref()),
            _ => None,
        }
    }
    fn as_array(&self) -> Option<&dyn liquid::model::ArrayView> {
        matches!(self, Data::Array(_)).then_some(self as &dyn liquid::model::ArrayView)
    }
    fn as_object(&self) -> Option<&dyn ObjectView> {
        // Nil is an object too, so that a path can go on through it (to nil).
        matches!(self, Data::Object(_) | Data::Nil).then_some(self as &dyn ObjectView)
    }
    fn is_nil(&self) -> bool {
        matches!(self, Data::Nil)
    }
}

impl ObjectView for Data {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        match self {
            Data::Object(m) => m.len() as i64,
            _ => 0,
        }
    }
    fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
        Box::new(self.entries().map(|(k, _)| KStringCow::from_ref(k)))
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        Box::new(self.entries().map(|(_, v)| v as &dyn ValueView))
    }
    fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
        Box::new(
            self.entries()
                .map(|(k, v)| (KStringCow::from_ref(k), v as &dyn ValueView)),
        )
    }
    fn contains_key(&self, index: &str) -> bool {
        matches!(self, Data::Object(m) if m.contains_key(index))
    }
    fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
        match self {
            Data::Object(m) if m.contains_key(index) => m.get(index).map(|v| v as &dyn ValueView),
            // liquid answers `size` itself when the object has no such key.
            Data::Object(_) if index == "size" => None,
            _ => Some(&NIL),
        }
    }
}

impl Data {
    fn entries(&self) -> impl Iterator<Item = (&str, &Data)> {
        let m = match self {
            Data::Object(m) => Some(m),
            _ => None,
        };
        m.into_iter().flatten().map(|(k, v)| (k.as_str(), v))
    }
}

// Not imported: liquid implements `ArrayView` for `Vec`, whose `get` would shadow the
// slice's.
impl liquid::model::ArrayView for Data {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        match self {
            Data::Array(a) => a.len() as i64,
            _ => 0,
        }
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        let a = match self {
            Data::Array(a) => a.as_slice(),
            _ => &[],
        };
        Box::new(a.iter().map(|v| v as &dyn ValueView))
    }
    fn contains_key(&self, index: i64) -> bool {
        self.element(index).is_some()
    }
    fn get(&self, index: i64) -> Option<&dyn ValueView> {
        // Past the end is nil too (`items[5]`, `first` of an empty array).
        Some(self.element(index).unwrap_or(&NIL))
    }
}

impl Data {
    /// The element at `index`, counting from the end when negative.
    fn element(&self, index: i64) -> Option<&Data> {
        let Data::Array(a) = self else { return None };
        let i = if index < 0 {
            index.checked_add(a.len() as i64)?
        } else {
            index
        };
        usize::try_from(i).ok().and_then(|i| a.get(i))
    }
}
