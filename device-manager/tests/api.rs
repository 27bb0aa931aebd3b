//! The management API, driven only from outside: `iddctl serve` runs as its own process with a
//! TOML policy (the real sandboxed IDD and two process guests doing verified I/O), and the test
//! talks to it over HTTP and HTTPS like any client would.
//!
//! What it shows: bring-up from TOML visible in `/v1/idds`; auth (no token 401, read-only
//! token 403 on admin endpoints, admin token accepted); a crash injected through the API and
//! its recovery, with every phase, on the `/v1/events` stream and in `/metrics`; the policy
//! endpoints reporting every error with line and column; a body over the limit answered 413
//! with a JSON error; the TLS listener with a self-signed certificate and a token; the CLI
//! (`--remote --token --json`) against the same server.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use device_manager::api::client::{Client, ClientError};
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-only-token-0123456789";

fn policy(dir: &Path) -> PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[restart]
max_restarts = 100
window = "600s"
heartbeat = "500ms"

[[device]]
name = "disk0"
kind = "virtio-blk"
image = "{}"
size = "16MiB"

[[guest]]
name = "alice"
[[guest.disk]]
device = "disk0"
length = "8MiB"

[[guest]]
name = "bob"
[[guest.disk]]
device = "disk0"
offset = "8MiB"
length = "8MiB"
"#,
            dir.join("disk0.img").display()
        ),
    )
    .unwrap();
    p
}

/// `iddctl serve` as a child; killed on drop if the test fails half-way.
struct Served {
    child: Child,
    lines: mpsc::Receiver<String>,
    http: String,
    https: String,
}

impl Served {
    fn start(dir: &Path) -> Self {
        let _ = common::idd_program();
        let (cert, key) =
            device_manager::api::tls::write_self_signed(dir, &["localhost", "127.0.0.1"]).unwrap();
        let tokens = dir.join("tokens.toml");
        std::fs::write(
            &tokens,
            format!(
                "[[token]]\nname = \"ops\"\nsecret = \"{ADMIN}\"\nrole = \"admin\"\n\n[[token]]\nname = \"dash\"\nsecret = \"{READ}\"\nrole = \"read\"\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_iddctl"))
            .arg("serve")
            .arg(policy(dir))
            .args(["--listen", "127.0.0.1:0", "--remote-listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tokens")
            .arg(&tokens)
            .args(["--guest-secs", "300", "--body-limit", "65536"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting iddctl serve");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[serve] {l}");
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut s = Self {
            child,
            lines: rx,
            http: String::new(),
            https: String::new(),
        };
        while s.http.is_empty() || s.https.is_empty() {
            let l = s.line();
            if let Some(u) = l.strip_prefix("listening on ") {
                if u.starts_with("https://") {
                    s.https = u.to_owned();
                } else {
                    s.http = u.to_owned();
                }
            }
        }
        s
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .expect("iddctl serve printed nothing for 60 s")
    }

    fn client(&self, token: Option<&str>) -> Client {
        Client::new(&self.http, token.map(str::to_owned), None).unwrap()
    }

    fn iddctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_iddctl"))
            .args(["--remote", &self.http, "--token", ADMIN])
            .args(args)
            .output()
            .unwrap()
    }

    /// Ctrl-C, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child, not yet waited for.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let st = self.child.wait().unwrap();
        std::mem::forget(self);
        st
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api_err(r: Result<Value, ClientError>) -> (u16, String, Option<Value>) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            details,
            ..
        }) => (status, code, details),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Inject `body` through the API (subscribed first) and return every event type seen up to
/// and including the recovery, and the recovery event.
fn inject_and_recover(admin: &Client, body: Value) -> (Vec<String>, Value) {
    let events = admin.events().unwrap();
    let r: Value = admin.post("/v1/idds/idd-disk0/faults", &body).unwrap();
    assert_eq!(r["result"], "accepted");
    let mut seen = Vec::new();
    for m in events {
        let m = m.unwrap();
        let v: Value = serde_json::from_str(&m.data).unwrap();
        assert_eq!(m.event, v["type"].as_str().unwrap());
        assert_eq!(m.id.as_deref(), Some(v["seq"].to_string().as_str()));
        seen.push(m.event.clone());
        if m.event == "recovery" {
            return (seen, v);
        }
        assert!(seen.len() < 50, "no recovery among {seen:?}");
    }
    panic!("the event stream ended after {seen:?}");
}

#[test]
fn served_api_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path());
    // Bring-up from TOML: serve announces the IDD's state once it is up.
    let up = s.line();
    assert_eq!(up, "idd-disk0 running", "bring-up failed: {up}");

    // Auth: no token, unknown token, read-only token on an admin endpoint.
    let anon = s.client(None);
    assert_eq!(
        api_err(anon.get("/v1/idds")),
        (401, "unauthorized".into(), None)
    );
    let raw = ureq::get(format!("{}/v1/status", s.http))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(raw.status(), 401);
    assert_eq!(raw.headers().get("www-authenticate").unwrap(), "Bearer");
    let wrong = s.client(Some("not-a-token-at-all-xx"));
    assert_eq!(api_err(wrong.get("/v1/idds")).0, 401);
    let reader = s.client(Some(READ));
    let idds: Value = reader.get("/v1/idds").unwrap();
    assert_eq!(idds[0]["name"], "idd-disk0");
    assert_eq!(idds[0]["state"], "running");
    assert!(idds[0]["pid"].as_u64().is_some(), "{idds}");
    let (st, code, _) =
        api_err(reader.post("/v1/idds/idd-disk0/faults", &json!({"fault": "crash"})));
    assert_eq!((st, code.as_str()), (403, "forbidden"));
    let (st, _, _) = api_err(reader.post("/v1/idds/idd-disk0/restart", &json!({})));
    assert_eq!(st, 403);

    // Guests and channels from the running system.
    let guests: Value = reader.get("/v1/guests").unwrap();
    let names: Vec<&str> = guests
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    let chans: Value = reader.get("/v1/channels").unwrap();
    assert_eq!(chans.as_array().unwrap().len(), 2);
    assert_eq!(chans[1]["stats"]["kind"], "virtio-blk");
    assert_eq!(chans[1]["stats"]["region_offset_sectors"], 16384);

    // A crash through the API; its recovery on the event stream, subscribed first.
    let admin = s.client(Some(ADMIN));
    let (seen, rec) = inject_and_recover(&admin, json!({"fault": "crash"}));
    assert!(seen.contains(&"fault_injected".to_owned()), "{seen:?}");
    assert_eq!(rec["idd"], "idd-disk0");
    assert_eq!(rec["recovery"]["seq"], 1);
    assert!(
        rec["recovery"]["cause"]
            .as_str()
            .unwrap()
            .starts_with("exited"),
        "{rec}"
    );
    for phase in [
        "detect_us",
        "revoke_us",
        "spawn_us",
        "reattach_us",
        "first_response_us",
        "outage_us",
    ] {
        assert!(rec["recovery"][phase].is_u64(), "{phase} in {rec}");
    }

    // A late subscriber resumes from the kept events (`?since=0`: all of them), in order.
    let mut replayed = Vec::new();
    for m in reader.events_since(Some(0)).unwrap() {
        let m = m.unwrap();
        replayed.push((m.id.unwrap().parse::<u64>().unwrap(), m.event.clone()));
        if m.event == "recovery" {
            break;
        }
    }
    assert_eq!(replayed[0].1, "idd_state", "{replayed:?}");
    assert!(replayed.windows(2).all(|w| w[0].0 < w[1].0), "{replayed:?}");
    assert!(
        replayed.iter().any(|(_, t)| t == "fault_injected"),
        "{replayed:?}"
    );
    // The CLI's watch, the same way.
    let out = s.iddctl(&["watch", "--since", "0", "--until", "recovery"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("recovered #1"),
        "{text}"
    );

    // The same recovery in the IDD's view and in the metrics.
    let idd: Value = reader.get("/v1/idds/idd-disk0").unwrap();
    assert_eq!(idd["restarts"], 1);
    assert_eq!(idd["last_recovery"], rec["recovery"]);
    let metrics = reader.get_text("/metrics").unwrap();
    assert!(
        metrics.contains("idd_restarts_total{idd=\"idd-disk0\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("idd_faults_injected_total{idd=\"idd-disk0\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("idd_last_recovery_phase_seconds{idd=\"idd-disk0\",phase=\"spawn\"}"),
        "{metrics}"
    );

    // A corrupted ring: the IDD refuses that channel, the manager resets it.
    let (seen, rec) = inject_and_recover(&admin, json!({"fault": "corrupt", "guest": "bob"}));
    assert!(seen.contains(&"channel_failed".to_owned()), "{seen:?}");
    assert_eq!(rec["recovery"]["seq"], 2);
    assert!(
        rec["recovery"]["cause"]
            .as_str()
            .unwrap()
            .contains("channel 1"),
        "{rec}"
    );
    // A hang: found by the missed heartbeat (the policy's 500 ms).
    let (_, rec) = inject_and_recover(&admin, json!({"fault": "hang"}));
    assert!(
        rec["recovery"]["cause"]
            .as_str()
            .unwrap()
            .starts_with("hung"),
        "{rec}"
    );
    let (st, code, _) =
        api_err(admin.post("/v1/idds/idd-disk0/faults", &json!({"fault": "corrupt"})));
    assert_eq!((st, code.as_str()), (400, "bad_request"));
    let (st, _, _) = api_err(admin.post(
        "/v1/idds/idd-disk0/faults",
        &json!({"fault": "corrupt", "guest": "mallory"}),
    ));
    assert_eq!(st, 404);

    // Policy: every error with its position; an unknown IDD; a body over the limit.
    let bad = std::fs::read_to_string(dir.path().join("policy.toml"))
        .unwrap()
        .replace(
            "length = \"8MiB\"\n\n[[guest]]",
            "length = \"9MiB\"\n\n[[guest]]",
        )
        .replace(
            "kind = \"virtio-blk\"",
            "kind = \"virtio-blk\"\ncolour = \"red\"",
        );
    let (st, code, details) = api_err(admin.post(
        "/v1/policy/validate",
        &json!({"text": bad, "name": "bad.toml"}),
    ));
    assert_eq!((st, code.as_str()), (422, "invalid_policy"));
    let diags = details.unwrap()["diagnostics"].as_array().unwrap().clone();
    assert_eq!(diags.len(), 2, "{diags:?}");
    for d in &diags {
        assert!(
            d["line"].as_u64().unwrap() > 1 && d["column"].as_u64().unwrap() >= 1,
            "{d}"
        );
    }
    assert_eq!(
        api_err(admin.post("/v1/idds/idd-nope/restart", &json!({}))).0,
        404
    );
    let huge = "x".repeat(100_000);
    let (st, code, _) = api_err(admin.post("/v1/policy/validate", &json!({"text": huge})));
    assert_eq!((st, code.as_str()), (413, "payload_too_large"));
    // A disk has no standby (only NICs with `standby = true` do).
    let (st, code, _) = api_err(admin.post("/v1/devices/disk0/promote", &json!({})));
    assert_eq!((st, code.as_str()), (400, "bad_request"));

    // The OpenAPI document comes from the code and lists the routes.
    let doc: Value = reader.get("/openapi.json").unwrap();
    assert!(doc["paths"]["/v1/idds/{name}/faults"]["post"].is_object());

    // TLS listener: trusted with the self-signed certificate, with a token.
    let ca = std::fs::read(dir.path().join("cert.pem")).unwrap();
    let tls = Client::new(&s.https, Some(READ.into()), Some(&ca)).unwrap();
    let st: Value = tls.get("/v1/status").unwrap();
    assert_eq!(st["idds"][0]["name"], "idd-disk0");
    let untrusted = Client::new(&s.https, Some(READ.into()), None).unwrap();
    assert!(matches!(
        untrusted.get::<Value>("/v1/status"),
        Err(ClientError::Transport { .. })
    ));
    let tls_anon = Client::new(&s.https, None, Some(&ca)).unwrap();
    assert_eq!(api_err(tls_anon.get("/v1/status")).0, 401);

    // The CLI against the same server.
    let out = s.iddctl(&["idds"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("idd-disk0") && text.contains("running"),
        "{text}"
    );
    let out = s.iddctl(&["--json", "channels"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let out = s.iddctl(&["restart", "idd-disk0", "--wait"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("recovered #4"),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_iddctl"))
        .args([
            "--remote",
            &s.http,
            "--token",
            READ,
            "inject",
            "idd-disk0",
            "crash",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("403 forbidden"));

    let st = s.stop();
    assert!(st.success(), "iddctl serve exited {st}");
}

#[test]
fn remote_listener_without_tls_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_iddctl"))
        .arg("serve")
        .arg(policy(dir.path()))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs TLS"), "{err}");
}
