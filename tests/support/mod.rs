//! Test support: start real `strata` processes on ephemeral ports and talk to them over gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use strata_proto::v1::strata_client::StrataClient;
use strata_proto::v1::{
    Finished, GenerateRequest, ModelInfoRequest, ModelInfoResponse, Token, generate_response,
};
use tonic::transport::Channel;

/// The `strata` binary under test.
pub fn strata() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strata"))
}

/// The reference outputs in `tests/golden/smollm2` (copied from the reference implementation).
pub fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/smollm2")
}

#[derive(serde::Deserialize, Clone)]
pub struct Prompt {
    pub name: String,
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    #[serde(default)]
    pub messages: Vec<serde_json::Value>,
}

pub fn prompts() -> Vec<Prompt> {
    #[derive(serde::Deserialize)]
    struct File {
        prompts: Vec<Prompt>,
    }
    let text = std::fs::read_to_string(golden().join("prompts.json")).expect("golden prompts.json");
    serde_json::from_str::<File>(&text)
        .expect("prompts.json parses")
        .prompts
}

/// A certificate set (`strata certs`) for 127.0.0.1, 127.0.0.2 and localhost, made once per
/// test binary: what separately started gateways and workers present to each other. It lives
/// in Cargo's directory for the tests' files (under the target directory), not in `/tmp`:
/// nothing removes it when the binary ends.
pub fn certs() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("certs-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("temp dir")
            .keep();
        let out = Command::new(strata())
            .args(["certs", "--out"])
            .arg(&dir)
            .args([
                "--name",
                "127.0.0.1",
                "--name",
                "127.0.0.2",
                "--name",
                "localhost",
            ])
            .output()
            .expect("run strata certs");
        assert!(
            out.status.success(),
            "strata certs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// `--tls-cert`, `--tls-key` and `--tls-ca` of [`certs`].
pub fn tls_args() -> Vec<String> {
    let dir = certs();
    ["tls-cert", "tls-key", "tls-ca"]
        .iter()
        .zip(["tls.crt", "tls.key", "ca.crt"])
        .flat_map(|(flag, file)| [format!("--{flag}"), dir.join(file).display().to_string()])
        .collect()
}

/// The link flags a test process gets unless it chose its own: [`tls_args`] for a `strata
/// gateway` or `strata worker` (`strata serve` makes its own certificates).
fn default_links(args: &[&str]) -> Vec<String> {
    let chose = args
        .iter()
        .any(|a| *a == "--insecure" || a.starts_with("--tls-"));
    let separate = args.iter().any(|a| *a == "gateway" || *a == "worker");
    if separate && !chose {
        tls_args()
    } else {
        vec![]
    }
}

/// A running `strata serve` (or `strata gateway`) process; terminated on drop.
pub struct Server {
    child: Child,
    pub addr: String,
    /// Where it serves Prometheus metrics (with `--metrics-listen`).
    pub metrics: Option<String>,
    /// Where it serves health alone in plaintext (with `--health-listen`).
    pub health: Option<String>,
    log: Arc<Mutex<String>>,
    /// The thread that copies stderr into `log`; it ends when every holder of the pipe exits.
    log_reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts `strata <args> --listen 127.0.0.1:0` and waits for its ready line. On failure,
    /// returns everything the process wrote to stderr.
    pub fn start(args: &[&str]) -> Result<Server, String> {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Server, String> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(strata())
            .args(args)
            .args(default_links(args))
            .args(["--listen", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            // A process group of its own, as a shell gives a job: `interrupt_group` is Ctrl-C.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning strata: {e}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v["event"] == "ready"
                    {
                        let _ = tx.send((
                            v["listen"].as_str().unwrap_or_default().to_string(),
                            v["metrics"].as_str().map(str::to_string),
                            v["health"].as_str().map(str::to_string),
                        ));
                    }
                }
            });
        }
        let mut log_reader = child.stderr.take().map(|err| collect_lines(err, &log));
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok((addr, metrics, health)) => {
                    // The stderr line "gateway ready" comes just before the stdout one, but
                    // through another pipe and thread: wait for it, so that tests read a log
                    // that has everything up to readiness.
                    let until = std::time::Instant::now() + Duration::from_secs(10);
                    while !log_text(&log).contains("gateway ready")
                        && std::time::Instant::now() < until
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    return Ok(Server {
                        child,
                        addr,
                        metrics,
                        health,
                        log,
                        log_reader,
                    });
                }
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        drain(&mut log_reader);
                        return Err(format!(
                            "strata exited with {status} before serving:\n{}",
                            log_text(&log)
                        ));
                    }
                    if std::time::Instant::now() > deadline {
                        let _ = child.kill();
                        return Err(format!(
                            "strata did not become ready in 300 s:\n{}",
                            log_text(&log)
                        ));
                    }
                }
            }
        }
    }

    pub fn log(&self) -> String {
        log_text(&self.log)
    }

    /// The log, once `done` holds for it (lines logged by other tasks and copied by another
    /// thread arrive a moment after what the test saw), or after 20 s.
    pub fn log_until(&self, done: impl Fn(&str) -> bool) -> String {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if done(&log) || std::time::Instant::now() > until {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn client(&self) -> StrataClient<Channel> {
        StrataClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to the gateway")
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal("-TERM", &self.child.id().to_string());
        self.wait_exit()
    }

    /// Sends SIGINT to the server's whole process group, as Ctrl-C in a terminal does.
    pub fn interrupt_group(&mut self) {
        signal("-INT", &format!("-{}", self.child.id()));
    }

    /// The worker processes the server started (its children).
    pub fn children(&self) -> Vec<u32> {
        children_of(self.child.id())
    }

    /// Waits (up to 30 s, then kills) for the server to exit; returns its exit status. The log
    /// then holds all it wrote.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..300 {
            if let Ok(Some(s)) = self.child.try_wait() {
                drain(&mut self.log_reader);
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for strata");
        drain(&mut self.log_reader);
        status
    }
}

impl Drop for Server {
    /// Stops the server as Ctrl-C does (SIGINT: streams in flight end as cancelled), so that it
    /// cleans up after itself (its workers, the directory of its run's certificates) rather
    /// than leaving that behind as SIGKILL would; after 5 s, SIGKILL.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Not `signal`: a drop must not panic (the server may have exited meanwhile).
            let _ = Command::new("kill")
                .args(["-INT", "--", &self.child.id().to_string()])
                .status();
            for _ in 0..50 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits (up to 5 s: a worker that outlives its gateway may hold the pipe) for a process's
/// stderr reader to reach the end of the pipe, so that the log holds all it wrote.
fn drain(reader: &mut Option<std::thread::JoinHandle<()>>) {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while reader.as_ref().is_some_and(|r| !r.is_finished()) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    if reader.as_ref().is_some_and(|r| r.is_finished())
        && let Some(r) = reader.take()
    {
        let _ = r.join();
    }
}

/// Appends every line `from` yields to `log`, on a thread of its own, until it ends.
pub fn collect_lines(
    from: impl std::io::Read + Send + 'static,
    log: &Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    let log = Arc::clone(log);
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if let Ok(mut l) = log.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    })
}

/// A `strata worker` process on ephemeral ports; killed on drop.
pub struct Worker {
    child: Child,
    /// Control-plane URL, for `strata gateway --worker DEVICE=URL`.
    pub control: String,
    /// Data-plane address.
    pub data: String,
    /// Where it serves Prometheus metrics (with `--metrics-listen`).
    pub metrics: Option<String>,
}

impl Worker {
    /// Starts `strata worker --listen 127.0.0.1:0 <args>` and waits for its listening line.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Worker {
        let mut child = Command::new(strata())
            .args(["worker", "--listen", "127.0.0.1:0"])
            .args(args)
            .args(default_links(&[&["worker"], args].concat()))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start strata worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the worker's listening line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON listening line");
        Worker {
            control: format!("http://{}", v["control"].as_str().expect("control address")),
            data: v["data"].as_str().expect("data address").to_string(),
            metrics: v["metrics"].as_str().map(str::to_string),
            child,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /metrics` over plain HTTP/1.1 at `addr`: the body (Prometheus' text format).
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    conn.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("send the request");
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of one series (`name{labels}` exactly as written) in scraped metrics; 0 when
/// absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// `kill SIG TARGET`.
pub fn signal(sig: &str, target: &str) {
    let status = Command::new("kill")
        .args([sig, "--", target])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {target}");
}

/// A process's state and parent from `/proc/PID/stat` (`pid (comm) state ppid ...`; comm may
/// hold spaces, so the fields are read after its last `)`).
fn state_and_parent(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.to_string();
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&p| state_and_parent(p).is_some_and(|(_, ppid)| ppid == pid))
        .collect();
    out.sort_unstable();
    out
}

/// Whether process `pid` still runs (a zombie does not count).
pub fn alive(pid: u32) -> bool {
    state_and_parent(pid).is_some_and(|(state, _)| state != "Z" && state != "X")
}

fn log_text(log: &Arc<Mutex<String>>) -> String {
    log.lock().map(|l| l.clone()).unwrap_or_default()
}

/// Runs a Generate call to the end: its tokens and its final message.
pub async fn generate(
    client: &mut StrataClient<Channel>,
    req: GenerateRequest,
) -> Result<(Vec<Token>, Finished), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(generate_response::Event::Token(t)) => tokens.push(t),
            Some(generate_response::Event::Finished(f)) => return Ok((tokens, f)),
            None => {}
        }
    }
    Err(tonic::Status::internal(
        "stream ended without a Finished message",
    ))
}

/// `ModelInfo` once the scheduler is idle (nothing running or waiting, no block reserved), or
/// its last answer after 10 s. The scheduler publishes its counters after it has sent each
/// stream's last event, so a client that has just read one can ask in between; a leaked block
/// never settles.
pub async fn idle_info(client: &mut StrataClient<Channel>) -> ModelInfoResponse {
    let mut info = ModelInfoResponse::default();
    for _ in 0..100 {
        info = client
            .model_info(ModelInfoRequest {})
            .await
            .expect("model info")
            .into_inner();
        if (info.running, info.waiting, info.kv_cache_reserved_tokens) == (0, 0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    info
}

/// Writes `yaml` to a temp file and returns its path (kept alive by the returned guard).
pub fn topology_file(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("topology.yml");
    std::fs::write(&path, yaml).expect("write topology");
    (dir, path)
}

/// The virtualenv holding grpcurl and Python gRPC, installed on first use by
/// `scripts/setup-test-peers.sh` (which `.ci/run` also runs).
pub fn peers_venv() -> PathBuf {
    setup("scripts/setup-test-peers.sh")
}

/// Runs one of the repository's setup scripts (idempotent installers) and returns the path it
/// prints.
pub fn setup(script: &str) -> PathBuf {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A greedy generation that runs its whole length (end-of-sequence ignored).
pub fn long_story(max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(strata_proto::v1::generate_request::Input::Prompt(
            "Tell me a long story about".into(),
        )),
        parameters: Some(strata_proto::v1::SamplingParameters {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        add_special_tokens: false,
    }
}

/// A request for `max_tokens` after the token ids `ids`, run to its length with log-probabilities:
/// greedy without a seed, sampled at temperature 0.8 with one.
pub fn token_request(ids: &[u32], max_tokens: u32, seed: Option<u64>) -> GenerateRequest {
    GenerateRequest {
        input: Some(strata_proto::v1::generate_request::Input::TokenIds(
            strata_proto::v1::TokenIds { ids: ids.to_vec() },
        )),
        parameters: Some(strata_proto::v1::SamplingParameters {
            max_tokens: Some(max_tokens),
            temperature: Some(if seed.is_some() { 0.8 } else { 0.0 }),
            seed,
            ignore_eos: true,
            logprobs: true,
            ..Default::default()
        }),
        add_special_tokens: false,
    }
}

/// A `grpc.health.v1` client of the server at `addr`.
pub async fn health_client(addr: &str) -> tonic_health::pb::health_client::HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel)
}

/// The health status of `service` ("" for the server's overall one).
pub async fn health_status(
    health: &mut tonic_health::pb::health_client::HealthClient<Channel>,
    service: &str,
) -> Option<i32> {
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}
