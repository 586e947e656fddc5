//! A TCP proxy. In front of PostgreSQL it counts the statements its clients send
//! (simple-query `Q` and extended-protocol `Execute` messages), so a test can measure
//! exactly what outboxd sends, without touching the shared server's settings; in front
//! of any service it can stand in for one that comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct CountingProxy {
    pub addr: SocketAddr,
    statements: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    refusing: Arc<std::sync::atomic::AtomicBool>,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    /// Microseconds each chunk from a client waits before it is passed on (0: none).
    pace: Arc<AtomicU64>,
}

impl CountingProxy {
    pub async fn start(upstream: SocketAddr) -> CountingProxy {
        Self::start_on("127.0.0.1:0".parse().unwrap(), upstream).await
    }

    /// A proxy on a given address (for example a port that refused connections until
    /// now: a service "coming back"). Counting only means something for PostgreSQL.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> CountingProxy {
        Self::start_with(listen, upstream, std::time::Duration::ZERO).await
    }

    /// A proxy that holds every chunk the server sends for `latency` before passing it
    /// on: replies (and broker confirms) arrive that much later.
    pub async fn start_with_latency(
        upstream: SocketAddr,
        latency: std::time::Duration,
    ) -> CountingProxy {
        Self::start_with("127.0.0.1:0".parse().unwrap(), upstream, latency).await
    }

    async fn start_with(
        listen: SocketAddr,
        upstream: SocketAddr,
        latency: std::time::Duration,
    ) -> CountingProxy {
        let listener = TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let statements = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&statements);
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tracked, refuse) = (Arc::clone(&connections), Arc::clone(&refusing));
        let stall = Arc::clone(&stalled);
        let pace = Arc::new(AtomicU64::new(0));
        let paced = Arc::clone(&pace);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    drop(client); // closed at once: the service is "down"
                    continue;
                }
                let counter = Arc::clone(&counter);
                let stall = Arc::clone(&stall);
                let paced = Arc::clone(&paced);
                let handle = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pipe(client, server, counter, latency, stall, paced).await;
                    }
                });
                tracked.lock().unwrap().push(handle.abort_handle());
            }
        });
        CountingProxy {
            addr,
            statements,
            task,
            connections,
            refusing,
            stalled,
            pace,
        }
    }

    /// From now on, every chunk (up to 16 KiB) a client sends waits `per_chunk` before
    /// it is passed on: a slow uplink, so a large message takes long to arrive while
    /// small ones still pass quickly.
    pub fn pace_uploads(&self, per_chunk: std::time::Duration) {
        self.pace
            .store(per_chunk.as_micros() as u64, Ordering::SeqCst);
    }

    /// Drops every open connection (both ends see it close).
    pub fn cut(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// While on, new connections are closed as soon as they are accepted.
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::SeqCst);
    }

    /// While on, connections stay open but nothing passes either way: a stalled server.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }

    /// Statements sent through the proxy so far.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::SeqCst)
    }

    /// A PostgreSQL URL for `database` through the proxy.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@{}/{database}?sslmode=disable",
            self.addr
        )
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hold_while(stalled: &std::sync::atomic::AtomicBool) {
    while stalled.load(Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    counter: Arc<AtomicU64>,
    latency: std::time::Duration,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    pace: Arc<AtomicU64>,
) {
    let stalled_down = Arc::clone(&stalled);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let mut parser = FrontendParser::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            parser.feed(&buf[..n], &counter);
            let wait = pace.load(Ordering::SeqCst);
            if wait > 0 {
                tokio::time::sleep(std::time::Duration::from_micros(wait)).await;
            }
            hold_while(&stalled).await;
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            hold_while(&stalled_down).await;
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// Walks the frontend message stream: an untyped startup packet (possibly preceded by
/// SSL/GSS requests), then typed messages (1-byte type, 4-byte length).
#[derive(Default)]
struct FrontendParser {
    startup_done: bool,
    header: Vec<u8>,
    skip: usize,
}

impl FrontendParser {
    fn feed(&mut self, mut data: &[u8], counter: &AtomicU64) {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
            }
            if data.is_empty() {
                return;
            }
            let need = if self.startup_done { 5 } else { 8 };
            let take = (need - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.header.len() < need {
                return;
            }
            if self.startup_done {
                let kind = self.header[0];
                let len = u32::from_be_bytes(self.header[1..5].try_into().unwrap()) as usize;
                if kind == b'Q' || kind == b'E' {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                self.skip = len.saturating_sub(4);
            } else {
                let len = u32::from_be_bytes(self.header[0..4].try_into().unwrap()) as usize;
                let code = u32::from_be_bytes(self.header[4..8].try_into().unwrap());
                // 80877103 SSLRequest, 80877104 GSSENCRequest: the real startup follows.
                if code != 80_877_103 && code != 80_877_104 {
                    self.startup_done = true;
                }
                self.skip = len.saturating_sub(8);
            }
            self.header.clear();
        }
    }
}
