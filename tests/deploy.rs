//! The deployment files: the Dockerfiles pass hadolint, the Helm chart lints and renders
//! manifests that Kubernetes' schemas accept (CPU and GPU values), refuses a topology it cannot
//! place, and its command lines really start a working pipeline: the test reads the gateway's
//! and the workers' commands, arguments and environment from the rendered manifests and runs
//! exactly those as local processes, each "pod" on a loopback address of its own.
//!
//! helm, hadolint and kubernetes-validate are installed on first use by
//! `scripts/setup-deploy-tools.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_yaml::Value;
use strata_proto::v1::strata_client::StrataClient;
use strata_proto::v1::{GenerateRequest, ModelInfoRequest, SamplingParameters, generate_request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("deploy/helm/strata")
}

/// The directory holding helm, hadolint and kubernetes-validate.
fn tools() -> PathBuf {
    support::setup("scripts/setup-deploy-tools.sh")
}

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(tools().join(name))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm template` of the chart with `args`; the rendered manifests, or helm's output on failure.
fn render(args: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut all = vec![
        "template",
        "strata-test",
        chart.to_str().expect("utf-8 path"),
    ];
    all.extend_from_slice(args);
    let out = tool("helm", &all);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(text(&out))
    }
}

fn documents(manifests: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(manifests)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

#[test]
fn the_dockerfiles_pass_hadolint() {
    for file in ["deploy/docker/Dockerfile", "deploy/docker/Dockerfile.cuda"] {
        let out = tool("hadolint", &[file]);
        assert!(out.status.success(), "hadolint {file}:\n{}", text(&out));
    }
}

#[test]
fn the_chart_lints_and_renders_manifests_kubernetes_accepts_for_cpu_and_gpu_values() {
    let gpu = chart().join("ci/gpu-3-stage-values.yaml");
    let gpu = gpu.to_str().expect("utf-8 path");
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, values) in [("cpu", vec![]), ("gpu", vec!["-f", gpu])] {
        let mut lint = vec!["lint", "--strict", "deploy/helm/strata"];
        lint.extend_from_slice(&values);
        let out = tool("helm", &lint);
        assert!(out.status.success(), "helm lint ({name}):\n{}", text(&out));

        let manifests = render(&values).unwrap_or_else(|e| panic!("helm template ({name}):\n{e}"));
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &manifests).expect("write manifests");
        let out = tool(
            "kubernetes-validate",
            &["--strict", "--quiet", file.to_str().expect("utf-8 path")],
        );
        assert!(
            out.status.success(),
            "kubernetes-validate ({name}):\n{}",
            text(&out)
        );

        let docs = documents(&manifests);
        for kind in ["Deployment", "Service", "ConfigMap", "PodDisruptionBudget"] {
            assert!(!of_kind(&docs, kind).is_empty(), "{name}: no {kind}");
        }
        let sets = of_kind(&docs, "StatefulSet");
        assert_eq!(sets.len(), 1, "{name}: one StatefulSet per device kind");
        let set = sets[0];
        let container = &set["spec"]["template"]["spec"]["containers"][0];
        let gpus = &container["resources"]["limits"]["nvidia.com/gpu"];
        if name == "cpu" {
            // topologies/default.yml: cpu[0] and cpu[1].
            assert_eq!(set["spec"]["replicas"], 2, "{set:?}");
            assert!(gpus.is_null(), "CPU workers ask for no GPU: {container:?}");
        } else {
            assert_eq!(set["spec"]["replicas"], 3, "{set:?}");
            assert_eq!(
                gpus,
                &Value::from(1),
                "one GPU per worker pod: {container:?}"
            );
            assert!(
                str_of(&container["image"]).ends_with("-cuda"),
                "{container:?}"
            );
        }
        // The gateway is given one address per device, each a pod of the headless Service.
        let gateway = of_kind(&docs, "Deployment")[0];
        let args = &gateway["spec"]["template"]["spec"]["containers"][0]["args"];
        let workers: Vec<&str> = args
            .as_sequence()
            .expect("args")
            .iter()
            .map(str_of)
            .filter(|a| a.starts_with("--worker="))
            .collect();
        let want = if name == "cpu" { 2 } else { 3 };
        assert_eq!(workers.len(), want, "{workers:?}");
    }
}

#[test]
fn the_service_monitor_scrapes_the_metrics_port_of_the_gateway_and_every_worker() {
    let manifests = render(&["--set", "metrics.serviceMonitor.enabled=true"])
        .unwrap_or_else(|e| panic!("helm template:\n{e}"));
    let docs = documents(&manifests);
    let monitors = of_kind(&docs, "ServiceMonitor");
    assert_eq!(monitors.len(), 1);
    let spec = &monitors[0]["spec"];
    assert_eq!(spec["endpoints"][0]["port"], "metrics");
    assert_eq!(spec["endpoints"][0]["path"], "/metrics");
    let selector = spec["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels");
    let services = of_kind(&docs, "Service");
    assert_eq!(services.len(), 2, "the gateway's and the workers'");
    for service in services {
        let labels = service["metadata"]["labels"].as_mapping().expect("labels");
        for (k, v) in selector {
            assert_eq!(labels.get(k), Some(v), "{service:?}");
        }
        let ports = service["spec"]["ports"].as_sequence().expect("ports");
        assert!(ports.iter().any(|p| p["name"] == "metrics"), "{service:?}");
    }
    // Without the Prometheus Operator's CRD nothing asks for one.
    let docs = documents(&render(&[]).expect("default values render"));
    assert!(of_kind(&docs, "ServiceMonitor").is_empty());
}

#[test]
fn a_topology_the_chart_cannot_place_fails_to_render_with_the_charts_message() {
    let err = render(&["-f", "tests/deploy/three-devices-two-pods.yaml"])
        .expect_err("three devices with workers.maxPods 2 must not render");
    assert!(
        err.contains(
            "values.topology names 3 devices (cpu[0], cpu[1], cpu[2]) but workers.maxPods is 2"
        ),
        "{err}"
    );

    let gap = "0-10:\n  device: cpu[0]\n10-30:\n  device: cpu[2]\n";
    let err = render(&["--set-string", &format!("topology={gap}")]).expect_err("a gap");
    assert!(
        err.contains("values.topology names cpu[0], cpu[2] but not cpu[1]"),
        "{err}"
    );

    let metal = "0-30:\n  device: metal[0]\n";
    let err = render(&["--set-string", &format!("topology={metal}")]).expect_err("metal");
    assert!(err.contains("`0-30` names device `metal[0]`"), "{err}");

    let err = render(&["--set", "model.id=/models/smollm2.gguf"]).expect_err("a path");
    assert!(
        err.contains("model.id is a path (/models/smollm2.gguf) but model.volume is empty"),
        "{err}"
    );

    let err = render(&["--set", "workers.maxpods=3"]).expect_err("a misspelt value");
    assert!(
        err.contains("Additional property maxpods is not allowed"),
        "{err}"
    );
}

/// A rendered pod, run here as a local process.
struct Pod {
    name: String,
    ip: String,
    container: Value,
    volumes: Value,
}

/// A running pod's process; killed on drop.
struct Running {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// Replaces the in-cluster names in a value or a `--flag=value` argument: DNS names of pods by
/// loopback addresses, `0.0.0.0` (listen on every interface) by the pod's own address, and a
/// path under a mount by the local directory that stands for the volume.
fn localize(
    s: &str,
    pod_ip: &str,
    hosts: &[(String, String)],
    mounts: &[(String, PathBuf)],
) -> String {
    let (flag, value) = match s.split_once('=') {
        Some((flag, value)) if flag.starts_with("--") => (format!("{flag}="), value),
        _ => (String::new(), s),
    };
    let mut value = value.replace("0.0.0.0", pod_ip);
    for (host, ip) in hosts {
        value = value.replace(host.as_str(), ip);
    }
    // `mounts` is sorted longest first, so /cache/x is not taken for /cache.
    if let Some((mount, dir)) = mounts
        .iter()
        .find(|(m, _)| value == *m || value.starts_with(&format!("{m}/")))
    {
        value = format!("{}{}", dir.display(), &value[mount.len()..]);
    }
    flag + &value
}

/// Kubernetes' `$(VAR)` expansion in arguments, from the container's environment.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// The Strata cache of this machine (where the default model was fetched), as `strata` finds
/// it.
fn local_strata_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATA_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("strata");
    }
    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/strata")
}

fn start(
    pod: &Pod,
    hosts: &[(String, String)],
    configmaps: &HashMap<String, Value>,
    base: &Path,
) -> Running {
    let dir = base.join(&pod.name);
    // Volumes: ConfigMaps written out as files; the model cache pre-filled with this machine's
    // (as a persistent volume would be); every other volume an empty directory.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in pod.container["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
    {
        let name = str_of(&m["name"]);
        let path = dir.join(name);
        std::fs::create_dir_all(&path).expect("volume dir");
        let volume = pod
            .volumes
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{}: no volume {name}", pod.name));
        // ConfigMaps, and Secrets (the chart writes its own as stringData), as files.
        let source = volume["configMap"]["name"]
            .as_str()
            .or_else(|| volume["secret"]["secretName"].as_str());
        if let Some(source) = source {
            let data = configmaps
                .get(source)
                .unwrap_or_else(|| panic!("no ConfigMap or Secret {source}"));
            for (file, content) in data.as_mapping().expect("data") {
                std::fs::write(path.join(str_of(file)), str_of(content)).expect("write file");
            }
        } else if name == "cache" {
            std::os::unix::fs::symlink(local_strata_cache(), path.join("strata"))
                .expect("link the model cache");
        }
        mounts.push((str_of(&m["mountPath"]).to_string(), path));
    }
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));

    let mut env = BTreeMap::new();
    for e in pod.container["env"].as_sequence().expect("env") {
        let name = str_of(&e["name"]).to_string();
        let value = if let Some(v) = e["value"].as_str() {
            localize(v, &pod.ip, hosts, &mounts)
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" {
            pod.ip.clone()
        } else {
            panic!("{}: no local value for {e:?}", pod.name);
        };
        env.insert(name, value);
    }
    let command = pod.container["command"].as_sequence().expect("command");
    assert_eq!(command.len(), 1, "{command:?}");
    assert_eq!(command[0], "strata", "the image's binary");
    let args: Vec<String> = pod.container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| localize(&expand(str_of(a), &env), &pod.ip, hosts, &mounts))
        .collect();

    let mut child = Command::new(support::strata())
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", pod.name));
    let log = Arc::new(Mutex::new(format!("$ strata {}\n", args.join(" "))));
    if let Some(err) = child.stderr.take() {
        support::collect_lines(err, &log);
    }
    Running {
        name: pod.name.clone(),
        child,
        log,
    }
}

fn logs(running: &[Running]) -> String {
    running
        .iter()
        .map(|r| format!("--- {} ---\n{}", r.name, r.log()))
        .collect()
}

/// Waits until `grpc.health.v1.Health/Check` (the empty service name, as a Kubernetes `grpc`
/// probe asks) answers SERVING at `addr`.
async fn wait_serving(addr: &str, running: &mut [Running], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("a valid address")
            .connect()
            .await
            && let Ok(r) = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            && r.into_inner().status == ServingStatus::Serving as i32
        {
            return;
        }
        let exited = running.iter_mut().find_map(|r| match r.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited with {status}", r.name)),
            _ => None,
        });
        if let Some(exited) = exited {
            panic!("{exited}:\n{}", logs(running));
        }
        assert!(
            Instant::now() < deadline,
            "{addr} is not SERVING after {limit:?}:\n{}",
            logs(running)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `grpc:` port of a container's readiness probe.
fn probe_port(container: &Value) -> u64 {
    container["readinessProbe"]["grpc"]["port"]
        .as_u64()
        .unwrap_or_else(|| panic!("a grpc readiness probe: {container:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_command_lines_start_a_working_pipeline() {
    let namespace = "strata-test";
    let manifests =
        render(&["--namespace", namespace]).unwrap_or_else(|e| panic!("helm template:\n{e}"));
    let docs = documents(&manifests);

    let configmaps: HashMap<String, Value> = of_kind(&docs, "ConfigMap")
        .into_iter()
        .map(|c| (c, "data"))
        .chain(
            of_kind(&docs, "Secret")
                .into_iter()
                .map(|c| (c, "stringData")),
        )
        .map(|(c, data)| (str_of(&c["metadata"]["name"]).to_string(), c[data].clone()))
        .collect();
    // A loopback address per pod, unlikely to be in use by another run.
    let pid = std::process::id();
    let net = format!("127.{}.{}", (pid >> 8) & 0xff, pid & 0xff);
    let mut pods = Vec::new();
    let mut hosts = Vec::new();
    for set in of_kind(&docs, "StatefulSet") {
        let name = str_of(&set["metadata"]["name"]);
        let service = str_of(&set["spec"]["serviceName"]);
        let replicas = set["spec"]["replicas"].as_u64().expect("replicas");
        for i in 0..replicas {
            let pod = format!("{name}-{i}");
            let ip = format!("{net}.{}", pods.len() + 2);
            hosts.push((format!("{pod}.{service}.{namespace}.svc"), ip.clone()));
            let spec = &set["spec"]["template"]["spec"];
            pods.push(Pod {
                name: pod,
                ip,
                container: spec["containers"][0].clone(),
                volumes: spec["volumes"].clone(),
            });
        }
    }
    assert_eq!(pods.len(), 2, "topologies/default.yml names two devices");
    let gateway = of_kind(&docs, "Deployment")[0];
    let spec = &gateway["spec"]["template"]["spec"];
    let gateway = Pod {
        name: "gateway".into(),
        ip: format!("{net}.1"),
        container: spec["containers"][0].clone(),
        volumes: spec["volumes"].clone(),
    };

    let base = tempfile::tempdir().expect("temp dir");
    let mut running: Vec<Running> = pods
        .iter()
        .map(|p| start(p, &hosts, &configmaps, base.path()))
        .collect();
    for p in &pods {
        let addr = format!("{}:{}", p.ip, probe_port(&p.container));
        wait_serving(&addr, &mut running, Duration::from_secs(60)).await;
    }
    running.push(start(&gateway, &hosts, &configmaps, base.path()));
    let health = format!("{}:{}", gateway.ip, probe_port(&gateway.container));
    wait_serving(&health, &mut running, Duration::from_secs(300)).await;
    let api_port = gateway.container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "grpc")
        .and_then(|p| p["containerPort"].as_u64())
        .expect("the gateway's grpc port");
    let addr = format!("{}:{api_port}", gateway.ip);

    let mut client = StrataClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the gateway");
    let info = client
        .model_info(ModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner();
    let devices: Vec<&str> = info.workers.iter().map(|w| w.device.as_str()).collect();
    assert_eq!(devices, ["cpu[0]", "cpu[1]"], "{info:?}");
    for w in &info.workers {
        assert!(
            hosts.iter().any(|(_, ip)| w.address.contains(ip.as_str())),
            "worker {} is reached at a pod's address",
            w.address
        );
    }

    let prompt = "The capital of France is";
    let (tokens, finished) = support::generate(
        &mut client,
        GenerateRequest {
            input: Some(generate_request::Input::Prompt(prompt.into())),
            parameters: Some(SamplingParameters {
                max_tokens: Some(24),
                temperature: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|s| panic!("generate: {s}\n{}", logs(&running)));
    let streamed: String =
        tokens.iter().map(|t| t.text.as_str()).collect::<String>() + &finished.text;
    assert!(!tokens.is_empty(), "{finished:?}");

    // The same generation in one process, all stages local, with the same topology.
    // Every pod serves the metrics the chart points Prometheus at.
    for pod in pods.iter().chain([&gateway]) {
        let port = pod.container["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == "metrics")
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{}: no metrics port", pod.name));
        let text = support::scrape(&format!("{}:{port}", pod.ip));
        let series = if pod.name == "gateway" {
            "strata_generation_tokens_total"
        } else {
            "strata_worker_frames_total{direction=\"in\"}"
        };
        assert!(support::metric(&text, series) > 0.0, "{}: {text}", pod.name);
    }

    let out = Command::new(support::strata())
        .args([
            "generate",
            "--max-tokens",
            "24",
            "--temperature",
            "0",
            "--prompt",
            prompt,
        ])
        .output()
        .expect("strata generate");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        format!("{streamed}\n"),
        String::from_utf8_lossy(&out.stdout),
        "the chart's pipeline streams what one process generates"
    );
}
