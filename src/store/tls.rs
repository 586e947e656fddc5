//! PostgreSQL connection strings and TLS. tokio-postgres understands only
//! `sslmode=disable|prefer|require`; outboxd also takes `verify-ca` and `verify-full`
//! (with `sslrootcert`) and maps each mode onto its TLS connector itself, so a verifying
//! mode is never silently downgraded.

use postgres_native_tls::MakeTlsConnector;
use std::str::FromStr;
use tokio_postgres::config::SslMode;

/// How the server certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// `disable`, `prefer`, `require`: encryption without authentication (as libpq).
    None,
    /// `verify-ca`: the chain must lead to a trusted root.
    Ca,
    /// `verify-full`: the chain and the host name.
    Full,
}

/// A parsed connection string and the TLS connector it asks for.
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub verify: Verify,
    pub root_cert: Option<String>,
}

impl PgTarget {
    /// The TLS connector for this target.
    pub fn connector(&self) -> Result<MakeTlsConnector, String> {
        let mut builder = native_tls::TlsConnector::builder();
        match self.verify {
            Verify::None => {
                builder.danger_accept_invalid_certs(true);
                builder.danger_accept_invalid_hostnames(true);
            }
            Verify::Ca => {
                builder.danger_accept_invalid_hostnames(true);
            }
            Verify::Full => {}
        }
        if let Some(path) = &self.root_cert {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?;
            let cert = native_tls::Certificate::from_pem(&pem)
                .map_err(|e| format!("sslrootcert {path} is not a PEM certificate: {e}"))?;
            builder.add_root_certificate(cert);
        }
        let connector = builder
            .build()
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        Ok(MakeTlsConnector::new(connector))
    }
}

/// Parses a PostgreSQL URL or key=value string, taking out `sslmode` and `sslrootcert`
/// where tokio-postgres would refuse or ignore them.
pub fn parse_url(url: &str) -> Result<PgTarget, String> {
    let mut sslmode: Option<String> = None;
    let mut root_cert: Option<String> = None;
    let rest = if url.contains("://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| match pair.split_once('=') {
                        Some(("sslmode", v)) => {
                            sslmode = Some(v.to_string());
                            false
                        }
                        Some(("sslrootcert", v)) => {
                            root_cert = Some(percent_decode(v));
                            false
                        }
                        _ => true,
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_string(),
        }
    } else {
        url.split_whitespace()
            .filter(|part| match part.split_once('=') {
                Some(("sslmode", v)) => {
                    sslmode = Some(v.to_string());
                    false
                }
                Some(("sslrootcert", v)) => {
                    root_cert = Some(v.to_string());
                    false
                }
                _ => true,
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
        format!("not a PostgreSQL connection string ({e}); expected postgres://user[:password]@host[:port]/database")
    })?;
    let verify = match sslmode.as_deref() {
        None | Some("prefer") => {
            config.ssl_mode(SslMode::Prefer);
            Verify::None
        }
        Some("disable") => {
            config.ssl_mode(SslMode::Disable);
            Verify::None
        }
        Some("require") => {
            config.ssl_mode(SslMode::Require);
            // libpq: require with a root certificate behaves as verify-ca.
            if root_cert.is_some() {
                Verify::Ca
            } else {
                Verify::None
            }
        }
        Some("verify-ca") => {
            config.ssl_mode(SslMode::Require);
            Verify::Ca
        }
        Some("verify-full") => {
            config.ssl_mode(SslMode::Require);
            Verify::Full
        }
        Some(other) => {
            return Err(format!(
                "sslmode={other} is not supported; use disable, prefer, require, verify-ca or verify-full"
            ));
        }
    };
    if config.get_hosts().is_empty() {
        return Err("names no host; expected postgres://user@host:port/database".into());
    }
    Ok(PgTarget {
        config,
        verify,
        root_cert,
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifying_modes_are_kept_not_downgraded() {
        let t =
            parse_url("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem").unwrap();
        assert_eq!(t.verify, Verify::Full);
        assert_eq!(t.root_cert.as_deref(), Some("/tmp/ca.pem"));
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        let t = parse_url("host=h user=u sslmode=verify-ca").unwrap();
        assert_eq!(t.verify, Verify::Ca);
        let t = parse_url("postgres://u@h/db?sslmode=disable&application_name=x").unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert!(parse_url("postgres://u@h/db?sslmode=allow-everything").is_err());
        assert!(parse_url("not a url at all =").is_err());
    }
}
