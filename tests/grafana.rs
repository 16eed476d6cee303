//! The Grafana dashboard (contrib/grafana/xdpvs.json) queries only metrics the daemon exports,
//! and has the panels issue 14 asks for. No root needed.

use std::collections::BTreeSet;

fn dashboard() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/grafana/xdpvs.json");
    let text = std::fs::read_to_string(path).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every PromQL expression of every panel, by panel title.
fn exprs(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap_or("").to_string();
        for t in p["targets"].as_array().expect("targets") {
            out.push((title.clone(), t["expr"].as_str().expect("expr").to_string()));
        }
    }
    out
}

/// Metric names in a PromQL expression (histogram series map to their family).
fn metric_refs(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\bxdpvs_[a-z0-9_]+").unwrap();
    re.find_iter(expr)
        .map(|m| {
            let n = m.as_str();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_string()
        })
        .collect()
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let exported: BTreeSet<String> = xdpvs::metrics::metric_names()
        .expect("metric names")
        .into_iter()
        .collect();
    let d = dashboard();
    let mut used = BTreeSet::new();
    for (title, e) in exprs(&d) {
        let refs = metric_refs(&e);
        assert!(
            !refs.is_empty(),
            "panel {title:?} queries no xdpvs metric: {e}"
        );
        for m in refs {
            assert!(
                exported.contains(&m),
                "panel {title:?} queries {m}, which the daemon does not export (it exports \
                 {exported:?})"
            );
            used.insert(m);
        }
    }
    // The variable's query too.
    let var = d["templating"]["list"][1]["definition"]
        .as_str()
        .expect("var");
    for m in metric_refs(var) {
        assert!(exported.contains(&m), "the service variable uses {m}");
    }
    println!(
        "dashboard uses {} of {} exported metrics",
        used.len(),
        exported.len()
    );
}

#[test]
fn the_dashboard_has_the_panels_operators_need() {
    let d = dashboard();
    let all: Vec<(String, String)> = exprs(&d);
    let has = |what: &str, metric: &str| {
        assert!(
            all.iter().any(|(_, e)| e.contains(metric)),
            "no panel for {what} ({metric})"
        );
    };
    has(
        "new connections/s per service",
        "rate(xdpvs_real_connections_total",
    );
    has(
        "active connections per real",
        "xdpvs_real_active_connections",
    );
    has("health state timeline", "xdpvs_real_up");
    has("reloads", "xdpvs_config_reloads_total");
    has(
        "dataplane drops by reason",
        "xdpvs_dataplane_packets_total{action=~\"drop_",
    );
    let timeline = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .any(|p| p["type"] == "state-timeline");
    assert!(timeline, "health is shown as a state timeline");
}
