//! Hub ids resolved online: a Hugging Face hub stand-in (`HF_ENDPOINT`, the same protocol hf-hub
//! speaks: `/{repo}/resolve/{revision}/{file}` with `Range`, `ETag` and `X-Repo-Commit`) serves
//! a repo; resolution downloads what the model needs into an empty cache, the optional files the
//! repo has, and nothing it lacks. Then the cache alone serves, offline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use strata_shared::meta::ModelMeta;
use strata_shared::source::{HubOptions, ModelFiles};

/// A minimal hub: serves `root/{org}/{name}/{file}` at `/{org}/{name}/resolve/main/{file}`,
/// logging each file it is asked for.
const FAKE_HUB: &str = r#"
import hashlib, http.server, os, sys
root = sys.argv[1]
class Hub(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        parts = self.path.split("/")
        if len(parts) < 6 or parts[3] != "resolve":
            return self.send_error(404)
        path = os.path.join(root, parts[1], parts[2], *parts[5:])
        sys.stderr.write("GET " + "/".join(parts[5:]) + "\n")
        if not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = open(path, "rb").read()
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        if rng:
            a, _, b = rng.split("=")[1].partition("-")
            start = int(a)
            end = int(b) if b else len(data) - 1
        body = data[start:end + 1]
        self.send_response(206 if rng else 200)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, len(data)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

struct FakeHub {
    child: Child,
    endpoint: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeHub {
    fn start(root: &Path) -> FakeHub {
        let mut child = Command::new("python3")
            .args(["-c", FAKE_HUB])
            .arg(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut port = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut port)
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&log);
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(file) = line.strip_prefix("GET ") {
                    sink.lock().unwrap().push(file.to_string());
                }
            }
        });
        FakeHub {
            child,
            endpoint: format!("http://127.0.0.1:{}", port.trim()),
            log,
        }
    }

    fn requested(&self) -> Vec<String> {
        let mut files = self.log.lock().unwrap().clone();
        files.sort();
        files.dedup();
        files
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A safetensors file of zeroed f32 tensors.
fn safetensors(tensors: &[(&str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(std::iter::repeat_n(0u8, offset));
    out
}

/// Every tensor of the one-layer Llama that `config()` describes.
fn tiny_llama() -> Vec<u8> {
    let l = |s: &str| format!("model.layers.0.{s}");
    let names = [
        ("model.embed_tokens.weight".to_string(), vec![4, 8]),
        (l("input_layernorm.weight"), vec![8]),
        (l("post_attention_layernorm.weight"), vec![8]),
        (l("self_attn.q_proj.weight"), vec![8, 8]),
        (l("self_attn.k_proj.weight"), vec![4, 8]),
        (l("self_attn.v_proj.weight"), vec![4, 8]),
        (l("self_attn.o_proj.weight"), vec![8, 8]),
        (l("mlp.gate_proj.weight"), vec![16, 8]),
        (l("mlp.up_proj.weight"), vec![16, 8]),
        (l("mlp.down_proj.weight"), vec![8, 16]),
        ("model.norm.weight".to_string(), vec![8]),
    ];
    let refs: Vec<(&str, &[usize])> = names
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    safetensors(&refs)
}

fn config() -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 4,
        "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "eos_token_id": 2
    })
    .to_string()
}

/// A repo on the fake hub under `root/remote`, holding the tiny model's config.
fn remote_repo(root: &Path, id: &str) -> std::path::PathBuf {
    let repo = root.join("remote").join(id);
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("config.json"), config()).unwrap();
    repo
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        offline: true,
        endpoint: None,
    }
}

/// Resolution into `cache`, downloading from `hub`.
fn online(cache: &Path, hub: &FakeHub) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        offline: false,
        endpoint: Some(hub.endpoint.clone()),
    }
}

#[test]
fn a_hub_id_downloads_what_the_model_needs_then_serves_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = remote_repo(tmp.path(), "acme/tiny");
    std::fs::write(repo.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(
        repo.join("generation_config.json"),
        r#"{"eos_token_id": [2, 3]}"#,
    )
    .unwrap();
    std::fs::write(repo.join("model.safetensors"), tiny_llama()).unwrap();
    let hub = FakeHub::start(&tmp.path().join("remote"));
    let cache = tmp.path().join("cache");
    let online = online(&cache, &hub);
    let files = ModelFiles::resolve_with("acme/tiny", None, &online).unwrap();
    assert_eq!(files.weights.len(), 1);
    assert!(files.weights[0].starts_with(&cache));
    assert!(files.config.is_some() && files.tokenizer_json.is_some());
    assert!(files.generation_config.is_some());
    // The repo has no tokenizer_config.json or chat_template.jinja: asked for, found absent.
    assert_eq!(
        (&files.tokenizer_config, &files.chat_template),
        (&None, &None)
    );
    assert_eq!(
        hub.requested(),
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let meta = ModelMeta::open(files.clone()).unwrap();
    assert_eq!((meta.config.num_layers, meta.config.hidden_size), (1, 8));
    assert_eq!(meta.config.eos_token_ids, [2]);

    // The populated cache now answers offline, without asking the hub.
    drop(hub);
    let again = ModelFiles::resolve_with("acme/tiny", None, &offline(&cache)).unwrap();
    assert_eq!(again.weights, files.weights);
    assert_eq!(again.generation_config, files.generation_config);
}

#[test]
fn a_sharded_hub_checkpoint_downloads_every_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = remote_repo(tmp.path(), "acme/sharded");
    std::fs::write(repo.join("a.safetensors"), safetensors(&[("x", &[4])])).unwrap();
    std::fs::write(repo.join("b.safetensors"), safetensors(&[("y", &[4])])).unwrap();
    std::fs::write(
        repo.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}"#,
    )
    .unwrap();
    let hub = FakeHub::start(&tmp.path().join("remote"));
    let online = online(&tmp.path().join("cache"), &hub);
    let files = ModelFiles::resolve_with("acme/sharded", None, &online).unwrap();
    let names: Vec<_> = files
        .weights
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a.safetensors", "b.safetensors"]);
    assert!(files.weights.iter().all(|p| p.is_file()));

    // A repo with a config but neither form of the weights: both are named.
    remote_repo(tmp.path(), "acme/bare");
    let err = ModelFiles::resolve_with("acme/bare", None, &online)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("acme/bare")
            && err.contains("neither `model.safetensors` nor `model.safetensors.index.json`"),
        "{err}"
    );

    // A repo that is not there: the error names the id and the file.
    let err = ModelFiles::resolve_with("acme/missing", None, &online)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("acme/missing") && err.contains("config.json"),
        "{err}"
    );
}
