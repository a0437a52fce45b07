//! The deployment files under `deploy/` against the daemon they start (no root needed): every
//! Kubernetes manifest parses and is listed by the kustomization; the container's arguments and
//! the systemd unit's `ExecStart` name only flags that `zone-ingress run --help` of the built
//! binary lists; the probes and the Prometheus annotations use the admin port of the ConfigMap's
//! ZoneIngress, the Service targets its listener port; the capabilities are those
//! docs/operations.md#privileges measured; the ConfigMap's ZoneIngress passes
//! `zone-ingress validate` once its variables are filled in; and `systemd-analyze verify`
//! accepts the unit. `cargo xtask test` runs this file before the privileged suite, and the
//! manifests through a Kubernetes schema validator.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde::Deserialize as _;
use serde_yaml::Value;
use zone_ingress_tests::daemon::{Scratch, binary};

/// The Kubernetes namespace of Kuma's control plane, where it looks for ingress pods.
const NAMESPACE: &str = "kuma-system";
/// Where the unit and the image install the binary.
const INSTALLED_BINARY: &str = "/usr/local/bin/zone-ingress";
/// What `{{ address }}` stands for in the test: a pod IP.
const TEST_ADDRESS: &str = "198.18.0.10";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

/// One YAML document of a manifest file.
struct Doc {
    file: String,
    value: Value,
}

/// Every document of every `*.yaml`/`*.yml` file under `deploy/kubernetes/`, in name order.
fn manifests() -> Vec<Doc> {
    let dir = deploy_dir().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let file = path.file_name().expect("file name").to_string_lossy().into_owned();
        for de in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(de).unwrap_or_else(|e| panic!("{file}: not valid YAML: {e}"));
            if !value.is_null() {
                docs.push(Doc { file: file.clone(), value });
            }
        }
    }
    docs
}

/// The value at a dotted path of mapping keys (`spec.template.spec`).
fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).and_then(Value::as_str).unwrap_or_else(|| panic!("no string at `{path}` in {v:?}"))
}

fn seq_at<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    at(v, path).and_then(Value::as_sequence).map_or_else(|| panic!("no list at `{path}`"), Vec::as_slice)
}

fn u64_at(v: &Value, path: &str) -> u64 {
    at(v, path).and_then(Value::as_u64).unwrap_or_else(|| panic!("no number at `{path}`"))
}

/// The one document of `kind` (panics unless there is exactly one).
fn the<'a>(docs: &'a [Doc], kind: &str) -> &'a Value {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.value.get("kind").and_then(Value::as_str) == Some(kind)).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} in deploy/kubernetes/");
    &found[0].value
}

/// The long flags `zone-ingress run --help` of the built binary lists.
fn run_flags() -> BTreeSet<String> {
    let out = Command::new(binary()).args(["run", "--help"]).output().expect("run the daemon binary");
    assert!(out.status.success(), "zone-ingress run --help failed: {out:?}");
    let help = String::from_utf8(out.stdout).expect("UTF-8 help");
    let mut flags = BTreeSet::new();
    for line in help.lines() {
        // Option lines are indented at most 6 columns; descriptions (which may quote flags) more.
        let indent = line.len() - line.trim_start().len();
        if indent > 6 || !line.trim_start().starts_with('-') {
            continue;
        }
        for word in line.split([' ', ',']).filter(|w| w.starts_with("--") && w.len() > 2) {
            let name: String = word.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect::<String>();
            flags.insert(name);
        }
    }
    assert!(flags.contains("--dataplane-file") && flags.contains("--splice"), "unexpected help text:\n{help}");
    flags
}

/// The flag names (`--name`, without `=value`) among `args`.
fn flag_names<'a>(args: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    args.into_iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split_once('=').map_or(a, |(name, _)| name).to_owned())
        .collect()
}

/// Every `flag=value` value given to `flag` (`--dataplane-var=k=v` gives `k=v`).
fn flag_values<'a>(args: &[&'a str], flag: &str) -> Vec<&'a str> {
    let mut values = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix(flag).and_then(|rest| rest.strip_prefix('=')) {
            values.push(v);
        } else if *a == flag
            && let Some(v) = args.get(i + 1)
        {
            values.push(v);
        }
    }
    values
}

/// `30s` → 30 (the manifests and the unit write durations in whole seconds).
fn seconds(text: &str) -> u64 {
    text.strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("`{text}`: expected a duration in whole seconds like `30s`"))
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The Deployment's single container.
fn container(deployment: &Value) -> &Value {
    let containers = seq_at(deployment, "spec.template.spec.containers");
    assert_eq!(containers.len(), 1, "the zone-ingress pod has one container");
    &containers[0]
}

fn container_args(deployment: &Value) -> Vec<&str> {
    seq_at(container(deployment), "args").iter().map(|a| a.as_str().expect("string argument")).collect()
}

/// The ConfigMap's ZoneIngress template, the file name the daemon reads it as, and its text
/// with the test's values in place of the variables.
struct Template {
    key: String,
    text: String,
    vars: Vec<(String, String)>,
}

impl Template {
    fn of(docs: &[Doc]) -> Self {
        let deployment = the(docs, "Deployment");
        let args = container_args(deployment);
        let file = flag_values(&args, "--dataplane-file");
        assert_eq!(file.len(), 1, "one --dataplane-file");
        let file = Path::new(file[0]);
        let key = file.file_name().expect("file name").to_string_lossy().into_owned();
        let dir = file.parent().expect("directory").to_string_lossy().into_owned();
        // The file is a key of the ConfigMap mounted (as a directory) on its directory.
        let mount = seq_at(container(deployment), "volumeMounts")
            .iter()
            .find(|m| str_at(m, "mountPath") == dir)
            .unwrap_or_else(|| panic!("nothing is mounted on {dir}, the directory of --dataplane-file"));
        assert!(mount.get("subPath").is_none(), "a subPath mount is never updated: reloads would not be seen");
        let volume_name = str_at(mount, "name");
        let volume = seq_at(deployment, "spec.template.spec.volumes")
            .iter()
            .find(|v| str_at(v, "name") == volume_name)
            .unwrap_or_else(|| panic!("no volume {volume_name}"));
        let configmap = the(docs, "ConfigMap");
        assert_eq!(str_at(volume, "configMap.name"), str_at(configmap, "metadata.name"));
        let text = at(configmap, "data")
            .and_then(|d| d.get(key.as_str()))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("the ConfigMap has no key {key}"))
            .to_owned();
        // The values the pod passes, with the Downward API variables replaced by test values.
        let vars = flag_values(&args, "--dataplane-var")
            .into_iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("--dataplane-var k=v");
                let v = v
                    .replace("$(POD_IP)", TEST_ADDRESS)
                    .replace("$(POD_NAME)", "zone-ingress-5d9c7b6f4-x2x7q")
                    .replace("$(POD_NAMESPACE)", NAMESPACE);
                (k.to_owned(), v)
            })
            .collect();
        Self { key, text, vars }
    }

    /// The template with its variables filled in.
    fn filled(&self) -> String {
        let mut text = self.text.clone();
        for (k, v) in &self.vars {
            text = text.replace(&format!("{{{{ {k} }}}}", k = k), v);
        }
        assert!(!text.contains("{{"), "a placeholder of the ConfigMap has no --dataplane-var:\n{text}");
        text
    }

    fn value(&self) -> Value {
        serde_yaml::from_str(&self.filled()).expect("the filled ZoneIngress is YAML")
    }

    fn listener_port(&self) -> u64 {
        u64_at(&self.value(), "networking.port")
    }

    fn admin_port(&self) -> u64 {
        u64_at(&self.value(), "networking.admin.port")
    }
}

/// A container port given by number or by the name of one of the container's ports.
fn port_number(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().expect("port number or name");
    seq_at(container, "ports")
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .map(|p| u64_at(p, "containerPort"))
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

#[test]
fn manifests_parse_and_the_kustomization_lists_every_one() {
    let docs = manifests();
    let mut listed = BTreeSet::new();
    let mut resources = BTreeSet::new();
    for d in &docs {
        let kind = str_at(&d.value, "kind");
        str_at(&d.value, "apiVersion");
        if kind == "Kustomization" {
            assert_eq!(str_at(&d.value, "namespace"), NAMESPACE);
            listed.extend(seq_at(&d.value, "resources").iter().map(|r| r.as_str().expect("path").to_owned()));
            continue;
        }
        resources.insert(d.file.clone());
        str_at(&d.value, "metadata.name");
        assert_eq!(str_at(&d.value, "metadata.namespace"), NAMESPACE, "{}: {kind} outside {NAMESPACE}", d.file);
    }
    assert_eq!(listed, resources, "kustomization.yaml must list exactly the other manifest files");
    // The image the kustomization renames is the container's.
    let kustomization = the(&docs, "Kustomization");
    let image = str_at(container(the(&docs, "Deployment")), "image");
    assert!(seq_at(kustomization, "images").iter().any(|i| str_at(i, "name") == image), "image {image} not in images");
}

#[test]
fn container_args_name_flags_the_binary_accepts() {
    let flags = run_flags();
    let docs = manifests();
    let deployment = the(&docs, "Deployment");
    let args = container_args(deployment);
    assert_eq!(args.first(), Some(&"run"), "the container runs `zone-ingress run`");
    let unknown: Vec<String> = flag_names(args.iter().copied()).into_iter().filter(|f| !flags.contains(f)).collect();
    assert!(unknown.is_empty(), "flags that `zone-ingress run --help` does not list: {unknown:?}");
    for required in [
        "--proxy-type",
        "--cp-address",
        "--dataplane-token-file",
        "--ca-cert-file",
        "--dataplane-file",
        "--dataplane-var",
        "--read-only-admin-address",
    ] {
        assert!(!flag_values(&args, required).is_empty(), "the container does not pass {required}");
    }
    assert_eq!(flag_values(&args, "--proxy-type"), ["ingress"]);
    assert_eq!(flag_values(&args, "--cp-address"), ["https://kuma-control-plane.kuma-system:5678"]);
    assert!(flag_values(&args, "--dataplane-var").contains(&"address=$(POD_IP)"));
    assert_eq!(flag_values(&args, "--read-only-admin-address"), ["$(POD_IP)"]);
    // Every $(VAR) is an environment variable of the container from the Downward API.
    let env: BTreeMap<&str, &str> = seq_at(container(deployment), "env")
        .iter()
        .filter_map(|e| Some((str_at(e, "name"), at(e, "valueFrom.fieldRef.fieldPath")?.as_str()?)))
        .collect();
    assert_eq!(env.get("POD_IP"), Some(&"status.podIP"));
    assert_eq!(env.get("POD_NAME"), Some(&"metadata.name"));
    assert_eq!(env.get("POD_NAMESPACE"), Some(&"metadata.namespace"));
    for arg in &args {
        let mut rest = *arg;
        while let Some(start) = rest.find("$(") {
            let end = rest[start..].find(')').map(|e| start + e).expect("closed $(");
            let var = &rest[start + 2..end];
            assert!(env.contains_key(var), "{arg}: ${var} is not set from the Downward API");
            rest = &rest[end..];
        }
    }
    // The grace period outlasts the drain.
    let drain = flag_values(&args, "--drain-time");
    let drain = seconds(drain.first().copied().unwrap_or("30s"));
    let grace = u64_at(deployment, "spec.template.spec.terminationGracePeriodSeconds");
    assert!(grace > drain, "terminationGracePeriodSeconds {grace} must exceed --drain-time {drain}s");
}

#[test]
fn pod_is_an_ingress_with_probes_metrics_and_capabilities_on_the_configured_ports() {
    let docs = manifests();
    let deployment = the(&docs, "Deployment");
    let template = Template::of(&docs);
    let admin = template.admin_port();
    let listener = template.listener_port();
    let pod = at(deployment, "spec.template").expect("pod template");
    let annotation = |k: &str| at(pod, "metadata.annotations").and_then(|a| a.get(k)).and_then(Value::as_str);
    assert_eq!(annotation("kuma.io/ingress"), Some("enabled"), "Kuma makes a ZoneIngress only of annotated pods");
    assert_eq!(annotation("prometheus.io/scrape"), Some("true"));
    assert_eq!(annotation("prometheus.io/port"), Some(admin.to_string().as_str()));
    assert_eq!(annotation("prometheus.io/path"), Some("/stats/prometheus"));
    let c = container(deployment);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(str_at(c, &format!("{probe}.httpGet.path")), "/ready", "{probe}");
        let port = at(c, &format!("{probe}.httpGet.port")).expect("probe port");
        assert_eq!(port_number(c, port), admin, "{probe} must ask the admin port of the ZoneIngress");
    }
    let ports: BTreeSet<u64> = seq_at(c, "ports").iter().map(|p| u64_at(p, "containerPort")).collect();
    assert_eq!(ports, BTreeSet::from([listener, admin]));
    // docs/operations.md#privileges: uid 0 with the packet splice's four, everything else dropped.
    let caps = |list: &str| -> BTreeSet<&str> {
        seq_at(c, &format!("securityContext.capabilities.{list}")).iter().map(|v| v.as_str().expect("cap")).collect()
    };
    assert_eq!(caps("add"), BTreeSet::from(["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"]), "capabilities.add");
    assert_eq!(caps("drop"), BTreeSet::from(["ALL"]));
    let uid = at(c, "securityContext.runAsUser").or_else(|| at(pod, "spec.securityContext.runAsUser"));
    assert_eq!(uid.and_then(Value::as_u64), Some(0), "added capabilities reach uid 0 only");
    // docs/design.md#source-ports: the pod's kernel range leaves the packet splice 16,384 source
    // ports above it (its default range), and the daemon is not given another.
    let range = seq_at(pod, "spec.securityContext.sysctls")
        .iter()
        .find(|s| str_at(s, "name") == "net.ipv4.ip_local_port_range")
        .map(|s| str_at(s, "value"))
        .expect("the pod sets net.ipv4.ip_local_port_range");
    let top: u32 = range.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("FIRST LAST");
    assert!(65535 - top >= 16384, "ip_local_port_range {range:?} leaves {} ports above it", 65535 - top);
    assert!(
        flag_values(&container_args(deployment), "--packet-ports").is_empty(),
        "the default range is the one above"
    );
    // The Service reaches the listener of the pods it selects.
    let service = the(&docs, "Service");
    assert!(matches!(str_at(service, "spec.type"), "LoadBalancer" | "NodePort"), "Kuma reads LoadBalancer/NodePort");
    let labels = at(pod, "metadata.labels").and_then(Value::as_mapping).expect("pod labels");
    for (k, v) in at(service, "spec.selector").and_then(Value::as_mapping).expect("selector") {
        assert_eq!(labels.get(k), Some(v), "the Service's selector must match the pod");
    }
    let service_ports = seq_at(service, "spec.ports");
    assert_eq!(service_ports.len(), 1);
    assert_eq!(port_number(c, at(&service_ports[0], "targetPort").expect("targetPort")), listener);
}

#[test]
fn configmap_zone_ingress_validates_with_the_pod_values() {
    let docs = manifests();
    let template = Template::of(&docs);
    assert!(template.text.contains("{{ address }}"), "the listener address must be the pod IP: {{{{ address }}}}");
    let scratch = Scratch::new("deploy");
    let file = scratch.write(&template.key, &template.text);
    let dataplanes = repo().join("docs/examples/dataplanes.yaml");
    let validate = |vars: &[(String, String)]| {
        let mut cmd = Command::new(binary());
        cmd.arg("validate").arg("--dataplane-file").arg(&file).arg("--dataplanes").arg(&dataplanes);
        for (k, v) in vars {
            cmd.arg(format!("--dataplane-var={k}={v}"));
        }
        cmd.output().expect("run zone-ingress validate")
    };
    let out = validate(&template.vars);
    let text = output_text(&out);
    assert!(out.status.success(), "zone-ingress validate rejected the ConfigMap's ZoneIngress:\n{text}");
    let listen = format!("listener={TEST_ADDRESS}:{}", template.listener_port());
    assert!(text.contains(&listen), "validate did not report {listen}:\n{text}");
    // Without the pod IP the template is not a valid file: the address really is the variable.
    let without: Vec<(String, String)> = template.vars.iter().filter(|(k, _)| k != "address").cloned().collect();
    let out = validate(&without);
    assert_eq!(out.status.code(), Some(64), "{}", output_text(&out));
    assert!(output_text(&out).contains("variable `address` is not set"));
}

/// The `[Service]` settings of the unit (continuation lines joined, comments dropped).
fn unit_service_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let full = std::mem::take(&mut pending) + line;
        if full.starts_with('[') {
            section = full;
        } else if section == "[Service]"
            && let Some((k, v)) = full.split_once('=')
        {
            settings.entry(k.trim().to_owned()).or_default().push(v.trim().to_owned());
        }
    }
    settings
}

#[test]
fn systemd_unit_starts_the_daemon_with_flags_it_accepts_and_verifies() {
    let flags = run_flags();
    let path = deploy_dir().join("systemd/zone-ingress.service");
    let text = std::fs::read_to_string(&path).expect("read the unit");
    let s = unit_service_settings(&text);
    let one = |k: &str| -> &str {
        let v = s.get(k).unwrap_or_else(|| panic!("the unit has no {k}="));
        assert_eq!(v.len(), 1, "{k}= more than once");
        &v[0]
    };
    let exec: Vec<&str> = one("ExecStart").split_whitespace().collect();
    assert_eq!(&exec[..2], [INSTALLED_BINARY, "run"]);
    let unknown: Vec<String> = flag_names(exec.iter().copied()).into_iter().filter(|f| !flags.contains(f)).collect();
    assert!(unknown.is_empty(), "ExecStart flags that `zone-ingress run --help` does not list: {unknown:?}");
    for required in ["--proxy-type", "--cp-address", "--dataplane-token-file", "--dataplane-file"] {
        assert!(!flag_values(&exec, required).is_empty(), "ExecStart does not pass {required}");
    }
    // docs/operations.md#privileges: a user of its own with the packet splice's four capabilities.
    let user = one("User");
    assert!(!user.is_empty() && user != "root" && user != "0", "User={user}");
    let want: BTreeSet<&str> = BTreeSet::from(["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_PERFMON"]);
    for k in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        let caps: BTreeSet<&str> = one(k).split_whitespace().collect();
        assert_eq!(caps, want, "{k}");
    }
    assert!(!s.contains_key("PrivateNetwork"), "the listener is on the host's network");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("Restart"), "on-failure");
    let drain = seconds(flag_values(&exec, "--drain-time").first().copied().unwrap_or("30s"));
    let stop = seconds(one("TimeoutStopSec"));
    assert!(stop > drain, "TimeoutStopSec {stop}s must exceed --drain-time {drain}s");
    assert!(one("LimitNOFILE").parse::<u64>().is_ok_and(|n| n >= 65_536), "LimitNOFILE");

    // systemd's own parser, on a copy that starts the built binary (verify checks that
    // ExecStart is executable). Any message is a failure: verify exits 0 on ignored settings.
    let scratch = Scratch::new("unit");
    let bin = std::fs::canonicalize(binary()).expect("the daemon binary exists");
    let copy = scratch.write("zone-ingress.service", &text.replace(INSTALLED_BINARY, &bin.to_string_lossy()));
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian package systemd, installed by `cargo xtask setup`)");
    assert!(out.status.success() && out.stderr.is_empty(), "systemd-analyze verify:\n{}", output_text(&out));
}
