//! A blocking client of the API (what `iddctl` and the tests use), and the human tables.
//!
//! `ureq` (blocking, rustls with `ring`) rather than an async client: `iddctl` does one request
//! at a time, and `watch` reads the event stream line by line from a plain `Read`.
//!
//! Server-sent events are parsed as the format says: `field: value` lines, a blank line ends
//! an event, lines starting with `:` are comments (keep-alives); only `event`, `id` and `data`
//! are used.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the server or read its answer.
    #[error("{url}: {message}")]
    Transport {
        /// The URL.
        url: String,
        /// What happened.
        message: String,
    },
    /// The server answered with an error.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error's code.
        code: String,
        /// Its message.
        message: String,
        /// Its details.
        details: Option<Value>,
    },
    /// A CA file that is not PEM.
    #[error("CA file {0}: {1}")]
    Ca(String, String),
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseMessage {
    /// `event:` (default `message`).
    pub event: String,
    /// `id:`.
    pub id: Option<String>,
    /// `data:` lines joined by newlines.
    pub data: String,
}

/// Reads events from a stream.
pub struct SseReader<R> {
    lines: std::io::Lines<BufReader<R>>,
}

impl<R: Read> SseReader<R> {
    /// Over `r`.
    pub fn new(r: R) -> Self {
        Self {
            lines: BufReader::new(r).lines(),
        }
    }
}

impl<R: Read> Iterator for SseReader<R> {
    type Item = std::io::Result<SseMessage>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut ev = SseMessage {
            event: "message".into(),
            id: None,
            data: String::new(),
        };
        let mut any = false;
        loop {
            let line = match self.lines.next()? {
                Ok(l) => l,
                Err(e) => return Some(Err(e)),
            };
            if line.is_empty() {
                if any {
                    return Some(Ok(ev));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => ev.event = value.to_owned(),
                "id" => ev.id = Some(value.to_owned()),
                "data" => {
                    if !ev.data.is_empty() {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(value);
                }
                _ => continue,
            }
            any = true;
        }
    }
}

/// A client of one server.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    stream_agent: ureq::Agent,
}

impl Client {
    /// For `base` (`http://127.0.0.1:7480`), with a bearer token and PEM CA certificates to
    /// trust (for a self-signed server; default: the WebPKI roots).
    pub fn new(
        base: &str,
        token: Option<String>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        crate::api::tls::install_crypto();
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(pem) = ca_pem {
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| ClientError::Ca("(pem)".into(), e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientError::Ca(
                    "(pem)".into(),
                    "no certificate in it".into(),
                ));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let tls = tls.build();
        let mk = |timeout: Option<Duration>| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .tls_config(tls.clone())
                .timeout_global(timeout)
                .build()
                .into()
        };
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            agent: mk(Some(Duration::from_secs(60))),
            stream_agent: mk(None),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn transport(&self, path: &str, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport {
            url: self.url(path),
            message: e.to_string(),
        }
    }

    fn finish(
        &self,
        path: &str,
        mut r: ureq::http::Response<ureq::Body>,
    ) -> Result<String, ClientError> {
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| self.transport(path, e))?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let e = &v["error"];
        Err(ClientError::Api {
            status,
            code: e["code"].as_str().unwrap_or("http_error").to_owned(),
            message: e["message"]
                .as_str()
                .map_or_else(|| body.chars().take(200).collect(), str::to_owned),
            details: e.get("details").cloned().filter(|d| !d.is_null()),
        })
    }

    /// GET `path`, the raw body.
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let mut req = self.agent.get(self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let r = req.call().map_err(|e| self.transport(path, e))?;
        self.finish(path, r)
    }

    /// GET `path` as JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let text = self.get_text(path)?;
        serde_json::from_str(&text).map_err(|e| self.transport(path, format!("bad JSON: {e}")))
    }

    /// POST `body` as JSON to `path`.
    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, ClientError> {
        let mut req = self.agent.post(self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let r = req.send_json(body).map_err(|e| self.transport(path, e))?;
        let text = self.finish(path, r)?;
        serde_json::from_str(&text).map_err(|e| self.transport(path, format!("bad JSON: {e}")))
    }

    /// Subscribe to `/v1/events` (returns once subscribed).
    pub fn events(&self) -> Result<SseReader<impl Read>, ClientError> {
        self.events_since(None)
    }

    /// Subscribe, first replaying the kept events numbered after `since`.
    pub fn events_since(&self, since: Option<u64>) -> Result<SseReader<impl Read>, ClientError> {
        let path = &match since {
            Some(n) => format!("/v1/events?since={n}"),
            None => "/v1/events".to_owned(),
        };
        let mut req = self
            .stream_agent
            .get(self.url(path))
            .header("Accept", "text/event-stream");
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let r = req.call().map_err(|e| self.transport(path, e))?;
        if !r.status().is_success() {
            return Err(self
                .finish(path, r)
                .err()
                .unwrap_or_else(|| self.transport(path, "unexpected status")));
        }
        Ok(SseReader::new(r.into_body().into_reader()))
    }
}

fn ms(v: &Value) -> String {
    v.as_u64()
        .map_or_else(|| "-".into(), |us| format!("{:.1}ms", us as f64 / 1e3))
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn uptime(v: &Value) -> String {
    let Some(ms) = v.as_u64() else {
        return "-".into();
    };
    let secs = ms / 1000;
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs / 60 % 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}.{}s", secs, ms % 1000 / 100)
    }
}

/// The `status` summary: one line, then the IDDs.
pub fn status_table(v: &Value) -> String {
    let mut out = format!(
        "policy {}; up {} s; guests {}/{} running; channels {} ({} failed)\n",
        v["policy"].as_str().unwrap_or("?"),
        v["uptime_ms"].as_u64().unwrap_or(0) / 1000,
        v["guests_running"],
        v["guests"],
        v["channels"],
        v["channels_failed"]
    );
    out.push_str(&idds_table(&v["idds"]));
    out
}

/// The `idds` table.
pub fn idds_table(v: &Value) -> String {
    let mut out = format!(
        "{:<16} {:<11} {:<11} {:>7} {:>5} {:>8} {:>8} {:>10}  {}\n",
        "IDD", "KIND", "STATE", "PID", "DOMID", "RESTARTS", "UPTIME", "LAST", "LAST RECOVERY"
    );
    for i in v.as_array().into_iter().flatten() {
        let last = &i["last_recovery"];
        let phases = if last.is_null() {
            s(&i["reason"])
        } else {
            format!(
                "#{} {}: detect {} revoke {} spawn {} reattach {} first {}",
                s(&last["seq"]),
                s(&last["cause"]),
                ms(&last["detect_us"]),
                ms(&last["revoke_us"]),
                ms(&last["spawn_us"]),
                ms(&last["reattach_us"]),
                ms(&last["first_response_us"])
            )
        };
        out.push_str(&format!(
            "{:<16} {:<11} {:<11} {:>7} {:>5} {:>8} {:>8} {:>10}  {}\n",
            s(&i["name"]),
            s(&i["kind"]),
            s(&i["state"]),
            s(&i["pid"]),
            s(&i["domid"]),
            s(&i["restarts"]),
            uptime(&i["uptime_ms"]),
            ms(&last["outage_us"]),
            phases
        ));
    }
    out
}

/// The `guests` table.
pub fn guests_table(v: &Value) -> String {
    let mut out = format!(
        "{:<16} {:>5} {:<8} {:<8} {}\n",
        "GUEST", "DOMID", "KIND", "RUNNING", "DEVICES"
    );
    for g in v.as_array().into_iter().flatten() {
        let devs: Vec<String> = g["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        out.push_str(&format!(
            "{:<16} {:>5} {:<8} {:<8} {}\n",
            s(&g["name"]),
            s(&g["domid"]),
            s(&g["kind"]),
            if g["running"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            devs.join(",")
        ));
    }
    out
}

/// The `channels` table.
pub fn channels_table(v: &Value) -> String {
    let mut out = format!(
        "{:>3} {:<16} {:<16} {:<11} {:<6} {:>9} {:>9} {:>6}  {}\n",
        "#", "IDD", "GUEST", "KIND", "FAILED", "REQUESTS", "RESPONSES", "FILL", "DETAIL"
    );
    for c in v.as_array().into_iter().flatten() {
        let st = &c["stats"];
        let detail = match st["kind"].as_str() {
            Some("virtio-blk") => format!(
                "sectors {}+{}{}",
                s(&st["region_offset_sectors"]),
                s(&st["sectors"]),
                if st["read_only"].as_bool() == Some(true) {
                    " ro"
                } else {
                    ""
                }
            ),
            Some("virtio-net") => format!(
                "mac {} tx {}/{}B rx {}/{}B drop {} spoof {} credit {}",
                s(&st["mac"]),
                s(&st["tx_packets"]),
                s(&st["tx_bytes"]),
                s(&st["rx_packets"]),
                s(&st["rx_bytes"]),
                s(&st["drops"]),
                s(&st["spoofed"]),
                s(&st["credit"])
            ),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:>3} {:<16} {:<16} {:<11} {:<6} {:>9} {:>9} {:>6}  {}\n",
            s(&c["index"]),
            s(&c["idd"]),
            s(&c["guest"]),
            s(&st["kind"]),
            if c["failed"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            s(&st["requests"]),
            s(&st["responses"]),
            s(&st["in_flight"]),
            detail
        ));
    }
    out
}

/// One event as a line.
pub fn event_line(v: &Value) -> String {
    let kind = v["type"].as_str().unwrap_or("?");
    let what = match kind {
        "idd_state" => format!(
            "{} is {}{}",
            s(&v["idd"]),
            s(&v["state"]),
            v["reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        "recovery" => {
            let r = &v["recovery"];
            format!(
                "{} recovered #{} from {}: detect {} revoke {} spawn {} reattach {} first response {} = outage {}",
                s(&v["idd"]),
                s(&r["seq"]),
                s(&r["cause"]),
                ms(&r["detect_us"]),
                ms(&r["revoke_us"]),
                ms(&r["spawn_us"]),
                ms(&r["reattach_us"]),
                ms(&r["first_response_us"]),
                ms(&r["outage_us"])
            )
        }
        "fault_injected" => format!("{} <- {}", s(&v["idd"]), s(&v["fault"])),
        "channel_failed" => format!("{} refused channel {}", s(&v["idd"]), s(&v["channel"])),
        "guest_exited" => format!("guest {} exited", s(&v["guest"])),
        "policy_applied" => format!(
            "policy applied: {} change(s)",
            v["changes"].as_array().map_or(0, Vec::len)
        ),
        _ => v.to_string(),
    };
    format!("#{:<5} {:<15} {what}", s(&v["seq"]), kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parsing() {
        let text = ": subscribed\n\nevent: recovery\nid: 4\ndata: {\"a\":\ndata: 1}\n\n:keepalive\n\ndata: x\n\n";
        let v: Vec<SseMessage> = SseReader::new(text.as_bytes())
            .map(Result::unwrap)
            .collect();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].event, "recovery");
        assert_eq!(v[0].id.as_deref(), Some("4"));
        assert_eq!(v[0].data, "{\"a\":\n1}");
        assert_eq!(v[1].event, "message");
        assert_eq!(v[1].data, "x");
    }

    #[test]
    fn tables_render_missing_fields_as_dashes() {
        let v = serde_json::json!([{ "name": "idd-disk0", "state": "running", "restarts": 2,
            "last_recovery": { "seq": 2, "cause": "exited", "outage_us": 1500 } }]);
        let t = idds_table(&v);
        assert!(t.contains("idd-disk0"), "{t}");
        assert!(t.contains("1.5ms"), "{t}");
        let line =
            event_line(&serde_json::json!({"seq": 1, "type": "guest_exited", "guest": "bob"}));
        assert!(line.contains("guest bob exited"), "{line}");
        assert!(channels_table(&serde_json::json!([])).starts_with("  #"));
    }

    proptest::proptest! {
        /// Any bytes: the reader never panics, and every event it yields came from `data:`,
        /// `event:` or `id:` lines.
        #[test]
        fn sse_reader_takes_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            for m in SseReader::new(bytes.as_slice()) {
                let Ok(m) = m else { break };
                proptest::prop_assert!(!m.event.is_empty());
            }
        }

        /// Events written the way axum writes them read back the same.
        #[test]
        fn sse_round_trip(events in proptest::collection::vec(("[a-z_]{1,12}", 0u64..1000, "[ -~]{0,40}"), 1..8)) {
            let mut text = String::from(": subscribed\n\n");
            for (e, id, data) in &events {
                text.push_str(&format!("event: {e}\nid: {id}\ndata: {data}\n\n"));
            }
            let got: Vec<SseMessage> = SseReader::new(text.as_bytes()).map(Result::unwrap).collect();
            proptest::prop_assert_eq!(got.len(), events.len());
            for (g, (e, id, data)) in got.iter().zip(&events) {
                proptest::prop_assert_eq!(&g.event, e);
                proptest::prop_assert_eq!(g.id.clone(), Some(id.to_string()));
                proptest::prop_assert_eq!(&g.data, data);
            }
        }
    }
}
