//! The deployment files pass the booking binary only what it accepts.
//!
//! `deployment/docker-compose.yaml` and `deployment/k8s/` cannot run here (no Docker engine, no
//! cluster), so this reads them: every environment variable the StatefulSet sets is one the binary
//! reads, the ConfigMap's app.yaml is taken by `Config::from_yaml` and validates with that
//! environment applied, the container ports are the config's listen ports, the probes ask the gRPC
//! port, the Services reach those ports, and the command is the workspace's `booking` binary with
//! flags and a subcommand it accepts. The compose file serves what the drivers default to.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use booking::config::{BrokerKind, Config, LogKind};
use serde::Deserialize as _;
use serde_norway::Value;

fn deployment_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deployment")
}

/// Every `.yaml`/`.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The documents of a (multi-document) YAML file; empty documents are skipped.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Every environment variable the booking binary reads: those `Config::apply_env` asks for, the
/// config directory (`Config::load`), the embedded log's salvage switch, and the log filter.
fn variables_read() -> BTreeSet<String> {
    let asked = RefCell::new(BTreeSet::new());
    Config::default()
        .apply_env(|name| {
            asked.borrow_mut().insert(name.to_owned());
            None
        })
        .unwrap();
    let mut names = asked.into_inner();
    names.extend(["OCH_PATH", booking::app::SALVAGE_WAL_ENV, "RUST_LOG"].map(String::from));
    names
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

fn seq(value: &Value) -> &[Value] {
    value.as_sequence().map_or(&[], Vec::as_slice)
}

/// The Kubernetes objects of `deployment/k8s/`, and the Dockerfile that builds their image.
#[derive(Debug, Clone)]
struct Manifests {
    /// `(file name, document)`.
    docs: Vec<(String, Value)>,
    dockerfile: String,
}

impl Manifests {
    fn load() -> Self {
        let dir = deployment_dir();
        let docs = yaml_files(&dir.join("k8s"))
            .iter()
            .flat_map(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                documents(path).into_iter().map(move |doc| (name.clone(), doc))
            })
            .collect();
        let dockerfile = std::fs::read_to_string(dir.join("Dockerfile")).expect("deployment/Dockerfile");
        Self { docs, dockerfile }
    }

    fn of_kind(&self, kind: &str) -> impl Iterator<Item = &Value> {
        let kind = kind.to_owned();
        self.docs.iter().map(|(_, doc)| doc).filter(move |doc| text(&doc["kind"]) == kind)
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.of_kind(kind).find(|doc| text(&doc["metadata"]["name"]) == name)
    }

    fn kind_mut(&mut self, kind: &str) -> &mut Value {
        self.docs.iter_mut().map(|(_, doc)| doc).find(|doc| text(&doc["kind"]) == kind).unwrap()
    }

    /// A key of a Secret or ConfigMap (`stringData` or `data`).
    fn key(&self, kind: &str, name: &str, key: &str) -> Option<String> {
        let doc = self.named(kind, name)?;
        ["stringData", "data"].iter().find_map(|field| doc[*field].get(key)).map(|v| text(v).to_owned())
    }
}

/// Everything wrong with the manifests, each problem naming what it is about.
fn problems(m: &Manifests) -> Vec<String> {
    let mut out = Vec::new();
    for (file, doc) in &m.docs {
        let kind = text(&doc["kind"]);
        if text(&doc["apiVersion"]).is_empty() || kind.is_empty() {
            out.push(format!("{file}: a document without apiVersion or kind"));
        } else if kind != "Kustomization" && text(&doc["metadata"]["name"]).is_empty() {
            out.push(format!("{file}: {kind} without metadata.name"));
        }
    }
    let sets: Vec<&Value> = m.of_kind("StatefulSet").collect();
    let [sts] = sets.as_slice() else {
        out.push(format!("expected one StatefulSet, found {}", sets.len()));
        return out;
    };
    let sts_name = text(&sts["metadata"]["name"]);
    if sts["spec"]["replicas"].as_u64() != Some(3) {
        out.push(format!("StatefulSet {sts_name}: replicas {:?}, expected 3", sts["spec"]["replicas"]));
    }
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    let selects = |selector: &Value| {
        selector.as_mapping().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    if !selects(&sts["spec"]["selector"]["matchLabels"]) {
        out.push(format!("StatefulSet {sts_name}: selector does not match the pod template's labels"));
    }
    let headless = text(&sts["spec"]["serviceName"]);
    if m.named("Service", headless).is_none_or(|s| text(&s["spec"]["clusterIP"]) != "None") {
        out.push(format!("StatefulSet {sts_name}: serviceName `{headless}` is not a headless Service"));
    }

    let pod = &sts["spec"]["template"]["spec"];
    let containers = seq(&pod["containers"]);
    let Some(container) = containers.iter().find(|c| text(&c["name"]) == "booking") else {
        out.push("no container named booking".into());
        return out;
    };
    let ports: BTreeMap<&str, u64> =
        seq(&container["ports"]).iter().map(|p| (text(&p["name"]), p["containerPort"].as_u64().unwrap_or(0))).collect();

    // The command: the workspace's binary, installed where the Dockerfile puts it, taking the args.
    let command: Vec<&str> = seq(&container["command"]).iter().map(text).collect();
    let args: Vec<&str> = seq(&container["args"]).iter().map(text).collect();
    let binary = Path::new(env!("CARGO_BIN_EXE_booking"));
    match command.as_slice() {
        [path] if Path::new(path).file_name() == binary.file_name() => {
            if !m.dockerfile.lines().any(|l| l.starts_with("COPY") && l.ends_with(&format!(" {path}"))) {
                out.push(format!("command `{path}`: the Dockerfile does not install the binary there"));
            }
        }
        other => out.push(format!("command {other:?}: expected the path of the `booking` binary")),
    }
    let help = Command::new(binary).args(&args).arg("--help").output().expect("runs the booking binary");
    if !help.status.success() {
        out.push(format!("args {args:?}: booking refuses them: {}", String::from_utf8_lossy(&help.stderr).trim()));
    }

    // The config file: --config names a key of the mounted ConfigMap.
    let config_path = args.iter().position(|a| *a == "--config").and_then(|i| args.get(i + 1)).copied();
    let app_yaml = config_path.and_then(|path| {
        let (dir, key) = path.rsplit_once('/')?;
        let mount = seq(&container["volumeMounts"]).iter().find(|v| text(&v["mountPath"]) == dir)?;
        let volume = seq(&pod["volumes"]).iter().find(|v| v["name"] == mount["name"])?;
        m.key("ConfigMap", text(&volume["configMap"]["name"]), key)
    });
    let Some(app_yaml) = app_yaml else {
        out.push(format!("--config {config_path:?} is not a key of a ConfigMap mounted in the container"));
        return out;
    };

    // The environment: names the binary reads, values that resolve.
    let known = variables_read();
    let mut env = BTreeMap::new();
    for var in seq(&container["env"]) {
        let name = text(&var["name"]);
        if !known.contains(name) {
            out.push(format!("env {name}: the booking binary does not read it (it reads {known:?})"));
        }
        let from = &var["valueFrom"];
        let value = if let Some(value) = var["value"].as_str() {
            Some(value.to_owned())
        } else if text(&from["fieldRef"]["fieldPath"]) == "metadata.name" {
            Some(format!("{sts_name}-0"))
        } else if let Some(secret) = from.get("secretKeyRef") {
            m.key("Secret", text(&secret["name"]), text(&secret["key"]))
        } else if let Some(map) = from.get("configMapKeyRef") {
            m.key("ConfigMap", text(&map["name"]), text(&map["key"]))
        } else {
            None
        };
        match value {
            Some(value) => {
                env.insert(name.to_owned(), value);
            }
            None => out.push(format!("env {name}: its value does not resolve (missing Secret/ConfigMap key?)")),
        }
    }
    let pod_id = seq(&container["env"]).iter().find(|v| text(&v["name"]) == "POD_ID");
    if pod_id.is_none_or(|v| text(&v["valueFrom"]["fieldRef"]["fieldPath"]) != "metadata.name") {
        out.push("env POD_ID: must be the pod's name (fieldRef metadata.name)".into());
    }

    // The config, as the binary reads it: the file, then the environment, then its checks.
    let config = Config::from_yaml(&app_yaml)
        .and_then(|mut config| config.apply_env(|name| env.get(name).cloned()).map(|()| config))
        .and_then(|config| config.validate().map(|()| config));
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            out.push(format!("the ConfigMap's app.yaml with the pod's environment: {e:#}"));
            return out;
        }
    };
    if config.saga_log != LogKind::Postgres || config.broker == BrokerKind::Memory {
        out.push("replicas must share a postgres saga log and a nats or rabbitmq broker".into());
    }
    let scheme = |var: &str| env.get(var).and_then(|url| url.split_once("://")).map(|(s, _)| s.to_owned());
    let broker_scheme = match config.broker {
        BrokerKind::Nats => "nats",
        BrokerKind::Rabbitmq => "amqp",
        BrokerKind::Memory => "",
    };
    if scheme("SAGAFLOW_BROKER_URL").is_none_or(|s| !s.starts_with(broker_scheme)) {
        out.push(format!("SAGAFLOW_BROKER_URL is not a {broker_scheme}:// URL"));
    }
    if scheme("SAGAFLOW_LOG_URL").is_none_or(|s| !s.starts_with("postgres")) {
        out.push("SAGAFLOW_LOG_URL is not a postgres:// URL".into());
    }

    // Ports: the config's listeners, reachable from outside the pod; the probes on gRPC.
    for (name, listen) in [("grpc", config.grpc_listen), ("admin", config.http_listen)] {
        if ports.get(name).copied() != Some(u64::from(listen.port())) {
            out.push(format!("containerPort `{name}` {:?} is not the config's {listen}", ports.get(name)));
        }
        if !listen.ip().is_unspecified() {
            out.push(format!("{listen}: the pod's `{name}` port must listen on 0.0.0.0, not one address"));
        }
    }
    if config.http_listen.port() != 10090 {
        out.push(format!("the admin port is {}, not 10090", config.http_listen.port()));
    }
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let port = container[probe]["grpc"]["port"].as_u64();
        if port != Some(u64::from(config.grpc_listen.port())) {
            out.push(format!("{probe}: expected a grpc probe on {}, got {port:?}", config.grpc_listen));
        }
    }

    // Services: select the pods and reach named container ports.
    for service in m.of_kind("Service") {
        let name = text(&service["metadata"]["name"]);
        if !selects(&service["spec"]["selector"]) {
            out.push(format!("Service {name}: its selector does not match the pods"));
        }
        for port in seq(&service["spec"]["ports"]) {
            let target = &port["targetPort"];
            let reached = match target.as_u64() {
                Some(number) => ports.values().any(|p| *p == number),
                None => ports.contains_key(text(target)),
            };
            if !reached {
                out.push(format!("Service {name}: targetPort {target:?} is not a container port"));
            }
        }
    }
    out
}

fn grpc_service_exposed(m: &Manifests) -> bool {
    m.of_kind("Service")
        .filter(|s| text(&s["spec"]["clusterIP"]) != "None")
        .any(|s| seq(&s["spec"]["ports"]).iter().any(|p| text(&p["targetPort"]) == "grpc"))
}

#[test]
fn every_yaml_file_of_the_deployment_parses() {
    let files = yaml_files(&deployment_dir());
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for expected in ["docker-compose.yaml", "app.yaml", "statefulset.yaml", "services.yaml", "configmap.yaml"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from deployment/: {names:?}");
    }
    for file in &files {
        assert!(!documents(file).is_empty(), "{} has no document", file.display());
    }
    // The multi-document file really is read as several documents.
    assert_eq!(documents(&deployment_dir().join("k8s/services.yaml")).len(), 2);
}

#[test]
fn the_kubernetes_manifests_pass_only_what_the_binary_accepts() {
    let m = Manifests::load();
    assert_eq!(problems(&m), Vec::<String>::new());
    assert!(grpc_service_exposed(&m), "no ClusterIP Service for the gRPC port");
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let dir = deployment_dir().join("k8s");
    let kustomization = documents(&dir.join("kustomization.yaml")).remove(0);
    let listed: BTreeSet<String> = seq(&kustomization["resources"]).iter().map(|r| text(r).to_owned()).collect();
    let files: BTreeSet<String> = yaml_files(&dir)
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}

/// The checks catch what they are for: each broken copy of the manifests is named.
#[test]
fn a_setting_the_binary_would_refuse_is_named() {
    let base = Manifests::load();
    fn container(m: &mut Manifests) -> &mut Value {
        &mut m.kind_mut("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    }
    let expect = |m: &Manifests, needle: &str| {
        let found = problems(m);
        assert!(found.iter().any(|p| p.contains(needle)), "no problem naming `{needle}` in {found:?}");
    };

    let mut m = base.clone();
    let env = container(&mut m)["env"].as_sequence_mut().unwrap();
    let pod_id = env.iter_mut().find(|v| text(&v["name"]) == "POD_ID").unwrap();
    pod_id["name"] = Value::from("POD_NAME");
    expect(&m, "env POD_NAME: the booking binary does not read it");
    expect(&m, "env POD_ID: must be the pod's name");

    let mut m = base.clone();
    let config_map = m.kind_mut("ConfigMap");
    let yaml = format!("{}\nbrokr: nats\n", text(&config_map["data"]["app.yaml"]));
    config_map["data"]["app.yaml"] = Value::from(yaml);
    expect(&m, "brokr");

    let mut m = base.clone();
    let ports = container(&mut m)["ports"].as_sequence_mut().unwrap();
    ports.iter_mut().find(|p| text(&p["name"]) == "admin").unwrap()["containerPort"] = Value::from(10080);
    expect(&m, "containerPort `admin` Some(10080)");

    let mut m = base.clone();
    let args = container(&mut m)["args"].as_sequence_mut().unwrap();
    *args.last_mut().unwrap() = Value::from("orchestrater");
    expect(&m, "orchestrater");

    let mut m = base.clone();
    let secret = m.kind_mut("Secret");
    secret["stringData"].as_mapping_mut().unwrap().remove("admin-token");
    expect(&m, "env SAGAFLOW_ADMIN_TOKEN: its value does not resolve");
    expect(&m, "admin_token");

    let mut m = base.clone();
    container(&mut m)["readinessProbe"]["grpc"]["port"] = Value::from(10090);
    expect(&m, "readinessProbe: expected a grpc probe on 0.0.0.0:10000");
}

#[test]
fn the_compose_file_serves_what_the_drivers_default_to() {
    let compose = documents(&deployment_dir().join("docker-compose.yaml")).remove(0);
    let services = &compose["services"];
    // The drivers' default URLs (sagaflow-server's backends.rs): NATS, RabbitMQ and PostgreSQL on loopback.
    let defaults = include_str!("../../../crates/sagaflow-server/src/backends.rs");
    for (service, port) in [("nats", 4222), ("rabbitmq", 5672), ("postgres", 5432)] {
        let published: Vec<&str> = seq(&services[service]["ports"]).iter().map(text).collect();
        assert!(published.contains(&format!("127.0.0.1:{port}:{port}").as_str()), "{service}: {published:?}");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(defaults.contains(&addr.to_string()), "no driver defaults to {addr} ({service})");
        assert!(!text(&services[service]["image"]).is_empty(), "{service} has no image");
    }
    let nats: Vec<&str> = seq(&services["nats"]["command"]).iter().map(text).collect();
    assert!(nats.contains(&"-js"), "NATS without JetStream: {nats:?}");
    let database = text(&services["postgres"]["environment"]["POSTGRES_DB"]);
    assert!(defaults.contains(&format!("127.0.0.1:5432/{database}\"")), "the default log URL names another database");
}
