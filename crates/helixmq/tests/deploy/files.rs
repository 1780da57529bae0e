//! The deployment files hang together: both compose files parse, have the
//! services, profile, ports, cookie, volumes and limits the spec asks for,
//! every file they mount exists in the repository, every path the RabbitMQ
//! configuration files name is provided by a mount or by the entrypoint, the
//! cluster peers match the services, and the entrypoint writes a user RabbitMQ
//! can authenticate (salted SHA-256 hash checked here). No Docker is needed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn yaml(rel: &str) -> Value {
    let text = std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

/// `key = value` lines of a rabbitmq.conf (new-style format); duplicates refused.
fn conf(rel: &str) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once(" = ")
            .unwrap_or_else(|| panic!("{rel}:{}: not `key = value`: {line}", n + 1));
        assert!(
            k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "{rel}:{}: bad key {k:?}",
            n + 1
        );
        assert!(
            out.insert(k.to_string(), v.to_string()).is_none(),
            "{rel}:{}: duplicate key {k}",
            n + 1
        );
    }
    out
}

/// A service's volume mounts: (host, container). Host is `./path` or a named volume.
fn mounts(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_array()
        .expect("volumes list")
        .iter()
        .map(|v| {
            let s = v.as_str().expect("short volume syntax");
            let mut parts = s.split(':');
            (
                parts.next().unwrap().to_string(),
                parts.next().expect("HOST:CONTAINER").to_string(),
            )
        })
        .collect()
}

fn mounted_from<'a>(ms: &'a [(String, String)], target: &str) -> Option<&'a str> {
    ms.iter()
        .find(|(_, c)| c == target)
        .map(|(h, _)| h.as_str())
}

/// The folder the entrypoint writes definitions to (its `DEFS_DIR` default).
fn entrypoint_defs_dir() -> String {
    let text = std::fs::read_to_string(root().join("deploy/rabbitmq/entrypoint.sh")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("dir=${DEFS_DIR:-"))
        .expect("DEFS_DIR default in entrypoint.sh");
    line.trim_start_matches("dir=${DEFS_DIR:-")
        .trim_end_matches('}')
        .to_string()
}

/// Checks every compose service of `file` shares: mounted files exist, named
/// volumes are declared, the entrypoint is mounted and executable, and the
/// RabbitMQ config mounted names only paths that exist in the container.
/// Returns the mounted rabbitmq.conf, parsed.
fn check_service(file: &str, doc: &Value, name: &str) -> BTreeMap<String, String> {
    let svc = &doc["services"][name];
    let image = svc["image"].as_str().unwrap_or_default();
    assert!(
        image.starts_with("rabbitmq:") && image.ends_with("-management"),
        "{file}: {name} must use the management image, has {image:?}"
    );
    let ms = mounts(svc);
    for (host, container) in &ms {
        if let Some(rel) = host.strip_prefix("./") {
            assert!(
                root().join(rel).exists(),
                "{file}: {name} mounts {host} → {container}, which is not in the repository"
            );
        } else {
            assert!(
                doc["volumes"].get(host).is_some(),
                "{file}: {name} uses volume {host:?}, not declared under top-level `volumes`"
            );
        }
    }
    let data = ms
        .iter()
        .find(|(_, c)| c == "/var/lib/rabbitmq")
        .map(|(h, _)| h);
    assert!(
        data.is_some_and(|h| !h.starts_with('.')),
        "{file}: {name} needs a named data volume at /var/lib/rabbitmq"
    );

    // The entrypoint: mounted from the repository and executable.
    let ep = svc["entrypoint"][0].as_str().expect("entrypoint");
    let ep_host = mounted_from(&ms, ep)
        .unwrap_or_else(|| panic!("{file}: {name}'s entrypoint {ep} is not mounted"));
    assert_eq!(ep_host, "./deploy/rabbitmq/entrypoint.sh");
    let mode = std::fs::metadata(root().join("deploy/rabbitmq/entrypoint.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert!(
        mode & 0o111 != 0,
        "deploy/rabbitmq/entrypoint.sh must be executable"
    );
    assert_eq!(
        mounted_from(&ms, "/etc/rabbitmq/definitions.json"),
        Some("./configs/rabbitmq/definitions.json"),
        "{file}: {name} must mount the generated definitions where the entrypoint reads them"
    );
    let plugins =
        mounted_from(&ms, "/etc/rabbitmq/enabled_plugins").expect("enabled_plugins mounted");
    let plugins = std::fs::read_to_string(root().join(&plugins[2..])).unwrap();
    for p in ["rabbitmq_management", "rabbitmq_prometheus"] {
        assert!(plugins.contains(p), "enabled_plugins lacks {p}");
    }
    assert!(
        plugins.trim_end().ends_with("]."),
        "enabled_plugins must be an Erlang list term ending in '].'"
    );

    // The RabbitMQ configuration and every container path it names.
    let conf_host =
        mounted_from(&ms, "/etc/rabbitmq/rabbitmq.conf").expect("rabbitmq.conf mounted");
    let c = conf(&conf_host[2..]);
    assert_eq!(
        c.get("load_definitions"),
        Some(&entrypoint_defs_dir()),
        "{conf_host}: load_definitions must be where the entrypoint writes"
    );
    for (k, v) in &c {
        if !v.starts_with('/') || k == "load_definitions" {
            continue;
        }
        // A path inside a mounted folder: the file must be documented for that folder.
        let (dir, host) = ms
            .iter()
            .filter(|(h, _)| h.starts_with("./"))
            .find_map(|(h, m)| v.strip_prefix(&format!("{m}/")).map(|_| (m, h)))
            .unwrap_or_else(|| panic!("{conf_host}: {k} = {v} is not inside any mount of {name}"));
        let file_name = &v[dir.len() + 1..];
        let readme =
            std::fs::read_to_string(root().join(&host[2..]).join("README.md")).unwrap_or_default();
        assert!(
            readme.contains(file_name),
            "{host}/README.md must say what {file_name} is ({k})"
        );
    }
    let port = |key: &str| {
        c.get(key)
            .map(|p| p.rsplit(':').next().unwrap().to_string())
    };
    assert_eq!(
        port("listeners.tcp.default").as_deref(),
        Some("5672"),
        "{conf_host}"
    );
    assert_eq!(
        port("management.tcp.port").as_deref(),
        Some("15672"),
        "{conf_host}"
    );
    assert_eq!(
        port("prometheus.tcp.port").as_deref(),
        Some("15692"),
        "{conf_host}"
    );
    c
}

#[test]
fn messaging_compose_is_the_specs() {
    let f = "docker-compose.messaging.yml";
    let doc = yaml(f);
    let svc = &doc["services"]["rabbitmq"];
    assert!(svc.is_object(), "{f}: no service `rabbitmq`");
    let profiles: Vec<&str> = svc["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(profiles, ["messaging"]);
    // The spec's debug commands use `docker exec helixagent-rabbitmq`.
    assert_eq!(svc["container_name"], "helixagent-rabbitmq");
    let ports: Vec<&str> = svc["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for p in ["5672:5672", "15672:15672"] {
        assert!(
            ports.contains(&p),
            "{f}: port {p} not published ({ports:?})"
        );
    }
    let env = &svc["environment"];
    assert_eq!(env["RABBITMQ_USER"], "${RABBITMQ_USER:-helixagent}");
    assert!(env["RABBITMQ_PASSWORD"]
        .as_str()
        .unwrap()
        .starts_with("${RABBITMQ_PASSWORD"));
    check_service(f, &doc, "rabbitmq");
}

#[test]
fn prod_compose_is_a_three_node_cluster() {
    let f = "docker-compose.prod.yml";
    let doc = yaml(f);
    let services: Vec<&String> = doc["services"].as_object().unwrap().keys().collect();
    assert_eq!(services, ["rabbitmq1", "rabbitmq2", "rabbitmq3"]);
    let mut data_volumes = Vec::new();
    for name in &services {
        let svc = &doc["services"][name.as_str()];
        assert_eq!(
            svc["hostname"],
            name.as_str(),
            "{f}: node names are rabbit@<hostname>"
        );
        let cookie = svc["environment"]["RABBITMQ_ERLANG_COOKIE"]
            .as_str()
            .unwrap_or_default();
        assert!(
            cookie.starts_with("${RABBITMQ_ERLANG_COOKIE:?"),
            "{f}: {name} must require RABBITMQ_ERLANG_COOKIE, has {cookie:?}"
        );
        let limits = &svc["deploy"]["resources"]["limits"];
        assert_eq!(limits["memory"], "2G", "{f}: {name}");
        assert_eq!(limits["cpus"], "2", "{f}: {name}");
        let ms = mounts(svc);
        assert_eq!(
            mounted_from(&ms, "/etc/rabbitmq/certs"),
            Some("./certs"),
            "{f}: {name} certificates"
        );
        data_volumes.push(mounted_from(&ms, "/var/lib/rabbitmq").unwrap().to_string());

        let c = check_service(f, &doc, name);
        assert_eq!(
            c["cluster_formation.peer_discovery_backend"],
            "classic_config"
        );
        for (j, peer) in services.iter().enumerate() {
            assert_eq!(
                c.get(&format!("cluster_formation.classic_config.nodes.{}", j + 1)),
                Some(&format!("rabbit@{peer}")),
                "{f}: {name}'s config must list every node"
            );
        }
        assert_eq!(c["listeners.ssl.default"], "5671");
        assert_eq!(c["ssl_options.verify"], "verify_peer");
        assert_eq!(c["auth_mechanisms.3"], "EXTERNAL");
        assert!(c.contains_key("ssl_options.certfile") && c.contains_key("ssl_options.keyfile"));
    }
    data_volumes.sort();
    data_volumes.dedup();
    assert_eq!(
        data_volumes.len(),
        3,
        "{f}: each node needs its own data volume"
    );
}

/// Run the entrypoint in "definitions only" mode against `defs`.
fn run_entrypoint(defs: &Path, out: &Path, password: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(root().join("deploy/rabbitmq/entrypoint.sh"));
    cmd.env("HELIXMQ_DEFS_ONLY", "1")
        .env("HELIXMQ_DEFINITIONS", defs)
        .env("DEFS_DIR", out)
        .env("RABBITMQ_USER", "helixagent")
        .env_remove("RABBITMQ_PASSWORD");
    if let Some(p) = password {
        cmd.env("RABBITMQ_PASSWORD", p);
    }
    cmd.output().unwrap()
}

#[test]
fn entrypoint_writes_a_user_rabbitmq_can_authenticate() {
    let tmp = std::env::temp_dir().join(format!("hx-deploy-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&tmp).unwrap();
    let defs = tmp.join("definitions.json");
    std::fs::write(
        &defs,
        r#"{"permissions":[{"user":"helixagent","vhost":"/"}]}"#,
    )
    .unwrap();
    let out = tmp.join("d");
    let password = "s3cr\"et 'pw' $HOME ü";

    let o = run_entrypoint(&defs, &out, Some(password));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains(password),
        "password printed"
    );

    let users: Value =
        serde_json::from_slice(&std::fs::read(out.join("00-users.json")).unwrap()).unwrap();
    let u = &users["users"][0];
    assert_eq!(u["name"], "helixagent");
    assert_eq!(u["hashing_algorithm"], "rabbit_password_hashing_sha256");
    assert_eq!(u["tags"], serde_json::json!(["management"]));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(u["password_hash"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw.len(), 4 + 32, "4-byte salt + SHA-256");
    let (salt, digest) = raw.split_at(4);
    let want = Sha256::new()
        .chain_update(salt)
        .chain_update(password.as_bytes())
        .finalize();
    assert_eq!(digest, &want[..], "hash must be sha256(salt ++ password)");
    let wrong = Sha256::new()
        .chain_update(salt)
        .chain_update(b"other")
        .finalize();
    assert_ne!(digest, &wrong[..]);
    // Users sort before the topology, so permissions find their user on import.
    assert_eq!(
        std::fs::read(out.join("10-topology.json")).unwrap(),
        std::fs::read(&defs).unwrap()
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["00-users.json", "10-topology.json"]);

    // Without a password it refuses, saying which variable is missing.
    let o = run_entrypoint(&defs, &tmp.join("e"), None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("RABBITMQ_PASSWORD"));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The generated definitions must exist where both compose files mount them
/// (written by `helixmq topology export`, checked for drift elsewhere).
#[test]
fn generated_definitions_exist() {
    let p = root().join("configs/rabbitmq/definitions.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: Value = serde_json::from_str(&text).expect("definitions.json is JSON");
    assert!(
        v["queues"].as_array().is_some_and(|q| !q.is_empty()),
        "definitions.json has no queues"
    );
}

/// `rust-version` is a promise: no lower than what any dependency needs (a
/// lower one fails on that toolchain with errors about our dependencies).
#[test]
fn rust_version_is_not_lower_than_any_dependency() {
    // Only this machine's platform: the full resolve names Windows-only crates
    // (anstyle-wincon, …) that a Linux build never downloads, and `--offline`
    // cannot read what was never fetched.
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = |v: &Value| -> Option<(u32, u32)> {
        let mut parts = v.as_str()?.split('.').map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
    };
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let packages = meta["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "helixmq")
        .and_then(|p| version(&p["rust_version"]))
        .expect("helixmq declares a rust-version");
    let needed = packages
        .iter()
        .filter(|p| !members.contains(&p["id"].as_str().unwrap_or("")))
        .filter_map(|p| Some((version(&p["rust_version"])?, p["name"].as_str()?)))
        .max()
        .expect("dependencies declare rust-versions");
    assert!(
        ours >= needed.0,
        "rust-version {}.{} is lower than {}.{} that {} needs: raise it in the workspace Cargo.toml",
        ours.0,
        ours.1,
        needed.0 .0,
        needed.0 .1,
        needed.1
    );
}
