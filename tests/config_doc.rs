//! docs/config.md and the parser agree: for every table, the keys the parser accepts (as its
//! own "unknown field" error lists them) are exactly the keys the doc's table for it documents.
//! No root needed.

use std::collections::BTreeSet;

/// The keys the parser accepts in the table that `prefix` opens, from the error it gives for an
/// unknown key there.
fn accepted(prefix: &str) -> BTreeSet<String> {
    let text = format!("{prefix}\nxdpvs_no_such_key = 1\n");
    let e = xdpvs::config::Config::parse(&text, std::path::Path::new("t.toml"))
        .expect_err("an unknown key is refused")
        .to_string();
    let list = e
        .split("expected one of")
        .nth(1)
        .unwrap_or_else(|| panic!("no key list in: {e}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The keys of the doc's table under the heading that starts with `heading`.
fn documented(doc: &str, heading: &str) -> BTreeSet<String> {
    let start = doc
        .find(&format!("\n## {heading}"))
        .unwrap_or_else(|| panic!("no section {heading} in docs/config.md"));
    let rest = &doc[start + 4..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    rest[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_key_is_documented_and_every_documented_key_exists() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.md"))
        .expect("docs/config.md");
    let d = "[director]\ninterface = \"eth0\"";
    let s = "[[service]]\nname = \"a\"\naddress = \"198.18.0.100:80\"";
    let tables = [
        ("Top level", String::new()),
        ("`[director]`", "[director]".to_string()),
        ("`[director.timeouts]`", format!("{d}\n[director.timeouts]")),
        ("`[[service]]`", format!("{d}\n[[service]]")),
        ("`[service.check]`", format!("{d}\n{s}\n[service.check]")),
        ("`[[service.real]]`", format!("{d}\n{s}\n[[service.real]]")),
        ("`[[vrrp]]`", format!("{d}\n[[vrrp]]")),
        ("`[sync]`", format!("{d}\n[sync]")),
    ];
    for (heading, prefix) in tables {
        let parser = accepted(&prefix);
        let docs = documented(&doc, heading);
        let missing: Vec<_> = parser.difference(&docs).collect();
        let extra: Vec<_> = docs.difference(&parser).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{heading}: not documented {missing:?}; documented but refused by the parser {extra:?}"
        );
    }
    // A real's check override takes the same keys as the service's.
    let real_check = accepted(&format!(
        "{d}\n{s}\n[[service.real]]\naddress = \"198.18.0.11:80\"\n[service.real.check]"
    ));
    assert_eq!(real_check, documented(&doc, "`[service.check]`"));
}
