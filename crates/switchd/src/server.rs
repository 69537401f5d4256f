//! `switch.sock`: the JSON-lines protocol vireod drives the switch with (`vireo_api::switch`).
//! One thread accepts, one thread per connection answers its requests in turn; changes are
//! applied one at a time. A malformed line, an over-long line or a request of another protocol
//! version gets `Error` and the connection stays usable.

use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;
use vireo_api::switch::{SwitchOp, SwitchReply, SwitchRequest, SWITCH_PROTOCOL_VERSION};

use crate::ports::Ports;

/// Longest request line accepted: a port with a few thousand ACL rules fits.
pub const MAX_REQUEST: usize = 1 << 20;

/// What the requests act on.
pub struct State {
    pub switch_id: Uuid,
    /// `None` once the switch is shutting down.
    pub ports: Mutex<Option<Ports>>,
    /// Set by `Shutdown`; the main thread then tears the switch down.
    pub shutdown: AtomicBool,
}

impl State {
    fn ports(&self) -> std::sync::MutexGuard<'_, Option<Ports>> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the ports out for the teardown; later requests get `Error`.
    pub fn take_ports(&self) -> Option<Ports> {
        self.ports().take()
    }
}

/// Serves `listener` on a thread of its own, a thread per connection.
pub fn start(listener: UnixListener, state: Arc<State>) -> std::io::Result<()> {
    vireo_linesock::start(listener, "switch", move |conn| serve(&state, conn))
}

fn serve(s: &State, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut input = BufReader::new(conn);
    loop {
        let reply = match vireo_linesock::read_line(&mut input, MAX_REQUEST) {
            Ok(None) | Err(_) => return,
            Ok(Some(Err(vireo_linesock::TooLong))) => SwitchReply::Error {
                message: format!("request longer than {MAX_REQUEST} bytes"),
            },
            Ok(Some(Ok(line))) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Some(Ok(line))) => match parse(&line) {
                Ok(op) => answer(s, op),
                Err(message) => SwitchReply::Error { message },
            },
        };
        let mut text = serde_json::to_string(&reply).unwrap_or_else(|e| {
            format!(r#"{{"reply":"error","message":"encoding the reply: {e}"}}"#)
        });
        text.push('\n');
        let sent = out.write_all(text.as_bytes()).is_ok();
        // The reply to Shutdown goes out before the teardown starts.
        if s.shutdown.load(Ordering::SeqCst) || !sent {
            return;
        }
    }
}

/// A request line to its operation; the error is the message for the `Error` reply.
pub fn parse(line: &[u8]) -> Result<SwitchOp, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("malformed request (not JSON): {e}"))?;
    match value.get("version").map(|v| v.as_u64()) {
        None => return Err("malformed request: no \"version\"".into()),
        Some(Some(v)) if v == u64::from(SWITCH_PROTOCOL_VERSION) => {}
        Some(v) => {
            let shown = v.map_or_else(|| value["version"].to_string(), |v| v.to_string());
            return Err(format!(
                "protocol version {shown} is not spoken here: this switch speaks version \
                 {SWITCH_PROTOCOL_VERSION}"
            ));
        }
    }
    serde_json::from_value::<SwitchRequest>(value)
        .map(|r| r.op)
        .map_err(|e| format!("malformed request: {e}"))
}

fn hello(s: &State) -> SwitchReply {
    SwitchReply::Hello {
        version: SWITCH_PROTOCOL_VERSION,
        switch_id: s.switch_id,
        pid: std::process::id(),
    }
}

fn answer(s: &State, op: SwitchOp) -> SwitchReply {
    // Hello needs no ports: it is answered during a shutdown too.
    if let SwitchOp::Hello = op {
        return hello(s);
    }
    let mut guard = s.ports();
    let Some(ports) = guard.as_mut() else {
        return SwitchReply::Error {
            message: "the switch is shutting down".into(),
        };
    };
    let done = |what: &str, r: Result<(), crate::SwitchdError>| match r {
        Ok(()) => SwitchReply::Ok,
        Err(e) => {
            tracing::warn!("{what}: {e}");
            SwitchReply::Error {
                message: format!("{what}: {e}"),
            }
        }
    };
    match op {
        SwitchOp::Hello => hello(s),
        SwitchOp::AddPort { port } => {
            let what = format!("add port {:?}", port.config.name);
            done(&what, ports.add(port))
        }
        SwitchOp::RemovePort { name } => {
            done(&format!("remove port {name:?}"), ports.remove(&name))
        }
        SwitchOp::SetPort { config } => {
            let what = format!("set port {:?}", config.name);
            done(&what, ports.set(config))
        }
        SwitchOp::SetUplinkMirror { mirror } => {
            let what = format!("set the uplink's mirror to {mirror:?}");
            done(&what, ports.set_uplink_mirror(&mirror))
        }
        SwitchOp::Status => SwitchReply::Status {
            ports: ports.status(),
        },
        SwitchOp::ResetMeters => {
            ports.reset_meters();
            SwitchReply::Ok
        }
        SwitchOp::SetPolicy { entry } => {
            let what = format!(
                "set policy for CA {} in {:?}",
                entry.ca, entry.routing_domain
            );
            done(&what, ports.set_policy(&entry))
        }
        SwitchOp::RemovePolicy { routing_domain, ca } => {
            let what = format!("remove policy for CA {ca} in {routing_domain:?}");
            done(&what, ports.remove_policy(&routing_domain, ca))
        }
        SwitchOp::ListPolicies => SwitchReply::Policies {
            entries: ports.policies(),
        },
        SwitchOp::SetGateway { gateway } => {
            let what = format!("set gateway {:?}", gateway.name);
            done(&what, ports.set_gateway(gateway))
        }
        SwitchOp::RemoveGateway { name } => done(
            &format!("remove gateway {name:?}"),
            ports.remove_gateway(&name),
        ),
        SwitchOp::ListGateways => SwitchReply::Gateways {
            gateways: ports.gateways(),
        },
        SwitchOp::Announce { name } => {
            let r = ports.announce(&name).map(|n| {
                tracing::info!("port {name:?} announced ({n} frames)");
            });
            done(&format!("announce port {name:?}"), r)
        }
        SwitchOp::Shutdown => {
            tracing::info!("shutdown requested");
            s.shutdown.store(true, Ordering::SeqCst);
            SwitchReply::Ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_other_versions_and_malformed_lines_with_a_message() {
        assert_eq!(parse(br#"{"version":1,"op":"hello"}"#), Ok(SwitchOp::Hello));
        assert_eq!(
            parse(br#"{"version":1,"op":"remove_port","name":"a"}"#),
            Ok(SwitchOp::RemovePort { name: "a".into() })
        );
        let e = parse(br#"{"version":2,"op":"hello"}"#).unwrap_err();
        assert!(e.contains("protocol version 2 is not spoken here"), "{e}");
        let e = parse(br#"{"version":"1","op":"hello"}"#).unwrap_err();
        assert!(e.contains("protocol version \"1\""), "{e}");
        assert!(parse(br#"{"op":"hello"}"#)
            .unwrap_err()
            .contains("no \"version\""));
        assert!(parse(b"hello").unwrap_err().contains("not JSON"));
        let e = parse(br#"{"version":1,"op":"explode"}"#).unwrap_err();
        assert!(e.starts_with("malformed request"), "{e}");
    }
}
