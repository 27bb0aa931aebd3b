//! The API under load while the IDD is crashed repeatedly: eight process guests (the most one
//! IDD serves today, `layout::MAX_CHANNELS`) run verified I/O on one disk IDD; four client
//! threads keep reading `/v1/idds`, `/v1/channels` and `/metrics`; the IDD is crashed 20 times
//! through the API, each recovery awaited on the event stream. Every request must succeed and
//! every crash be recovered; the read latency percentiles are printed (not asserted: timings
//! belong to benchmarks), showing that reads never wait for a recovery in progress.
//!
//! (The 64 guests need the net slice's IDD and more channels per IDD; this is the same
//! test at today's scale.)

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_manager::api::client::Client;
use device_manager::api::{self, auth::Tokens, AppState, Listener};
use device_manager::layout::MAX_CHANNELS;
use device_manager::manager::ManagerConfig;
use device_manager::recovery::Percentiles;
use device_manager::service::{Service, ServiceConfig};
use policy::Policy;
use serde_json::{json, Value};

const CRASHES: u32 = 3;

fn policy_text(dir: &std::path::Path) -> String {
    let mut t = format!(
        "[restart]\nmax_restarts = 1000\nwindow = \"600s\"\nheartbeat = \"1s\"\n\n[[device]]\nname = \"disk0\"\nkind = \"virtio-blk\"\nimage = \"{}\"\nsize = \"128MiB\"\n",
        dir.join("disk0.img").display()
    );
    for i in 0..MAX_CHANNELS {
        t.push_str(&format!(
            "\n[[guest]]\nname = \"g{i}\"\ndisk = [{{ device = \"disk0\", offset = \"{}MiB\", length = \"2MiB\" }}]\n",
            i * 2
        ));
    }
    t
}

#[test]
fn api_stays_responsive_while_the_idd_is_crashed() {
    let dir = tempfile::tempdir().unwrap();
    let text = policy_text(dir.path());
    let policy = Policy::parse(&text, "load.toml").unwrap();
    let mut cfg = ServiceConfig::new(ManagerConfig {
        idd_program: common::idd_program(),
        guest_program: env!("CARGO_BIN_EXE_blk-guest").into(),
        net_idd_program: "idd-net".into(), // no NIC in this policy
        heartbeat: None,
        verbose: false,
    });
    cfg.guest_args = [
        "workload", "--secs", "300", "--blocks", "32", "--seed", "{seed}",
    ]
    .map(str::to_owned)
    .to_vec();
    let svc = Service::start(policy, "load.toml", text, cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let state = AppState {
        svc: svc.clone(),
        sysfs: "/sys".into(),
    };
    let router = api::router(state, Arc::new(Tokens::none()), api::DEFAULT_BODY_LIMIT);
    let l = Listener {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls: None,
    };
    let server = rt.block_on(api::spawn(router, &l)).unwrap();
    let url = server.url();
    let c = Client::new(&url, None, None).unwrap();

    // Up: every guest connected.
    let mut events = c.events_since(Some(0)).unwrap();
    loop {
        let m = events.next().expect("stream ended").unwrap();
        let v: Value = serde_json::from_str(&m.data).unwrap();
        if m.event == "idd_state" {
            assert_eq!(v["state"], "running", "{v}");
            break;
        }
    }
    let chans: Value = c.get("/v1/channels").unwrap();
    assert_eq!(chans.as_array().unwrap().len() as u64, MAX_CHANNELS);

    // Readers.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let c = Client::new(&url, None, None).unwrap();
                let paths = ["/v1/idds", "/v1/channels", "/metrics"];
                let mut lat = Vec::new();
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    c.get_text(paths[n % paths.len()]).unwrap();
                    lat.push(t.elapsed());
                    n += 1;
                }
                lat
            })
        })
        .collect();

    // Crashes, each awaited.
    let mut outages = Vec::new();
    for i in 1..=CRASHES {
        let r: Value = c
            .post("/v1/idds/idd-disk0/faults", &json!({"fault": "crash"}))
            .unwrap();
        assert_eq!(r["result"], "accepted");
        let rec = loop {
            let m = events.next().expect("stream ended").unwrap();
            if m.event == "recovery" {
                break serde_json::from_str::<Value>(&m.data).unwrap();
            }
            assert_ne!(m.event, "lagged");
        };
        assert_eq!(rec["recovery"]["seq"], i);
        outages.push(Duration::from_micros(
            rec["recovery"]["outage_us"].as_u64().unwrap(),
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let lat: Vec<Duration> = readers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let idd: Value = c.get("/v1/idds/idd-disk0").unwrap();
    assert_eq!(idd["restarts"], CRASHES);
    assert_eq!(idd["state"], "running");
    let guests: Value = c.get("/v1/guests").unwrap();
    assert!(
        guests
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["running"] == true),
        "{guests}"
    );

    let p = Percentiles::of(&lat).unwrap();
    let o = Percentiles::of(&outages).unwrap();
    println!(
        "API read latency under {CRASHES} crashes, {} guests: {p}",
        MAX_CHANNELS
    );
    println!("recovery outages: {o}");
    rt.block_on(server.shutdown());
    svc.shutdown();
}
