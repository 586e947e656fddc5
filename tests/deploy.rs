//! What operators deploy with: the Dockerfile passes hadolint, `docker-compose.yml` is
//! valid and its broker has the demo queue bound, the systemd unit verifies. hadolint
//! comes with `./scripts/test`; `docker-compose` and `systemd-analyze` are used when the
//! machine has them (the test says so when it does not).

use std::process::Command;

fn exists(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// The Dockerfile is clean under hadolint (pinned apt packages, among the rest).
#[test]
fn the_dockerfile_passes_hadolint() {
    let hadolint = std::env::var("HADOLINT").unwrap_or_else(|_| {
        panic!("HADOLINT is not set: run the suite with ./scripts/test, which brings hadolint")
    });
    let output = Command::new(&hadolint)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {hadolint}: {e}"));
    assert!(
        output.status.success(),
        "hadolint: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let dockerfile = include_str!("../Dockerfile");
    for needed in [
        "HEALTHCHECK",
        "ENV OUTBOXD_HTTP_LISTEN=0.0.0.0:9187",
        "USER 10001:10001",
    ] {
        assert!(dockerfile.contains(needed), "the Dockerfile lacks {needed}");
    }
}

/// The compose file is valid, publishes nothing on the usual ports of a local
/// PostgreSQL or RabbitMQ, and its broker starts with outboxd's exchange bound to a queue
/// (otherwise every event is returned unroutable and dead-lettered).
#[test]
fn the_compose_stack_is_valid_and_its_events_have_a_queue() {
    let compose = include_str!("../docker-compose.yml");
    for taken in ["\"5432:", "\"5672:", "\"15672:"] {
        assert!(
            !compose.contains(taken),
            "a host port clashes with local services: {taken}"
        );
    }
    let definitions: serde_json::Value =
        serde_json::from_str(include_str!("../deploy/rabbitmq/definitions.json")).unwrap();
    let exchange = outboxd::Config::default().rabbitmq.exchange;
    let bound = definitions["bindings"].as_array().unwrap().iter().any(|b| {
        b["source"] == exchange.as_str()
            && b["routing_key"] == "#"
            && b["destination_type"] == "queue"
    });
    assert!(bound, "no queue bound to {exchange} with '#'");
    assert!(
        definitions["users"]
            .as_array()
            .is_some_and(|u| !u.is_empty()),
        "a definitions import at boot skips the default user: the file must define one"
    );
    if !exists("docker-compose") {
        eprintln!("docker-compose is not on this machine: the compose file was not validated");
        return;
    }
    let output = Command::new("docker-compose")
        .args([
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"),
            "config",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The systemd unit in `deploy/` is hardened, gives the drain longer than
/// `relay.shutdown_grace` before SIGKILL, and passes `systemd-analyze verify` (run when
/// the machine has it; the unit's binary path is pointed at the one under test).
#[test]
fn the_systemd_unit_verifies_and_outlasts_the_shutdown_grace() {
    let unit = include_str!("../deploy/outboxd.service");
    let stop = unit
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec is set");
    let stop = outboxd::duration_text::parse(stop.trim()).unwrap();
    let grace = outboxd::Config::default().relay.shutdown_grace;
    assert!(
        stop > grace,
        "TimeoutStopSec {stop:?} <= shutdown_grace {grace:?}"
    );
    for setting in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "ExecStart=/usr/local/bin/outboxd run",
    ] {
        assert!(unit.contains(setting), "the unit lacks {setting}");
    }
    if !exists("systemd-analyze") {
        eprintln!("systemd-analyze is not on this machine: the unit was not verified");
        return;
    }
    let dir = std::env::temp_dir().join(format!("outboxd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("outboxd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/outboxd", env!("CARGO_BIN_EXE_outboxd")),
    )
    .unwrap();
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(
        verified.status.success() && !said.contains("outboxd.service:"),
        "systemd-analyze verify: {said}"
    );
}
