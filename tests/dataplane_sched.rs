//! The schedulers of the real XDP program against their definitions (BPF_PROG_TEST_RUN): the
//! real each crafted SYN reaches must be the one the userspace reference computes for it.
//! - `wrr`: the IPVS sequence (`xdpvs_common::sched::wrr_next`, whose own tests are worked
//!   out by hand from `ip_vs_wrr.c`), across a weight change;
//! - `sh`: IPVS's source-hash bucket and table (`sched::sh_hash`, `sched::sh_table`), with
//!   `sh-port` and `sh-fallback`;
//! - `mh`: the weighted Maglev table (`xdpvs::maglev::table`) indexed by the flow hash, and the
//!   table the maps hold compared byte for byte with an independently built one and with a
//!   second dataplane's.
//!
//! Needs root.

mod common;
#[path = "support/dpnet.rs"]
mod dpnet;
#[path = "support/packet.rs"]
mod packet;

use std::net::{Ipv4Addr, SocketAddr};

use dpnet::{real_ip, service_on, DpNet, Harness, VIP, XDP_DROP};
use packet::{Frame, SYN};
use xdpvs::state::DesiredService;
use xdpvs_common::{
    sched::{self, WrrMark},
    sched_kind, stat, Addr, SH_TABLE_SIZE, SVC_F_SH_FALLBACK, SVC_F_SH_PORT,
};

fn addr(ip: Ipv4Addr) -> Addr {
    Addr {
        w: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
    }
}

/// The real (by number) a SYN from `src:sport` to VIP:`port` goes to; `None` if dropped.
fn pick(h: &Harness, src: Ipv4Addr, sport: u16, port: u16) -> Option<usize> {
    let out = h.run(&Frame::tcp(&src.to_string(), sport, VIP, port, SYN).build());
    if out.action == XDP_DROP {
        return None;
    }
    Harness::real_of(&out.frame)
}

/// A service on `port` with reals 1..=n of `weights`, scheduled by `sched`.
fn svc(port: u16, weights: &[u32], sched: u8) -> DesiredService {
    let reals: Vec<(usize, u32)> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| (i + 1, *w))
        .collect();
    let mut s = service_on(port, &reals);
    s.sched = sched;
    s
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

#[test]
#[ignore = "needs root"]
fn wrr_follows_the_ipvs_sequence_exactly() {
    if !common::require_root("wrr_follows_the_ipvs_sequence_exactly") {
        return;
    }
    let sets: [&[u32]; 7] = [
        &[1, 2, 3],
        &[4, 3, 2],
        &[4, 2, 6],
        &[0, 3, 3],
        &[2, 0, 1],
        &[5, 1, 1, 10, 3],
        &[100, 50, 25],
    ];
    let net = DpNet::new("sched-wrr", 8);
    net.run(|| {
        let mut h = Harness::new();
        let services: Vec<DesiredService> = sets
            .iter()
            .enumerate()
            .map(|(i, w)| svc(8000 + i as u16, w, sched_kind::WRR))
            .collect();
        h.apply(services.clone());
        let mut sport = 10_000u16;
        let mut marks = vec![WrrMark::default(); sets.len()];
        for (i, w) in sets.iter().enumerate() {
            let (di, mw) = sched::wrr_params(w.iter().copied());
            let period: u32 = w.iter().map(|x| x / di).sum();
            let mut want = vec![];
            let mut got = vec![];
            for _ in 0..3 * period {
                let (m, p) = sched::wrr_next(w, di, mw, marks[i]);
                marks[i] = m;
                want.push(p.unwrap() + 1);
                sport += 1;
                got.push(pick(&h, CLIENT, sport, 8000 + i as u16).unwrap());
            }
            assert_eq!(got, want, "weights {w:?}");
            println!("wrr {w:?}: {} connections in IPVS order", got.len());
        }
        // Mid-cycle weight changes: IPVS's dest_changed (walk from the head, cw realigned to
        // the new gcd), then the new sequence.
        let changes: [(usize, &[u32], usize); 3] = [
            (2, &[4, 2, 3], 4), // gcd 2 -> 1
            (1, &[4, 3, 0], 5), // a real quiesced
            (0, &[2, 4, 6], 1), // gcd 1 -> 2
        ];
        let mut services = services;
        for (i, neww, before) in changes {
            let port = 8000 + i as u16;
            let (di, mw) = sched::wrr_params(sets[i].iter().copied());
            for _ in 0..before {
                let (m, p) = sched::wrr_next(sets[i], di, mw, marks[i]);
                marks[i] = m;
                sport += 1;
                assert_eq!(pick(&h, CLIENT, sport, port), Some(p.unwrap() + 1));
            }
            services[i] = svc(port, neww, sched_kind::WRR);
            h.apply(services.clone());
            let (di, mw) = sched::wrr_params(neww.iter().copied());
            marks[i] = sched::wrr_changed(marks[i], di, mw);
            let mut want = vec![];
            let mut got = vec![];
            for _ in 0..20 {
                let (m, p) = sched::wrr_next(neww, di, mw, marks[i]);
                marks[i] = m;
                want.push(p.unwrap() + 1);
                sport += 1;
                got.push(pick(&h, CLIENT, sport, port).unwrap());
            }
            assert_eq!(got, want, "{:?} -> {neww:?}", sets[i]);
        }
    });
}

/// Client address number `i` (10.x.y.z), many distinct sources.
fn client(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 + i * 7919)
}

/// What IPVS's sh gives client `src` (port `sport` with sh-port): a real number, or none.
fn sh_reference(weights: &[u32], fallback: bool, src: Ipv4Addr, sport: u16) -> Option<usize> {
    let t = sched::sh_table(weights, fallback)?;
    let slot = t[sched::sh_hash(&addr(src), sport.to_be()) as usize] as usize;
    (weights[slot] > 0).then_some(slot + 1)
}

#[test]
#[ignore = "needs root"]
fn sh_sends_each_source_where_ipvs_would_and_keeps_it_there() {
    if !common::require_root("sh_sends_each_source_where_ipvs_would_and_keeps_it_there") {
        return;
    }
    let net = DpNet::new("sched-sh", 8);
    net.run(|| {
        let mut h = Harness::new();
        let weights = [1u32, 2, 0, 3];
        let mk = |port, flags| {
            let mut s = svc(port, &weights, sched_kind::SH);
            s.table_size = SH_TABLE_SIZE;
            s.sched_flags = flags;
            s
        };
        h.apply(vec![
            mk(81, 0),
            mk(82, SVC_F_SH_PORT),
            mk(83, SVC_F_SH_FALLBACK),
        ]);
        let drops = |h: &Harness| h.dp.stats().unwrap()[stat::DROP_NO_REAL as usize];
        let mut refused = 0;
        let mut per_real = [0usize; 5];
        for i in 0..1500u32 {
            let src = client(i);
            let want = sh_reference(&weights, false, src, 0);
            // Stable per source: three connections from other ports land alike.
            for k in 0..3u16 {
                let sport = 20_000 + k * 1000 + (i % 1000) as u16;
                let before = drops(&h);
                assert_eq!(pick(&h, src, sport, 81), want, "sh, client {src}");
                if want.is_none() {
                    assert_eq!(drops(&h), before + 1, "counted as no real");
                }
            }
            match want {
                Some(r) => per_real[r] += 1,
                None => refused += 1,
            }
            // sh-port: the source port is part of the hash.
            let sport = 40_000 + (i % 20_000) as u16;
            assert_eq!(
                pick(&h, src, sport, 82),
                sh_reference(&weights, false, src, sport),
                "sh-port, client {src}:{sport}"
            );
            // sh-fallback: never refused while some real has a weight.
            let want = sh_reference(&weights, true, src, 0);
            assert!(want.is_some());
            assert_eq!(pick(&h, src, 21_000, 83), want, "sh-fallback, client {src}");
        }
        println!(
            "sh 1:2:0:3 over 1500 sources: {:?} per real, {refused} refused (the weight-0 real's buckets)",
            &per_real[1..]
        );
        assert!(refused > 0 && per_real[3] == 0);
    });
}

fn mh_reference(weights: &[u32], size: u32, port: u16) -> Vec<u32> {
    let backends: Vec<xdpvs::maglev::Backend> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| xdpvs::maglev::Backend {
            address: SocketAddr::new(real_ip(i + 1).into(), port),
            weight: *w,
        })
        .collect();
    xdpvs::maglev::table(&backends, size).unwrap()
}

/// The lookup table the maps hold for the service on `port`, read back through its real set.
fn table_in_maps(h: &Harness, port: u16) -> Vec<u8> {
    let key = xdpvs::state::service_key(
        format!("{VIP}:{port}").parse().unwrap(),
        xdpvs::config::Protocol::Tcp,
    );
    let svc =
        h.dp.view()
            .unwrap()
            .services
            .into_iter()
            .find(|(k, _)| *k == key)
            .unwrap()
            .1;
    let set = h.dp.realset(svc.realset).unwrap();
    h.dp.table(set.table_block, set.table_size).unwrap()
}

#[test]
#[ignore = "needs root"]
fn mh_picks_the_maglev_real_and_every_dataplane_holds_the_same_table() {
    if !common::require_root("mh_picks_the_maglev_real_and_every_dataplane_holds_the_same_table") {
        return;
    }
    let net = DpNet::new("sched-mh", 8);
    net.run(|| {
        let weights = [1u32, 2, 3, 0];
        let mk = |port, size| {
            let mut s = svc(port, &weights, sched_kind::MH);
            s.table_size = size;
            s
        };
        let services = vec![mk(90, 65_537), mk(91, 251)];
        let mut h = Harness::new();
        h.apply(services.clone());
        let vip: Ipv4Addr = VIP.parse().unwrap();
        for (port, size) in [(90u16, 65_537u32), (91, 251)] {
            let reference = mh_reference(&weights, size, port);
            // The maps hold the reference table, byte for byte.
            let held = table_in_maps(&h, port);
            let want: Vec<u8> = reference.iter().map(|e| *e as u8).collect();
            assert!(held == want, "table of :{port} differs from the reference");
            let mut per_real = [0usize; 5];
            for i in 0..3000u32 {
                let src = client(i);
                let sport = 1024 + (i * 13 % 60_000) as u16;
                let hash = sched::flow_hash(&addr(src), &addr(vip), sport.to_be(), port.to_be(), 6);
                let want = reference[(hash % size) as usize] as usize + 1;
                let got = pick(&h, src, sport, port);
                assert_eq!(got, Some(want), "mh :{port}, flow {src}:{sport}");
                per_real[want] += 1;
            }
            println!(
                "mh 1:2:3:0 (table {size}) over 3000 flows: {:?}",
                &per_real[1..]
            );
            assert_eq!(per_real[4], 0, "weight 0 holds no entry");
        }
        // A second dataplane, programmed from scratch with the same config: the same bytes.
        let mut h2 = Harness::new();
        h2.apply(services);
        for port in [90u16, 91] {
            assert!(
                table_in_maps(&h, port) == table_in_maps(&h2, port),
                ":{port}"
            );
        }
    });
}

#[test]
#[ignore = "needs root"]
fn a_lost_flow_under_mh_or_sh_resumes_on_its_real_and_elsewhere_gets_a_reset() {
    if !common::require_root(
        "a_lost_flow_under_mh_or_sh_resumes_on_its_real_and_elsewhere_gets_a_reset",
    ) {
        return;
    }
    let net = DpNet::new("sched-miss", 8);
    net.run(|| {
        let weights = [1u32, 2, 3];
        let mut mh = svc(90, &weights, sched_kind::MH);
        mh.table_size = 251;
        let mut sh = svc(91, &weights, sched_kind::SH);
        sh.table_size = SH_TABLE_SIZE;
        let wlc = svc(92, &weights, sched_kind::WLC);
        let services = vec![mh.clone(), sh.clone(), wlc.clone()];
        // The flows' first life: handshakes through one dataplane.
        let mut before = Harness::new();
        before.apply(services.clone());
        let flows: Vec<(Ipv4Addr, u16, u16)> = (0..200u32)
            .map(|i| (client(i), 30_000 + i as u16, 90 + (i % 2) as u16))
            .collect();
        let mut first = vec![];
        for (src, sport, port) in &flows {
            let r = pick(&before, *src, *sport, *port).unwrap();
            let ack = Frame::tcp(&src.to_string(), *sport, VIP, *port, packet::ACK).build();
            assert_eq!(Harness::real_of(&before.run(&ack).frame), Some(r));
            first.push(r);
        }
        // The table is lost (a `--fresh` daemon: new maps, same config): a data segment of
        // each flow goes to the same real, and the entry is back, established and counted.
        let mut after = Harness::new();
        after.apply(services);
        for ((src, sport, port), r) in flows.iter().zip(&first) {
            let seg = Frame::tcp(
                &src.to_string(),
                *sport,
                VIP,
                *port,
                packet::ACK | packet::PSH,
            )
            .payload(100)
            .build();
            let out = after.run(&seg);
            assert_eq!(
                Harness::real_of(&out.frame),
                Some(*r),
                "flow {src}:{sport} -> :{port}"
            );
        }
        let st = after.dp.stats().unwrap();
        assert_eq!(st[stat::HASH_RECOVERED as usize], flows.len() as u64);
        let tracked = after.dp.connections();
        assert_eq!(tracked.len(), flows.len());
        assert!(tracked
            .iter()
            .all(|(_, c)| c.state == xdpvs_common::state::ESTABLISHED && c.flags == 0));
        let active: u64 = (1..=3)
            .map(|n| after.conns(n, &mh).0 + after.conns(n, &sh).0)
            .sum();
        assert_eq!(active, flows.len() as u64, "counted as active, once each");
        println!(
            "{} lost flows (mh and sh) resumed on their reals after a table loss",
            flows.len()
        );
        // Under wlc nothing names the real: the client gets a RST, nothing is tracked.
        let seg = Frame::tcp("198.18.0.1", 40_000, VIP, 92, packet::ACK)
            .seq_ack(1, 123_456)
            .build();
        let out = after.run(&seg);
        packet::check_reset(&seg, &out.frame).unwrap();
        // Under mh with every weight 0, neither: a RST too.
        let mut quiet = svc(90, &[0, 0, 0], sched_kind::MH);
        quiet.table_size = 251;
        after.apply(vec![quiet, sh, wlc]);
        let seg = Frame::tcp("198.18.0.9", 40_001, VIP, 90, packet::ACK)
            .seq_ack(1, 99)
            .build();
        packet::check_reset(&seg, &after.run(&seg).frame).unwrap();
        assert_eq!(after.dp.stats().unwrap()[stat::MISS_RESET as usize], 2);
        assert_eq!(after.dp.connections().len(), flows.len());
    });
}

#[test]
#[ignore = "needs root"]
fn mh_balances_by_weight_and_removing_one_of_n_reals_moves_about_one_nth_of_the_flows() {
    if !common::require_root(
        "mh_balances_by_weight_and_removing_one_of_n_reals_moves_about_one_nth_of_the_flows",
    ) {
        return;
    }
    let net = DpNet::new("sched-mhmove", 8);
    net.run(|| {
        let flows: Vec<(Ipv4Addr, u16)> = (0..5000u32)
            .map(|i| (client(i), 1024 + (i * 7 % 60_000) as u16))
            .collect();
        for weights in [[1u32, 1, 1, 1, 1], [1, 2, 3, 1, 5]] {
            let mut s = svc(90, &weights, sched_kind::MH);
            s.table_size = 65_537;
            let mut h = Harness::new();
            h.apply(vec![s.clone()]);
            // Balance: the table the maps hold gives each real its weight's share within 1%.
            let t = table_in_maps(&h, 90);
            let total: u32 = weights.iter().sum();
            for (i, w) in weights.iter().enumerate() {
                let got = t.iter().filter(|e| **e as usize == i).count() as f64 / t.len() as f64;
                let want = f64::from(*w) / f64::from(total);
                assert!(
                    (got - want).abs() <= 0.01,
                    "{weights:?} real {}: {got:.4} of the table, want {want:.4}",
                    i + 1
                );
            }
            let reals_of = |h: &Harness| -> Vec<usize> {
                let v = flows
                    .iter()
                    .map(|(src, sport)| pick(h, *src, *sport, 90).unwrap())
                    .collect();
                // Forget the flows, so the next round schedules them afresh.
                for (k, _) in h.dp.connections() {
                    h.dp.expire(k, true).unwrap();
                }
                v
            };
            let before = reals_of(&h);
            // Real 2 leaves: one of N = 5.
            let mut s2 = s.clone();
            s2.reals.remove(1);
            h.apply(vec![s2]);
            let after = reals_of(&h);
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let of_removed = before.iter().filter(|b| **b == 2).count();
            let share = moved as f64 / flows.len() as f64;
            let bound = 1.0 / 5.0 + 0.01;
            println!(
                "mh {weights:?}, real 2 removed: {moved}/{} flows moved ({:.2}%, bound 1/N + 1% = {:.0}%); \
                 {of_removed} were real 2's, {} moved between the others",
                flows.len(),
                share * 100.0,
                bound * 100.0,
                moved - of_removed
            );
            assert!(share <= bound, "{:.2}% moved", share * 100.0);
            assert!(after.iter().all(|r| *r != 2));
            assert!(moved >= of_removed, "every flow of the removed real moved");
        }
    });
}

#[test]
#[ignore = "needs root"]
fn four_thousand_mh_services_fit_the_default_pool() {
    if !common::require_root("four_thousand_mh_services_fit_the_default_pool") {
        return;
    }
    let net = DpNet::new("sched-many", 8);
    net.run(|| {
        // 4,000 services with 1,021-entry tables: 2 x 4 blocks each, 32,000 of the default
        // pool's 32,768 blocks (8 MiB).
        let n = 4000u16;
        let services: Vec<DesiredService> = (0..n)
            .map(|i| {
                let w = [1 + u32::from(i % 3), 1, 2];
                let mut s = svc(10_000 + i, &w, sched_kind::MH);
                s.table_size = 1021;
                s
            })
            .collect();
        let mut h = Harness::new();
        let t0 = std::time::Instant::now();
        h.apply(services.clone());
        println!(
            "{n} mh services (1021 entries) planned and written in {} ms",
            t0.elapsed().as_millis()
        );
        let regions = h.planner.table_regions();
        assert_eq!(regions.len(), n as usize);
        let used: u32 = regions.iter().map(|r| 2 * r.2).sum();
        assert!(
            used <= xdpvs_common::DEFAULT_TABLE_POOL_BLOCKS,
            "{used} blocks"
        );
        let vip: Ipv4Addr = VIP.parse().unwrap();
        for i in (0..n).step_by(97) {
            let port = 10_000 + i;
            let w = [1 + u32::from(i % 3), 1, 2];
            let reference = mh_reference(&w, 1021, port);
            assert!(
                table_in_maps(&h, port) == reference.iter().map(|e| *e as u8).collect::<Vec<_>>()
            );
            for k in 0..20u32 {
                let src = client(k + u32::from(i));
                let sport = 2000 + k as u16;
                let hash = sched::flow_hash(&addr(src), &addr(vip), sport.to_be(), port.to_be(), 6);
                assert_eq!(
                    pick(&h, src, sport, port),
                    Some(reference[(hash % 1021) as usize] as usize + 1),
                    "service :{port}"
                );
            }
        }
    });
}

#[test]
#[ignore = "needs root"]
fn a_lost_nat_flow_under_mh_resumes_both_ways() {
    if !common::require_root("a_lost_nat_flow_under_mh_resumes_both_ways") {
        return;
    }
    let net = DpNet::new("sched-natmiss", 4);
    net.client_neighbour("198.18.0.1");
    net.run(|| {
        let mut s = dpnet::nat_service(
            xdpvs::config::Protocol::Tcp,
            8080,
            &[(1, 1), (2, 1), (3, 1)],
        );
        s.sched = sched_kind::MH;
        s.table_size = 251;
        let mut before = Harness::new();
        before.apply(vec![s.clone()]);
        let c = |flags| Frame::tcp("198.18.0.1", 45_000, VIP, 80, flags).csum();
        let real = Harness::real_of(&before.run(&c(SYN).build()).frame).unwrap();
        // Lost: a fresh dataplane, the client's data segment, then the real's answer.
        let mut after = Harness::new();
        after.apply(vec![s]);
        let seg = c(packet::ACK | packet::PSH).payload(50).build();
        let out = after.run(&seg);
        let o = packet::parse4(&out.frame);
        assert_eq!(Harness::real_of(&out.frame), Some(real));
        assert_eq!(
            (o.dst, o.dport),
            (real_ip(real), 8080),
            "translated to the real"
        );
        assert!(o.ip_csum_ok && o.l4_csum_ok == Some(true));
        let reply = Frame::tcp(
            &real_ip(real).to_string(),
            8080,
            "198.18.0.1",
            45_000,
            packet::ACK,
        )
        .payload(10)
        .csum()
        .macs(dpnet::real_mac(real), packet::DIRECTOR_MAC)
        .build();
        let back = after.run(&reply);
        let b = packet::parse4(&back.frame);
        assert_eq!(b.dst_mac, packet::CLIENT_MAC, "the reply found its flow");
        assert_eq!(
            (b.src, b.sport),
            (VIP.parse().unwrap(), 80),
            "from the VIP again"
        );
        assert!(b.ip_csum_ok && b.l4_csum_ok == Some(true));
        assert_eq!(after.dp.stats().unwrap()[stat::HASH_RECOVERED as usize], 1);
        assert_eq!(
            after.dp.reply_entries().len(),
            1,
            "the reply entry was recreated"
        );
    });
}

#[test]
#[ignore = "needs root"]
fn wrr_keeps_its_shares_when_cpus_race_for_the_mark() {
    if !common::require_root("wrr_keeps_its_shares_when_cpus_race_for_the_mark") {
        return;
    }
    let net = DpNet::new("sched-wrrcpu", 4);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![svc(8100, &[1, 2, 3], sched_kind::WRR)]);
        const PER_THREAD: u16 = 6000;
        let h = &h;
        let counts: Vec<[usize; 4]> = std::thread::scope(|sc| {
            let threads: Vec<_> = (0..2u16)
                .map(|t| {
                    sc.spawn(move || {
                        // One thread per CPU, so the two really race.
                        unsafe {
                            let mut set: libc::cpu_set_t = std::mem::zeroed();
                            libc::CPU_SET(t as usize % 2, &mut set);
                            libc::sched_setaffinity(
                                0,
                                std::mem::size_of::<libc::cpu_set_t>(),
                                &set,
                            );
                        }
                        let mut c = [0usize; 4];
                        for i in 0..PER_THREAD {
                            let src = Ipv4Addr::new(10, 9, t as u8, 1);
                            c[pick(h, src, 1024 + i, 8100).unwrap()] += 1;
                        }
                        c
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let total: Vec<usize> = (1..4).map(|r| counts[0][r] + counts[1][r]).collect();
        let n = 2 * PER_THREAD as usize;
        println!(
            "wrr 1:2:3, two CPUs racing, {n} connections: {total:?} (exact: {:?})",
            [n / 6, n / 3, n / 2]
        );
        // A lost compare-and-swap redoes the walk once; only a second loss shares a turn.
        for (i, w) in [1usize, 2, 3].iter().enumerate() {
            let want = n * w / 6;
            let off = total[i].abs_diff(want) as f64 / n as f64;
            assert!(off <= 0.01, "real {}: {} for {want}", i + 1, total[i]);
        }
    });
}
