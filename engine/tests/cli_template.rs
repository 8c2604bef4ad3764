//! `herald template render` and `herald check --templates` as a user runs them.

mod common;

use std::process::Command;
use std::time::Duration;

fn herald(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn render_previews_a_template_for_a_user_and_check_validates_sends() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("templates");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(
        t.join("cart.liquid"),
        "---\nsubject: \"{{ traits.first_name | default: 'Hi' }}, your cart\"\n---\n{{ event.properties.total }} EUR for {{ user.id }} ({{ journey.name }})\n",
    )
    .unwrap();
    let tdir = t.to_str().unwrap();
    let (code, out, err) = herald(&[
        "template",
        "render",
        "cart",
        "--user",
        "u1",
        "--templates",
        tdir,
        "--traits",
        r#"{"first_name":"Ada"}"#,
        "--event",
        r#"{"event":"Cart Abandoned","properties":{"total":42}}"#,
        "--journey",
        "abandoned",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "Subject: Ada, your cart\n\n42 EUR for u1 (abandoned)\n"
    );
    // Missing traits render as nothing (or their default).
    let (code, out, _) = herald(&[
        "template",
        "render",
        "cart",
        "--user",
        "u2",
        "--templates",
        tdir,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out, "Subject: Hi, your cart\n\n EUR for u2 (preview)\n");
    let (code, _, err) = herald(&[
        "template",
        "render",
        "nope",
        "--user",
        "u1",
        "--templates",
        tdir,
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("no template 'nope'"), "{err}");
    let (code, _, err) = herald(&[
        "template",
        "render",
        "cart",
        "--user",
        "u1",
        "--templates",
        tdir,
        "--traits",
        "[1]",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--traits: must be a JSON object"), "{err}");

    // A template with an unknown variable: the file and line.
    std::fs::write(t.join("bad.liquid"), "ok\n{{ usr.id }}\n").unwrap();
    let (code, _, err) = herald(&[
        "template",
        "render",
        "cart",
        "--user",
        "u1",
        "--templates",
        tdir,
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.liquid:2: unknown variable 'usr' (the template sees user, traits, event, journey, message)"),
        "{err}"
    );
    std::fs::remove_file(t.join("bad.liquid")).unwrap();

    // check: journeys' sends against the templates.
    std::fs::write(
        dir.path().join("segments.sql"),
        "CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("journeys.yaml"),
        "journey: j\nentry: { event: Cart Abandoned }\nsteps:\n  - send: { channel: email, template: cart }\n  - send: { channel: sms, template: cart_sms }\n",
    )
    .unwrap();
    let seg = dir.path().join("segments.sql");
    let jy = dir.path().join("journeys.yaml");
    let args = [
        "check",
        seg.to_str().unwrap(),
        "--journeys",
        jy.to_str().unwrap(),
        "--templates",
        tdir,
    ];
    let (code, _, err) = herald(&args);
    assert_eq!(code, 2);
    assert!(
        err.contains("journeys.yaml: journey 'j': steps[1].send: unknown template 'cart_sms'"),
        "{err}"
    );
    std::fs::write(
        t.join("cart_sms.liquid"),
        "Cart: {{ event.properties.total }}\n",
    )
    .unwrap();
    let (code, out, err) = herald(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok, 2 template(s): cart, cart_sms"), "{out}");
}

#[test]
fn render_reads_traits_from_a_running_herald() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("segments.sql"),
        "CREATE SEGMENT named AS first_name IS NOT NULL;\n",
    )
    .unwrap();
    let t = dir.path().join("templates");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(
        t.join("hi.liquid"),
        "Hi {{ traits.first_name }} ({{ user.id }})\n",
    )
    .unwrap();
    let mut h = common::Herald::start(
        dir.path(),
        "[engine]\nsegments = \"segments.sql\"\n[http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\n",
    );
    // A user id that needs escaping in the URL path.
    let (status, _) = h.post(
        "/v1/identify",
        "wk",
        r#"{"userId":"a b/c","traits":{"first_name":"Ada"}}"#,
    );
    assert_eq!(status, 200);
    h.wait_for("the identify", Duration::from_secs(30), |h| {
        h.size("named") == 1
    });
    let server = h.admin.clone();
    let tdir = t.to_str().unwrap();
    let (code, out, err) = herald(&[
        "template",
        "render",
        "hi",
        "--user",
        "a b/c",
        "--templates",
        tdir,
        "--server",
        &server,
        "--key",
        common::READ_KEY,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "Hi Ada (a b/c)\n");
    let nobody = [
        "template",
        "render",
        "hi",
        "--user",
        "nobody",
        "--templates",
        tdir,
    ];
    let (code, _, err) = herald(&[&nobody[..], &["--server", &server]].concat());
    assert_eq!(code, 2);
    assert!(err.contains("wants a read key"), "{err}");
    let with_key = ["--server", &server, "--key", common::READ_KEY];
    let (code, _, err) = herald(&[&nobody[..], &with_key].concat());
    assert_eq!(code, 2);
    assert!(err.contains("no user 'nobody'"), "{err}");
    assert!(h.stop().success());
}
