//! Liquid templates: loaded (syntax and variable checks), then rendered for one user.
#![no_main]
use herald_connectors::notify::template::Templates;
use herald_operators::journey::MessageAction;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let src = String::from_utf8_lossy(data);
    if let Ok(t) = Templates::from_sources([("t", src.as_ref())]) {
        let traits = serde_json::json!({"first_name": "Ada", "plan": "pro", "count": 3});
        let action = MessageAction {
            message_id: "m1".into(),
            journey: "j".into(),
            user_id: "u1".into(),
            instance: 1,
            step_path: "0".into(),
            variant: None,
            channel: "email".into(),
            template: "t".into(),
            address: Some("a@b.c".into()),
            traits: traits.as_object().cloned().unwrap_or_default(),
            event: Some(serde_json::json!({"properties": {"total": 12, "items": [{"sku": "a"}]}})),
            time: 1_700_000_000_000,
        };
        let _ = t.render(&action);
    }
});
