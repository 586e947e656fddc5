//! A real HTTP endpoint on 127.0.0.1 for webhook tests: it records every request and
//! answers as the test's script says (status, headers, a delay or silence), and the
//! script can be changed while it runs.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as the endpoint received it.
#[derive(Debug, Clone)]
pub struct Hit {
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub json: serde_json::Value,
    pub at: Instant,
    /// How many requests with this `webhook-id` came before this one.
    pub earlier_tries: usize,
}

impl Hit {
    pub fn id(&self) -> &str {
        self.headers
            .get("webhook-id")
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn event_type(&self) -> &str {
        self.json["event_type"].as_str().unwrap_or("")
    }
}

/// What the endpoint answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// `Some(None)`: never answer. `Some(Some(d))`: answer after `d`.
    pub delay: Option<Option<Duration>>,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: None,
        }
    }

    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn silent() -> Reply {
        Reply {
            delay: Some(None),
            ..Reply::status(200)
        }
    }

    pub fn with_body(mut self, body: &str) -> Reply {
        self.body = body.to_string();
        self
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

pub type Script = Arc<dyn Fn(&Hit) -> Reply + Send + Sync>;

struct Shared {
    hits: Mutex<Vec<Hit>>,
    tries: Mutex<HashMap<String, usize>>,
    script: Mutex<Script>,
}

/// A running endpoint.
pub struct Endpoint {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    pub async fn start(script: impl Fn(&Hit) -> Reply + Send + Sync + 'static) -> Endpoint {
        Self::start_on("127.0.0.1:0".parse().unwrap(), script).await
    }

    /// On a given address (a port that refused connections until now).
    pub async fn start_on(
        addr: SocketAddr,
        script: impl Fn(&Hit) -> Reply + Send + Sync + 'static,
    ) -> Endpoint {
        let shared = Arc::new(Shared {
            hits: Mutex::new(Vec::new()),
            tries: Mutex::new(HashMap::new()),
            script: Mutex::new(Arc::new(script)),
        });
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Endpoint { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// Changes how the endpoint answers from now on.
    pub fn answer(&self, script: impl Fn(&Hit) -> Reply + Send + Sync + 'static) {
        *self.shared.script.lock().unwrap() = Arc::new(script);
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap().clone()
    }

    /// The hits so far, readable after the endpoint moved elsewhere.
    pub fn hits_handle(&self) -> impl Fn() -> Vec<Hit> + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || shared.hits.lock().unwrap().clone()
    }

    /// Waits until `condition` holds for the hits so far (or the timeout passes).
    pub async fn wait_until(
        &self,
        timeout: Duration,
        condition: impl Fn(&[Hit]) -> bool,
    ) -> Vec<Hit> {
        let deadline = Instant::now() + timeout;
        loop {
            let hits = self.hits();
            if condition(&hits) || Instant::now() > deadline {
                return hits;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let hit = {
        let mut hits = shared.hits.lock().unwrap();
        let id = headers.get("webhook-id").cloned().unwrap_or_default();
        let earlier_tries = {
            let mut tries = shared.tries.lock().unwrap();
            let count = tries.entry(id).or_insert(0);
            *count += 1;
            *count - 1
        };
        let hit = Hit {
            json: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            headers,
            body: body.to_vec(),
            at: Instant::now(),
            earlier_tries,
        };
        hits.push(hit.clone());
        hit
    };
    let script = shared.script.lock().unwrap().clone();
    let reply = script(&hit);
    match reply.delay {
        Some(None) => std::future::pending::<()>().await,
        Some(Some(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap(),
        reply.body.clone(),
    )
        .into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    response
}

/// Verifies requests with the public `standardwebhooks` package (PyPI), an
/// implementation independent of outboxd's signer. Each item: (secret, hit).
pub fn verify_with_standardwebhooks(items: &[(&str, &Hit)]) -> Result<String, String> {
    let cases: Vec<serde_json::Value> = items
        .iter()
        .map(|(secret, hit)| {
            serde_json::json!({
                "secret": secret,
                "body": String::from_utf8_lossy(&hit.body),
                "headers": {
                    "webhook-id": hit.headers.get("webhook-id"),
                    "webhook-timestamp": hit.headers.get("webhook-timestamp"),
                    "webhook-signature": hit.headers.get("webhook-signature"),
                }
            })
        })
        .collect();
    let script = r#"
import json, sys
try:
    from standardwebhooks.webhooks import Webhook
except ImportError as error:
    print(f"MISSING {error}", file=sys.stderr)
    sys.exit(3)
cases = json.load(sys.stdin)
for case in cases:
    Webhook(case["secret"]).verify(case["body"], case["headers"])
print(f"verified {len(cases)} request(s)")
"#;
    let python = super::test_python();
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&cases).unwrap().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    // A missing verifier fails the test; it must never look like a refused signature.
    assert_ne!(
        output.status.code(),
        Some(3),
        "the standardwebhooks verifier is missing ({}): run the suite with ./scripts/test",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(format!(
            "standardwebhooks refused a request : {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
