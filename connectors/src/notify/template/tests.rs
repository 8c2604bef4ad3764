//! Templates: load checks with their exact messages, and rendering.

use super::*;

fn action(template: &str, event: Option<Json>) -> MessageAction {
    let mut traits = Map::new();
    traits.insert("first_name".into(), json!("Ada"));
    traits.insert("plan".into(), json!("pro"));
    MessageAction {
        message_id: "m1".into(),
        journey: "cart".into(),
        user_id: "u1".into(),
        instance: 2,
        step_path: "steps[0]".into(),
        variant: None,
        channel: "email".into(),
        template: template.into(),
        address: Some("ada@example.com".into()),
        traits,
        event,
        time: 0,
    }
}

fn err(src: &str) -> String {
    Templates::from_sources([("t", src)])
        .unwrap_err()
        .to_string()
}

fn render(src: &str, event: Option<Json>) -> Rendered {
    Templates::from_sources([("t", src)])
        .unwrap()
        .render(&action("t", event))
        .unwrap()
}

#[test]
fn errors_name_the_file_the_line_and_the_problem() {
    let cases = [
        (
            "a\n{% if traits.vip %}\nb",
            "t.liquid:3: syntax error: Unclosed block. {% endif %} tag expected.",
        ),
        (
            "a\nb {{ traits.x | nofilter }}",
            "t.liquid:2: Unknown filter; with:; requested filter=nofilter",
        ),
        ("a\n\n{{ traits.x ", "t.liquid:3: syntax error: expected"),
        (
            "hello\n{{ trait.first_name }}",
            "t.liquid:2: unknown variable 'trait' (the template sees user, traits, event, journey, message)",
        ),
        (
            "{{ user.idd }}",
            "t.liquid:1: unknown variable 'user.idd' (user has: id)",
        ),
        (
            "x\n{% if journey.nam == 'a' %}y{% endif %}",
            "t.liquid:2: unknown variable 'journey.nam' (journey has: name, variant, step, instance)",
        ),
        (
            "{{ traits.a | default: fallback }}",
            "t.liquid:1: unknown variable 'fallback'",
        ),
        (
            "{{ event.properties.items[idx] }}",
            "t.liquid:1: unknown variable 'idx'",
        ),
        (
            "---\nsubject: Hi {{ nme }}\n---\nbody",
            "t.liquid:2: unknown variable 'nme'",
        ),
        (
            "---\nsubject: Hi\n---\nline 4\n{{ oops }}",
            "t.liquid:5: unknown variable 'oops'",
        ),
        (
            "---\ntitle: x\n---\nbody",
            "t.liquid:2: front matter: unknown key 'title' (only subject)",
        ),
        ("---\nsubject: x\n", "t.liquid:1: front matter: no closing `---`"),
        (
            "---\nsubject: x\nbody",
            "t.liquid:3: front matter: 'body' is not `key: value`",
        ),
    ];
    for (src, want) in cases {
        let got = err(src);
        assert!(got.starts_with(want), "{src:?}\n got: {got}\nwant: {want}");
    }
    let bad = Templates::from_sources([("no way", "x")]).unwrap_err();
    assert!(
        bad.to_string()
            .starts_with("no way.liquid: a template name"),
        "{bad}"
    );
}

#[test]
fn names_the_template_binds_are_not_unknown() {
    let src = "{% assign n = traits.first_name | upcase %}{{ n }}\
               {% capture c %}x{% endcapture %}{{ c }}\
               {% for p in event.properties.products limit: 2 %}{{ p.name }}{{ forloop.index }}{% endfor %}\
               {% increment k %}{{ k }}\
               {% raw %}{{ not_checked }}{% endraw %}\
               {% comment %}{{ nor_this }}{% endcomment %}\
               {% if traits.plan == 'pro' and traits.vip != true %}P{% endif %}\
               {{ 'literal' | append: traits.plan }}{% for i in (1..3) %}{{ i }}{% endfor %}";
    Templates::from_sources([("t", src)]).unwrap();
}

#[test]
fn missing_keys_beneath_traits_and_event_render_as_nothing() {
    let r = render(
        "{{ traits.missing }}|{{ traits.missing | default: \"x\" }}|{% if traits.vip %}v{% else %}n{% endif %}|{{ traits.first_name }}",
        None,
    );
    assert_eq!(r.body, "|x|n|Ada");
    let ev = json!({"event": "Cart", "properties": {"items": [{"name": "hat"}], "products": [{"name": "a"}, {"name": "b"}]}});
    let r = render(
        "{{ event.properties.items[0].name }};{% for p in event.properties.products %}{{ p.name }}{% endfor %};{{ event.properties.total | default: 0 }}",
        Some(ev),
    );
    assert_eq!(r.body, "hat;ab;0");
    // No event (a segment or API trigger): event.* is empty too.
    let r = render("[{{ event.properties.total }}]", None);
    assert_eq!(r.body, "[]");
}

#[test]
fn journey_user_and_message_fields_and_the_subject() {
    let r = render(
        "---\nsubject: \"{{ traits.first_name }}, {{ journey.name }}\"\n---\n{{ user.id }} {{ message.id }} {{ message.channel }} {{ journey.step }} {{ journey.instance }} [{{ journey.variant }}]\n",
        None,
    );
    assert_eq!(r.subject.as_deref(), Some("Ada, cart"));
    assert_eq!(r.body, "u1 m1 email steps[0] 2 []");
    let t = Templates::from_sources([("a", "x"), ("b", "---\nsubject: s\n---\ny")]).unwrap();
    assert!(!t.has_subject("a") && t.has_subject("b"));
    assert_eq!(t.names().collect::<Vec<_>>(), ["a", "b"]);
    assert!(matches!(
        t.render(&action("c", None)),
        Err(TemplateError::UnknownTemplate(n)) if n == "c"
    ));
}

#[test]
fn a_directory_loads_liquid_files_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("welcome.liquid"),
        "Hi {{ traits.first_name }}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("cart_sms.liquid"), "Cart!").unwrap();
    std::fs::write(dir.path().join("README.md"), "{{ not a template").unwrap();
    let t = Templates::load(dir.path()).unwrap();
    assert_eq!(t.names().collect::<Vec<_>>(), ["cart_sms", "welcome"]);
    assert_eq!(t.render(&action("welcome", None)).unwrap().body, "Hi Ada");
    std::fs::write(dir.path().join("bad.liquid"), "ok\n{{ who }}").unwrap();
    let e = Templates::load(dir.path()).unwrap_err().to_string();
    assert!(e.ends_with("bad.liquid:2: unknown variable 'who' (the template sees user, traits, event, journey, message)"), "{e}");
    let e = Templates::load(&dir.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn templates_are_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Templates>();
}

#[test]
fn cut_templates_never_panic() {
    let src = "---\nsubject: \"Hi {{ traits.first_name | default: 'x' }}\"\n---\n{% if event.properties.total > 10 %}{% for p in event.properties.products %}{{ p['name'] | upcase }}{% endfor %}{% else %}{{ user.id }}{% endif %}\n{% raw %}{{ x }}{% endraw %}";
    for (i, _) in src.char_indices() {
        let cut = &src[..i];
        if let Ok(t) = Templates::from_sources([("t", cut)]) {
            let _ = t.render(&action(
                "t",
                Some(json!({"properties": {"total": 20, "products": [{"name": "a"}]}})),
            ));
        }
        let _ = scan(cut);
        let _ = scan(&src[i..]);
    }
}
