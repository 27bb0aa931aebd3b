//! The probe over a real UDP wire against an echo host that goes silent for 300 ms, as an
//! IDD restart looks from the wire's far side.

mod common;

use common::{peer_ep, probe_ep, EchoPeer};
use netprobe::probe::{Probe, ProbeConfig, ProbeMode};
use netprobe::wire::{self, WireSpec};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const DROP: Duration = Duration::from_millis(300);

fn run(mode: ProbeMode) {
    let peer = EchoPeer::spawn(Some(100), DROP);
    let wire = wire::open(&WireSpec::Udp {
        bind: "127.0.0.1:0".parse().unwrap(),
        peer: Some(peer.addr),
    })
    .unwrap();
    let mut cfg = ProbeConfig::new(probe_ep(), peer_ep().ip);
    cfg.mode = mode;
    cfg.count = Some(300); // 1.5 s at 200/s, the silence in the middle
                           // 20 intervals (100 ms): a busy test machine's scheduling stalls stay below it, the
                           // 300 ms silence does not.
    cfg.threshold_intervals = 20.0;
    let probe = Probe::new(cfg, wire).unwrap();
    let handle = probe.handle();
    let marker = std::thread::spawn(move || {
        while handle.received() < 100 {
            std::thread::sleep(Duration::from_millis(1));
        }
        handle.mark("silence");
    });
    let report = probe.run(&AtomicBool::new(false)).unwrap();
    marker.join().unwrap();
    let dropped = peer.dropped.load(Ordering::Relaxed);

    assert_eq!(report.sent + report.counters.skipped, 300);
    assert!(dropped > 0, "the peer dropped nothing");
    // Loopback loses nothing: every lost probe is one the peer dropped, all in one outage.
    assert_eq!(report.lost, dropped, "{report:#?}");
    assert_eq!(report.received, peer.answered.load(Ordering::Relaxed));
    assert_eq!(report.outages.len(), 1, "{:#?}", report.outages);
    let o = &report.outages[0];
    assert_eq!(o.probes_lost, dropped);
    assert!(o.end_s.is_some());
    // The silence lasted at least DROP (minus one interval for where it fell between probes).
    assert!(o.duration_ms >= DROP.as_secs_f64() * 1e3 - 5.0, "{o:?}");
    assert!(o.duration_ms < 3000.0, "{o:?}");
    assert_eq!(report.marks.len(), 1);
    assert!(
        report.marks[0].t_s <= o.start_s + 0.1,
        "{:?} {o:?}",
        report.marks
    );
    // The plot of it.
    let svg = netprobe::plot::render_svg(&report).unwrap();
    if let Ok(dir) = std::env::var("NETPROBE_KEEP_SVG") {
        std::fs::write(format!("{dir}/{mode:?}.svg"), &svg).unwrap();
    }
    let doc = roxmltree::Document::parse(&svg).expect("the SVG is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    assert!(doc.descendants().any(|n| n.has_tag_name("polyline")));
    assert!(doc
        .descendants()
        .any(|n| n.has_tag_name("text") && n.text().map(str::trim) == Some("silence")));
}

#[test]
fn icmp_probe_sees_one_outage_with_the_dropped_probes() {
    run(ProbeMode::Icmp);
}

#[test]
fn udp_probe_sees_one_outage_with_the_dropped_probes() {
    run(ProbeMode::Udp { port: 7 });
}

#[test]
fn write_svg_writes_a_file() {
    let peer = EchoPeer::spawn(None, Duration::ZERO);
    let wire = wire::open(&WireSpec::Udp {
        bind: "127.0.0.1:0".parse().unwrap(),
        peer: Some(peer.addr),
    })
    .unwrap();
    let mut cfg = ProbeConfig::new(probe_ep(), peer_ep().ip);
    cfg.count = Some(20);
    cfg.rate = 1000.0;
    let report = Probe::new(cfg, wire)
        .unwrap()
        .run(&AtomicBool::new(false))
        .unwrap();
    assert_eq!(report.lost, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plot.svg");
    netprobe::plot::write_svg(&report, &path).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    roxmltree::Document::parse(&svg).unwrap();
}
