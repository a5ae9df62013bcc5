//! The route language against messages: parsing, errors, evaluation.

use super::*;
use holdfast_sdk::iothub;
use holdfast_sdk::router::Message;

fn msg(topic: &str, props: &[(&str, &str)], body: &str) -> Message<'static> {
    let mut b = Message::builder(topic).payload(body.as_bytes().to_vec());
    for (k, v) in props {
        b = b.property(*k, *v);
    }
    b.build()
}

fn holds(cond: &str, m: &Message<'_>) -> bool {
    let r = parse(&format!("FROM /* WHERE {cond} INTO $upstream")).unwrap_or_else(|e| panic!("{cond}: {e}"));
    View::new(m).matches(&r)
}

#[test]
fn conditions_cover_properties_body_and_functions() {
    let m = msg(
        "devices/d1/messages/events/",
        &[
            ("$.ct", "application/json"),
            ("$.mid", "m-1"),
            ("temperature", "35"),
            ("site", "Plant 7"),
        ],
        r#"{"temp": {"value": 21.5, "unit": "C"}, "tags": ["a", "b"], "list": [{}, {"k": 2}], "ok": true, "none": null}"#,
    );
    let yes = [
        "temperature > 30",
        "temperature = 35 AND site = 'Plant 7'",
        "$contentType = 'application/json'",
        "$messageId = \"m-1\"",
        "$connectionDeviceId = 'd1'",
        "$body.temp.value >= 21.5 AND $body.temp.unit = 'C'",
        "$body.tags.1 = 'b' AND $body.list.1.k = 2",
        "$body.ok = true",
        "IS_NULL($body.none)",
        "NOT IS_DEFINED($body.missing)",
        "NOT (temperature < 30)",
        "temperature < 30 OR site <> 'x'",
        "LOWER(site) = 'plant 7' AND UPPER(site) = 'PLANT 7'",
        "LENGTH(site) = 7 AND STARTS_WITH(site, 'Pla') AND ENDS_WITH(site, ' 7') AND CONTAINS(site, 'ant')",
        "SUBSTRING(site, 6) = '7' AND SUBSTRING(site, 0, 5) = 'Plant' AND INDEX_OF(site, 't') = 4",
        "CONCAT(site, '-', 1) = 'Plant 7-1'",
        "temperature * 2 - 10 = 60 AND temperature % 10 = 5 AND -temperature = -35",
        "ABS(-2) = 2 AND FLOOR(2.7) = 2 AND CEILING(2.1) = 3",
        "[site] = 'Plant 7'",
        "$topic = 'devices/d1/messages/events/'",
        "TRIM('  x ') = 'x' AND LTRIM(' x') = 'x' AND RTRIM('x ') = 'x'",
        "1e3 = 1000 AND .5 = 0.5",
        "'it''s' = \"it's\"",
    ];
    for c in yes {
        assert!(holds(c, &m), "{c} should hold");
    }
    let no = [
        "temperature > 40",
        "missing = 1",
        "NOT missing = 1",
        "missing = 1 OR false",
        "site > 3",
        "$body.ok > false",
        "$connectionModuleId = 'x'",
        "1 / 0 = 1",
        "IS_STRING($body.temp)",
    ];
    for c in no {
        assert!(!holds(c, &m), "{c} should not hold");
    }
    // Three-valued logic: undefined OR true is true; undefined AND false is false.
    assert!(holds("missing = 1 OR true", &m));
    assert!(holds("NOT (missing = 1 AND false)", &m));
    // A body that is not JSON leaves body fields undefined.
    assert!(holds("NOT IS_DEFINED($body.x)", &msg("a", &[], "not json")));
}

#[test]
fn sources_classify_dialect_and_plain_topics() {
    let dev = msg("devices/d/messages/events/a=1", &[], "");
    let modm = msg("devices/d/modules/m/messages/events/", &[("$.on", "out1")], "");
    let out = msg("devices/d/modules/m/outputs/o2", &[], "");
    let plain = msg("plant/7/temp", &[], "");
    let src = |s: &str| parse(&format!("FROM {s} INTO $upstream")).unwrap().source;
    let table: [(&str, [bool; 4]); 8] = [
        ("/*", [true, true, true, true]),
        ("/messages/*", [true, true, true, false]),
        ("/messages/modules/*", [false, true, true, false]),
        ("/messages/modules/m/*", [false, true, true, false]),
        ("/messages/modules/m/outputs/*", [false, true, true, false]),
        ("/messages/modules/m/outputs/out1", [false, true, false, false]),
        ("/messages/modules/m/outputs/o2", [false, false, true, false]),
        ("/topics/plant/+/temp", [false, false, false, true]),
    ];
    for (s, want) in table {
        let got: Vec<bool> = [&dev, &modm, &out, &plain]
            .iter()
            .map(|m| View::new(m).from(&src(s)))
            .collect();
        assert_eq!(got, want, "{s}");
    }
    assert_eq!(View::new(&modm).sys(Sys::OutputName), Value::Str("out1".into()));
}

#[test]
fn sinks_parse() {
    let sink = |s: &str| parse(&format!("FROM /* INTO {s}")).map(|r| r.sink);
    assert_eq!(sink("$upstream"), Ok(Sink::Upstream));
    assert_eq!(sink("$Local"), Ok(Sink::Local));
    assert_eq!(
        sink("BrokeredEndpoint(\"/modules/filter/inputs/in1\")"),
        Ok(Sink::Input {
            device: None,
            module: "filter".into(),
            input: "in1".into()
        })
    );
    assert_eq!(
        sink("brokeredendpoint('/devices/gw/modules/f/inputs/i')"),
        Ok(Sink::Input {
            device: Some("gw".into()),
            module: "f".into(),
            input: "i".into()
        })
    );
    assert_eq!(sink("topic('alerts/all')"), Ok(Sink::Topic("alerts/all".into())));
}

use proptest::prelude::*;

/// Route-like text: keywords, operators, names, quotes and noise.
fn route_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("FROM ".to_string()),
        Just("/messages/* ".to_string()),
        Just("/topics/a/+ ".to_string()),
        Just(" WHERE ".to_string()),
        Just(" INTO $upstream".to_string()),
        Just(" AND ".to_string()),
        Just(" OR ".to_string()),
        Just("NOT ".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just("$body.a.0".to_string()),
        Just("SUBSTRING(".to_string()),
        Just(",".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("[".to_string()),
        Just("-".to_string()),
        Just(".5e".to_string()),
        "[=<>!+*/%]{1,2}",
        "[a-zA-Z_$]{1,8}",
        "[0-9.]{1,6}",
        any::<char>().prop_map(|c| c.to_string()),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any text either parses or is refused with a column inside it (or
    /// just past its end); a route that parses evaluates without panicking.
    #[test]
    fn parsing_and_evaluating_never_panic(text in route_text(), body in "[ -~]{0,40}", prop in "[ -~]{0,12}") {
        match parse(&text) {
            Ok(route) => {
                let m = msg("devices/d/messages/events/", &[("a", &prop), ("$.ct", "application/json")], &body);
                let _ = View::new(&m).matches(&route);
            }
            Err(e) => prop_assert!(e.column >= 1 && e.column <= text.chars().count() + 1, "{e} in {text:?}"),
        }
    }

    /// Bags survive encoding, and any text either parses as a bag or is refused.
    #[test]
    fn property_bags_round_trip(pairs in proptest::collection::vec(("\\PC{1,8}", "\\PC{0,8}"), 0..6), raw in "\\PC{0,40}") {
        prop_assert_eq!(iothub::parse_bag(&iothub::encode_bag(&pairs)).unwrap(), pairs);
        let _ = iothub::parse_bag(&raw);
    }
}

#[test]
fn bad_routes_name_the_column_and_the_reason() {
    let cases = [
        ("SELECT * INTO $upstream", 1, "a route starts with FROM"),
        ("FROM /messages INTO $upstream", 6, "unknown source `/messages`"),
        ("FROM /topics/a/#/b INTO $upstream", 6, "`#` must be a whole last level"),
        ("FROM /* WHER x = 1 INTO $upstream", 9, "expected WHERE or INTO"),
        (
            "FROM /* WHERE x = INTO $upstream",
            19,
            "expected a value, found keyword INTO",
        ),
        ("FROM /* WHERE x = 'abc INTO $upstream", 19, "no closing quote"),
        ("FROM /* WHERE (x = 1 INTO $upstream", 22, "expected `)`"),
        ("FROM /* WHERE x = 1", 20, "expected INTO or an operator, found the end"),
        (
            "FROM /* WHERE $nope = 1 INTO $upstream",
            15,
            "unknown system property `$nope`",
        ),
        (
            "FROM /* WHERE LOWR(x) = 'a' INTO $upstream",
            15,
            "unknown function `LOWR`",
        ),
        (
            "FROM /* WHERE LOWER(x, y) = 'a' INTO $upstream",
            15,
            "LOWER takes 1 argument(s), got 2",
        ),
        ("FROM /* WHERE x # 1 INTO $upstream", 17, "unexpected character `#`"),
        ("FROM /* INTO $cloud", 14, "expected a sink"),
        (
            "FROM /* INTO BrokeredEndpoint(\"/modules/m\")",
            31,
            "BrokeredEndpoint takes",
        ),
        ("FROM /* INTO topic('a/+')", 20, "without wildcards"),
        ("FROM /* INTO $upstream extra", 24, "unexpected `extra` after the sink"),
        (
            "FROM /* WHERE x = 1 2 INTO $upstream",
            21,
            "expected INTO or an operator, found number 2",
        ),
    ];
    for (text, column, reason) in cases {
        let e = parse(text).err().unwrap_or_else(|| panic!("{text} accepted"));
        assert!(e.reason.contains(reason), "{text}: {e}");
        assert_eq!(e.column, column, "{text}: {e}");
    }
    let deep = format!(
        "FROM /* WHERE {}x = 1{} INTO $upstream",
        "(".repeat(100),
        ")".repeat(100)
    );
    assert!(parse(&deep).unwrap_err().reason.contains("deeper than"));
    let nots = format!("FROM /* WHERE {} x = 1 INTO $upstream", "NOT ".repeat(100));
    assert!(parse(&nots).unwrap_err().reason.contains("deeper than"));
}
