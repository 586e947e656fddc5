//! A TLS-terminating proxy: speaks TLS (with a certificate the test made) to its
//! clients and plain TCP to the upstream service, so a test can use `amqps://` without
//! touching the shared broker's configuration.

use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};

pub struct TlsProxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    /// `cert_pem`/`key_pem` (PKCS#8): the server's certificate and key.
    pub async fn start(upstream: SocketAddr, cert_pem: &[u8], key_pem: &[u8]) -> TlsProxy {
        let identity =
            native_tls::Identity::from_pkcs8(cert_pem, key_pem).expect("server identity");
        let acceptor =
            tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        TlsProxy { addr, task }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
