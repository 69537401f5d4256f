//! A minimal JSON client of vireod's REST API over its Unix socket: one HTTP/1.1 connection
//! per client (kept alive across requests, as a real API client would), timing every request.

use std::path::Path;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// No single API request of the benchmark may take longer than this.
const REQUEST_LIMIT: Duration = Duration::from_secs(30);

pub struct Client {
    send: SendRequest<Full<Bytes>>,
}

pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
    pub took: Duration,
}

impl Answer {
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("answer is not JSON: {e}"))
    }

    /// The body as text, for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Client, String> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        let (send, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client { send })
    }

    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, String> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", "vireod");
        let payload = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let started = Instant::now();
        let exchange = async {
            self.send
                .ready()
                .await
                .map_err(|e| format!("connection lost: {e}"))?;
            let resp = self
                .send
                .send_request(req)
                .await
                .map_err(|e| format!("{e}"))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = tokio::time::timeout(REQUEST_LIMIT, exchange)
            .await
            .map_err(|_| format!("{method} {path}: no answer within {REQUEST_LIMIT:?}"))?
            .map_err(|e| format!("{method} {path}: {e}"))?;
        Ok(Answer {
            status,
            body,
            took: started.elapsed(),
        })
    }

    /// A call that must succeed with `want`; anything else is an error naming the request.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        want: StatusCode,
    ) -> Result<Answer, String> {
        let a = self.call(method.clone(), path, body).await?;
        if a.status != want {
            return Err(format!(
                "{method} {path}: {} (wanted {want}): {}",
                a.status,
                a.text()
            ));
        }
        Ok(a)
    }
}
