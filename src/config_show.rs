//! `outboxd config show`: the effective configuration as TOML, every secret hidden, each
//! value followed by where it came from (a flag, the environment, the file, or the
//! default), so an operator sees what an instance started with that config would run.

use crate::config::Layers;
use crate::secret::redact;
use crate::sink::webhook::config::shown;

/// Where one setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Environment,
    Flag(&'static str),
}

impl Source {
    fn describe(&self, file: Option<&str>) -> String {
        match self {
            Source::Default => "default".into(),
            Source::File => format!("file {}", file.unwrap_or("(none)")),
            Source::Environment => "environment".into(),
            Source::Flag(flag) => format!("flag {flag}"),
        }
    }
}

/// Keys whose values are secrets: never shown.
const SECRET_KEYS: [&str; 4] = ["secret", "secrets", "admin_token", "password"];

/// The value as it may be shown: secrets replaced, URLs without passwords (webhook URLs
/// without path and query, where endpoints keep tokens).
fn shown_value(path: &[&str], value: &toml::Value) -> toml::Value {
    let key = path.last().copied().unwrap_or("");
    if SECRET_KEYS.contains(&key) {
        return match value {
            toml::Value::Array(items) => {
                toml::Value::Array(items.iter().map(|_| "***".into()).collect())
            }
            toml::Value::String(s) if s.is_empty() => value.clone(),
            _ => "***".into(),
        };
    }
    match value {
        toml::Value::String(text) if key.ends_with("url") && !text.is_empty() => {
            if path.first() == Some(&"webhooks") {
                shown(text).into()
            } else {
                redact(text).into()
            }
        }
        _ => value.clone(),
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(*first)?;
    if rest.is_empty() {
        return Some(value);
    }
    lookup(value.as_table()?, rest)
}

/// The text `outboxd config show` prints. `flags`: settings given as command-line flags
/// (`("database.url", "--database-url")`).
pub fn render(layers: &Layers, file: Option<&str>, flags: &[(&str, &'static str)]) -> String {
    let effective = toml::Table::try_from(&layers.config).expect("the config serializes");
    let mut out = String::from(
        "# the effective configuration; secrets hidden; after each value, where it came from\n",
    );
    render_table(&mut out, &effective, &mut Vec::new(), layers, file, flags);
    out
}

fn render_table<'a>(
    out: &mut String,
    table: &'a toml::Table,
    path: &mut Vec<&'a str>,
    layers: &Layers,
    file: Option<&str>,
    flags: &[(&str, &'static str)],
) {
    // Plain values first, under their [section] header; then nested tables.
    let plain: Vec<(&String, &toml::Value)> = table.iter().filter(|(_, v)| !v.is_table()).collect();
    if !plain.is_empty() && !path.is_empty() {
        out.push_str(&format!("\n[{}]\n", path.join(".")));
    }
    for (key, value) in plain {
        path.push(key);
        let dotted = path.join(".");
        let source = if let Some((_, flag)) = flags.iter().find(|(k, _)| *k == dotted) {
            Source::Flag(flag)
        } else if lookup(&layers.from_env, path).is_some() {
            Source::Environment
        } else if lookup(&layers.file, path).is_some() {
            Source::File
        } else {
            Source::Default
        };
        out.push_str(&format!(
            "{key} = {}  # {}\n",
            shown_value(path, value),
            source.describe(file)
        ));
        path.pop();
    }
    for (key, value) in table.iter().filter(|(_, v)| v.is_table()) {
        path.push(key);
        render_table(
            out,
            value.as_table().expect("a table"),
            path,
            layers,
            file,
            flags,
        );
        path.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn every_value_says_where_it_came_from_and_no_secret_shows() {
        let dir = std::env::temp_dir().join(format!("outboxd-show-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("outboxd.toml");
        std::fs::write(
            &path,
            "[relay]\nbatch_size = 200\n\n[webhooks.billing]\nurl = \"https://hooks.example/services/T0/B0/PATHSECRET?token=QUERYSECRET\"\nsecrets = [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n\n[[routing.routes]]\nevent_types = [\"*\"]\ndestinations = [\"webhook:billing\"]\n",
        )
        .unwrap();
        let env = vec![
            (
                "DATABASE_URL".to_string(),
                "postgres://app:DBPASSWORD@db:5432/app".to_string(),
            ),
            ("OUTBOXD_RELAY_LEASE".to_string(), "30s".to_string()),
            (
                "OUTBOXD_HTTP_ADMIN_TOKEN".to_string(),
                "TOKEN0123456789abcdef".to_string(),
            ),
        ];
        let layers = Config::load_layers(Some(&path), env).unwrap();
        let text = render(&layers, Some("outboxd.toml"), &[]);
        std::fs::remove_dir_all(&dir).unwrap();
        for secret in [
            "DBPASSWORD",
            "PATHSECRET",
            "QUERYSECRET",
            "whsec_",
            "TOKEN0123",
        ] {
            assert!(!text.contains(secret), "{secret} shown:\n{text}");
        }
        for line in [
            "batch_size = 200  # file outboxd.toml",
            "lease = \"30s\"  # environment",
            "max_in_flight_batches = 4  # default",
            "url = \"postgres://app:***@db:5432/app\"  # environment",
            "admin_token = \"***\"  # environment",
            "url = \"https://hooks.example/…\"  # file outboxd.toml",
            "secrets = [\"***\"]  # file outboxd.toml",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(text.contains("[webhooks.billing]"), "{text}");
        // What it prints is a config that loads (secrets aside): every key is known.
        assert!(text.parse::<toml::Table>().is_ok(), "{text}");
    }
}
