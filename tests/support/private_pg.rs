//! A PostgreSQL cluster of a test's own (initdb + pg_ctl on a free port, in a temporary
//! directory, run as the `postgres` user: PostgreSQL refuses to run as root), for faults
//! the shared server must never see, such as a restart.

use std::path::PathBuf;
use std::process::Command;

pub struct PrivateCluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    options: Vec<String>,
}

fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb")
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    let output = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .expect("runuser");
    assert!(
        output.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl PrivateCluster {
    /// A new cluster, started, trusting local connections.
    pub fn start() -> PrivateCluster {
        Self::start_with(None, |_| Vec::new())
    }

    /// A new cluster; with `password`, connections must authenticate (scram-sha-256);
    /// `options(dir)` adds server settings (`-c name=value`), e.g. files placed in `dir`.
    pub fn start_with(
        password: Option<&str>,
        options: impl FnOnce(&std::path::Path) -> Vec<String>,
    ) -> PrivateCluster {
        let dir =
            std::env::temp_dir().join(format!("outboxd-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let chown = Command::new("chown")
            .args(["postgres:postgres", dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(chown.success());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = bin_dir();
        let data = dir.join("data");
        let pwfile = dir.join("pwfile");
        let mut initdb = vec![
            bin.join("initdb").to_str().unwrap().to_string(),
            "-D".into(),
            data.to_str().unwrap().into(),
            "-U".into(),
            "postgres".into(),
            "--no-sync".into(),
        ];
        match password {
            Some(password) => {
                std::fs::write(&pwfile, password).unwrap();
                let chown = Command::new("chown")
                    .args(["postgres:postgres", pwfile.to_str().unwrap()])
                    .status()
                    .unwrap();
                assert!(chown.success());
                initdb.extend([
                    "-A".into(),
                    "scram-sha-256".into(),
                    format!("--pwfile={}", pwfile.display()),
                ]);
            }
            None => initdb.extend(["-A".into(), "trust".into()]),
        }
        let initdb: Vec<&str> = initdb.iter().map(String::as_str).collect();
        as_postgres(&initdb);
        let options = options(&dir);
        let cluster = PrivateCluster {
            dir,
            port,
            bin,
            options,
        };
        cluster.pg_ctl(&["start"]);
        cluster
    }

    fn pg_ctl(&self, action: &[&str]) {
        let data = self.dir.join("data");
        let log = self.dir.join("log");
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        for option in &self.options {
            options.push_str(" -c ");
            options.push_str(option);
        }
        let mut args = vec![
            self.bin.join("pg_ctl").to_str().unwrap().to_string(),
            "-D".into(),
            data.to_str().unwrap().into(),
            "-l".into(),
            log.to_str().unwrap().into(),
            "-o".into(),
            options,
            "-w".into(),
        ];
        args.extend(action.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        as_postgres(&args);
    }

    /// Restarts the server (fast shutdown: every connection is cut).
    pub fn restart(&self) {
        self.pg_ctl(&["restart", "-m", "fast"]);
    }

    /// Creates `database`, migrated as `outboxd migrate` does; returns its URL.
    pub async fn migrated_database(&self, database: &str) -> String {
        let timeout = std::time::Duration::from_secs(5);
        let admin = outboxd::store::connect_once(&self.url("postgres"), timeout, "test")
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        let url = self.url(database);
        let mut client = outboxd::store::connect_once(&url, timeout, "test")
            .await
            .unwrap();
        outboxd::store::migrate::run(&mut client).await.unwrap();
        outboxd::store::partitions::ensure(&mut client, 7)
            .await
            .unwrap();
        url
    }

    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
