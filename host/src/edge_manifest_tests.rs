use serde_json::json;

use super::*;
use crate::config::Config;

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/edge")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn listed(m: &Mapped, path: &str) -> String {
    m.not_mapped
        .iter()
        .find(|n| n.path == path)
        .unwrap_or_else(|| panic!("{path} not listed: {:#?}", m.not_mapped))
        .reason
        .clone()
}

/// The TOML loads as a Holdfast config, and its router config is the one mapped.
fn loads(m: &Mapped) -> Config {
    let text = to_toml(m, "deployment.json");
    let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let router: Value = serde_json::to_value(&c.plugins.router.config).unwrap();
    assert_eq!(router, router_config(m), "{text}");
    c
}

#[test]
fn schema_1_0_routes_are_strings_with_the_lowest_priority() {
    let m = map(&fixture("deployment-1.0.json")).unwrap();
    assert_eq!(m.schema, "1.0");
    assert_eq!(m.routes.len(), 2);
    let r = &m.routes["sensorToFilter"];
    assert_eq!(
        r.route,
        "FROM /messages/modules/SimulatedTemperatureSensor/outputs/temperatureOutput INTO BrokeredEndpoint(\"/modules/filtermodule/inputs/input1\")"
    );
    assert_eq!((r.priority, r.ttl_seconds), (9, None));
    assert_eq!(m.outbox_ttl_seconds, Some(7200));
    assert!(m.cache_module.is_none() && m.sources.is_empty());
    // Everything else is listed, with the reason.
    assert!(listed(&m, "$edgeAgent.runtime").contains("no containers"));
    assert!(listed(&m, "$edgeAgent.systemModules.edgeHub").contains("ports 443/tcp, 5671/tcp, 8883/tcp"));
    assert!(listed(&m, "$edgeAgent.systemModules.edgeAgent").contains("no agent"));
    assert!(listed(&m, "$edgeAgent.modules.SimulatedTemperatureSensor").contains("custom module"));
    assert!(listed(&m, "$edgeAgent.modules.filtermodule").contains("myacr.azurecr.io/filtermodule"));
    assert!(
        listed(&m, "filtermodule.properties.desired")
            .contains(r#"set-desired <gateway>/filtermodule '{"TemperatureThreshold":25}'"#)
    );
    assert_eq!(m.not_mapped.len(), 6, "{:#?}", m.not_mapped);
    let c = loads(&m);
    assert_eq!(c.outbox.default_ttl_seconds, 7200);
    let text = to_toml(&m, "deployment.json");
    assert!(
        text.contains("# - $edgeAgent.modules.filtermodule: custom module"),
        "{text}"
    );
}

#[test]
fn schema_1_1_priorities_and_ttls_become_lanes_and_ttl_seconds() {
    let m = map(&fixture("deployment-1.1.json")).unwrap();
    assert_eq!(m.schema, "1.1");
    let lanes: Vec<(&str, u8, Option<u32>)> = m
        .routes
        .iter()
        .map(|(n, r)| (n.as_str(), r.priority, r.ttl_seconds))
        .collect();
    assert_eq!(
        lanes,
        [
            ("alerts", 0, Some(86400)),
            ("jsonFromFilter", 3, None),
            ("leafTelemetry", 5, Some(3600)),
            ("sensorToFilter", 9, None),
        ]
    );
    assert_eq!(m.outbox_ttl_seconds, Some(604_800));
    assert!(listed(&m, "$edgeAgent.systemModules.edgeHub").contains("ports 8883/tcp"));
    let c = loads(&m);
    assert_eq!(c.outbox.default_ttl_seconds, 604_800);
    assert_eq!(
        router_config(&m)["routes"]["alerts"],
        json!({
            "route": "FROM /messages/* WHERE $body.machine.temperature > 90 INTO $upstream",
            "priority": 0,
            "ttl_seconds": 86400,
        })
    );
}

#[test]
fn schema_1_2_with_connected_cache_maps_sources_size_parent_and_port() {
    let m = map(&fixture("deployment-1.2.json")).unwrap();
    assert_eq!(m.schema, "1.2");
    assert_eq!(m.routes["line7"].priority, 1);
    assert_eq!(m.routes["opcToParent"].ttl_seconds, Some(172_800));
    assert_eq!(m.cache_module.as_deref(), Some("ConnectedCache"));
    assert_eq!(m.cache_max_size, Some(75_000_000_000));
    assert_eq!(m.cache_parent.as_deref(), Some("http://10.0.0.4"));
    assert_eq!(m.cache_listen.as_deref(), Some("0.0.0.0:8081"));
    assert_eq!(m.cache_dir.as_deref(), Some("/mcc/cache1"));
    assert_eq!(
        m.sources,
        [
            MappedSource {
                name: "packages-contoso-com".into(),
                hosts: vec!["packages.contoso.com".into()],
                origin: "http://packages.contoso.com".into(),
            },
            MappedSource {
                name: "firmware-contoso-com".into(),
                hosts: vec!["firmware.contoso.com".into(), "10.0.0.9:8000".into()],
                origin: "http://10.0.0.9:8000".into(),
            },
        ]
    );
    for k in ["CUSTOMER_ID", "CACHE_NODE_ID", "CUSTOMER_KEY"] {
        assert!(listed(&m, &format!("$edgeAgent.modules.ConnectedCache.env.{k}")).contains("registration"));
    }
    assert!(listed(&m, "$edgeAgent.modules.ConnectedCache.env.IS_SUMMARY_PUBLIC").contains("status page"));
    assert!(
        listed(
            &m,
            "$edgeAgent.modules.ConnectedCache.settings.createOptions.HostConfig.PortBindings.5100/tcp"
        )
        .contains("one port")
    );
    assert!(listed(&m, "$edgeHub.mqttBroker").contains("auth plugin"));
    // Split create options are read whole.
    assert!(listed(&m, "$edgeAgent.modules.opcPublisher").contains("createOptions are not mapped"));
    let c = loads(&m);
    assert_eq!(c.cache.max_size, 75_000_000_000);
    assert_eq!(c.cache.parent.as_deref(), Some("http://10.0.0.4"));
    assert_eq!(c.cache.listen.to_string(), "0.0.0.0:8081");
    let cs: Value = serde_json::to_value(&c.plugins.content_source.config).unwrap();
    assert_eq!(cs, content_source_config(&m).unwrap());
}

#[test]
fn a_route_that_does_not_parse_is_an_error_naming_it() {
    let manifest = json!({ "modulesContent": { "$edgeHub": { "properties.desired": {
        "schemaVersion": "1.1",
        "routes": {
            "good": "FROM /messages/* INTO $upstream",
            "twin": "FROM /twinChangeNotifications INTO $upstream",
        },
    }}}});
    let e = map(&manifest).unwrap_err().to_string();
    assert!(e.starts_with("route \"twin\": column "), "{e}");
    assert!(e.ends_with("FROM /twinChangeNotifications INTO $upstream"), "{e}");
    let bad = |routes: Value| {
        map(&json!({ "modulesContent": { "$edgeHub": { "properties.desired": {
            "schemaVersion": "1.2", "routes": routes }}}}))
        .unwrap_err()
        .to_string()
    };
    assert_eq!(
        bad(json!({ "p": { "route": "FROM /* INTO $upstream", "priority": 12 } })),
        "route \"p\": priority 12: expected 0-9"
    );
    assert_eq!(
        bad(json!({ "p": { "priority": 1 } })),
        "route \"p\": an object route needs \"route\", a string"
    );
    assert_eq!(
        bad(json!({ "p": "FROM /* WHERE a = INTO $upstream" })),
        "route \"p\": column 19: expected a value, found keyword INTO: FROM /* WHERE a = INTO $upstream"
    );
    let e = map(&json!({ "modulesContent": { "$edgeHub": { "properties.desired": { "schemaVersion": "2.0" }}}}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("1.0, 1.1 and 1.2"), "{e}");
    assert!(
        map(&json!({ "nothing": 1 }))
            .unwrap_err()
            .to_string()
            .contains("modulesContent")
    );
}

#[test]
fn layered_route_keys_are_read_and_unknown_fields_are_listed() {
    let manifest = json!({ "modulesContent": { "$edgeHub": {
        "properties.desired.routes.extra": { "route": "FROM /messages/* INTO $upstream", "priority": 4, "colour": "red" },
        "properties.desired.schemaVersion": "1.1",
    }}});
    let m = map(&manifest).unwrap();
    assert_eq!(m.routes["extra"].priority, 4);
    assert_eq!(listed(&m, "$edgeHub.routes.extra.colour"), "an unknown route field");
    assert!(m.notes.iter().any(|n| n.contains("no $edgeAgent")));
}
