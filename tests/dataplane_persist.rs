//! Persistence templates in the real XDP program (BPF_PROG_TEST_RUN): one client (or client
//! network) keeps its real while its template lives, many clients still spread by weight, a
//! template naming a drained real is replaced, an expired one is not used, the sorry server is
//! never remembered. Needs root.

mod common;
#[path = "support/dpnet.rs"]
mod dpnet;
#[path = "support/packet.rs"]
mod packet;

use std::collections::{BTreeMap, HashSet};

use dpnet::{service_on, DpNet, Harness, XDP_TX};
use packet::{Frame, SYN};
use xdpvs::state::DesiredService;
use xdpvs_common::stat;

/// A WLC service on VIP port `port` with client affinity (`timeout_s`, `/prefix`).
fn persistent(port: u16, reals: &[(usize, u32)], timeout_s: u32, prefix: u8) -> DesiredService {
    let mut s = service_on(port, reals);
    s.persist = Some((timeout_s, prefix));
    s
}

/// Which real (by number) a new connection from `client:sport` to VIP:`port` went to.
fn connect(h: &Harness, client: &str, sport: u16, port: u16) -> usize {
    let out = h.run(&Frame::tcp(client, sport, dpnet::VIP, port, SYN).build());
    assert_eq!(out.action, XDP_TX, "SYN from {client}:{sport} forwarded");
    Harness::real_of(&out.frame).expect("to a real")
}

fn hits(h: &Harness) -> u64 {
    h.dp.stats().unwrap()[stat::PERSIST_HIT as usize]
}

#[test]
#[ignore = "needs root"]
fn one_client_keeps_its_real_and_many_clients_spread_by_weight() {
    if !common::require_root("one_client_keeps_its_real_and_many_clients_spread_by_weight") {
        return;
    }
    DpNet::new("pers", 3).run(|| {
        let mut h = Harness::new();
        let spread = persistent(80, &[(1, 1), (2, 2), (3, 3)], 300, 24);
        let single = persistent(81, &[(1, 1), (2, 1), (3, 1)], 300, 32);
        h.apply(vec![spread.clone(), single.clone()]);

        // 60 client networks, one new connection each: WLC spreads them exactly 1:2:3 (each
        // SYN's half-open entry counts on its real before the next is scheduled).
        let client = |i: usize| format!("198.19.{i}.1");
        let mut first = Vec::new();
        let mut by_real: BTreeMap<usize, usize> = BTreeMap::new();
        for i in 0..60 {
            let r = connect(&h, &client(i), 40000, 80);
            first.push(r);
            *by_real.entry(r).or_default() += 1;
        }
        println!("60 client networks over weights 1:2:3: {by_real:?}");
        assert_eq!(by_real, BTreeMap::from([(1, 10), (2, 20), (3, 30)]));
        assert_eq!(hits(&h), 0, "first connections are scheduled");
        // Their next connections, and those of other hosts of the same /24s, follow the
        // templates, whatever the load says now.
        for (i, want) in first.iter().enumerate() {
            assert_eq!(connect(&h, &client(i), 40001, 80), *want, "client {i}");
            let neighbour = format!("198.19.{i}.200");
            assert_eq!(connect(&h, &neighbour, 40002, 80), *want, "/24 of {i}");
        }
        assert_eq!(hits(&h), 120);
        let templates = h.dp.templates();
        assert_eq!(templates.len(), 60, "one template per client network");
        assert!(
            templates
                .iter()
                .all(|(k, _)| k.client.w[0].to_ne_bytes()[3] == 0),
            "keyed by the masked address"
        );

        // One client, 50 new connections: all on one real (mask /32: its neighbour is not).
        let mut reals = HashSet::new();
        for sport in 0..50 {
            reals.insert(connect(&h, "198.18.0.1", 41000 + sport, 81));
        }
        assert_eq!(reals.len(), 1, "50 connections of one client on one real");
        assert_eq!(hits(&h), 120 + 49);
        let owner = *reals.iter().next().unwrap();
        let other = connect(&h, "198.18.0.9", 41100, 81);
        assert_ne!(
            other, owner,
            "another client is scheduled (WLC: a less loaded real)"
        );

        // The owner drained (weight 0): the template is not used; the new choice replaces it.
        let mut drained = single.clone();
        drained.reals[owner - 1].weight = 0;
        h.apply(vec![spread.clone(), drained]);
        let before = hits(&h);
        let moved = connect(&h, "198.18.0.1", 41200, 81);
        assert_ne!(
            moved, owner,
            "a drained real takes no new connection, template or not"
        );
        assert_eq!(hits(&h), before, "not a template hit");
        assert_eq!(
            connect(&h, "198.18.0.1", 41201, 81),
            moved,
            "the new template"
        );
        assert_eq!(hits(&h), before + 1);
        // Back in service, the client stays where its template now points.
        h.apply(vec![spread, single]);
        assert_eq!(connect(&h, "198.18.0.1", 41202, 81), moved);
    });
}

#[test]
#[ignore = "needs root"]
fn expired_templates_are_not_used_and_the_sorry_server_is_not_remembered() {
    if !common::require_root(
        "expired_templates_are_not_used_and_the_sorry_server_is_not_remembered",
    ) {
        return;
    }
    DpNet::new("persexp", 3).run(|| {
        let mut h = Harness::new();
        let svc = persistent(80, &[(1, 1), (2, 1)], 1, 32);
        h.apply(vec![svc.clone()]);
        let r = connect(&h, "198.18.0.1", 42000, 80);
        // Within the second: the template holds against WLC (the other real is less loaded).
        assert_eq!(connect(&h, "198.18.0.1", 42001, 80), r);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        // Expired: scheduled again, and WLC picks the real without the two half-open entries.
        let after = connect(&h, "198.18.0.1", 42002, 80);
        assert_ne!(after, r, "an expired template is not used");
        assert_eq!(hits(&h), 1);

        // No real may take a connection: the sorry server does, and is not remembered.
        let mut sorry = persistent(81, &[(1, 0), (2, 0)], 300, 32);
        sorry.fallback = Some(std::net::SocketAddr::new(dpnet::real_ip(3).into(), 81));
        h.apply(vec![svc.clone(), sorry.clone()]);
        assert_eq!(connect(&h, "198.18.0.7", 42100, 81), 3, "the fallback");
        sorry.reals[0].weight = 1;
        h.apply(vec![svc, sorry]);
        assert_eq!(
            connect(&h, "198.18.0.7", 42101, 81),
            1,
            "scheduled once a real is back, not sent to the sorry server"
        );
    });
}
