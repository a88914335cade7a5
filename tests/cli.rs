//! The `strata` command line: topology errors stop it before anything starts; perplexity per
//! ISQ type against the reference; memory while quantizing at load.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::{Command, Output};

use support::{golden, strata, topology_file};

fn run(args: &[&str]) -> Output {
    Command::new(strata())
        .args(args)
        .output()
        .expect("run strata")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_topology_files_fail_with_file_line_and_key_before_anything_starts() {
    let cases = [
        (
            "0-8:\n  isq: Q4K\n8-4:\n  isq: Q8_0\n",
            "topology.yml:3: key `8-4`: range end must be greater than start",
        ),
        ("x-3:\n  isq: Q4K\n", "topology.yml:1: key `x-3`"),
        (
            "0-8:\n  isq: Q3_0\n",
            "topology.yml:2: key `0-8`: unknown ISQ type `Q3_0`; expected one of Q4_0, Q4_1",
        ),
        (
            "0-8:\n  device: gpu0\n",
            "topology.yml:2: key `0-8`: invalid device `gpu0`",
        ),
        (
            "'/q_proj(/':\n  isq: Q8_0\n",
            "topology.yml:1: key `/q_proj(/`",
        ),
        ("0-8:\n  isq: Q4K\n0-8:\n  isq: Q8_0\n", "duplicate key"),
        ("0-8:\n  isqq: Q4K\n", "unknown field `isqq`"),
        (
            "28-32:\n  isq: Q8_0\n",
            "topology.yml:1: key `28-32`: range `28-32` ends past the model's 30 layers",
        ),
        (
            "'/no_such_tensor/':\n  isq: Q8_0\n",
            "topology.yml:1: key `/no_such_tensor/`",
        ),
    ];
    for (yaml, want) in cases {
        let (_dir, path) = topology_file(yaml);
        let p = path.to_str().expect("utf-8");
        for cmd in [
            vec!["plan", "--topology", p],
            vec!["serve", "--topology", p, "--listen", "127.0.0.1:0"],
        ] {
            let out = run(&cmd);
            let err = stderr(&out);
            assert!(!out.status.success(), "{cmd:?} must fail for:\n{yaml}");
            assert!(err.contains(want), "{cmd:?}: want `{want}` in:\n{err}");
            assert!(err.contains(p), "the error names the file: {err}");
            assert!(
                !err.contains("worker started") && out.stdout.is_empty(),
                "nothing starts: {err}"
            );
        }
    }
}

#[test]
fn an_invalid_activation_or_kv_cache_setting_fails_before_anything_starts() {
    for (var, value, says) in [
        (
            "STRATA_ACTIVATIONS",
            "int4",
            "STRATA_ACTIVATIONS is `int4`; it must be `int8x2`",
        ),
        (
            "STRATA_KV_CACHE",
            "q8",
            "STRATA_KV_CACHE is `q8`; it must be `auto`",
        ),
    ] {
        let out = Command::new(strata())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env(var, value)
            .output()
            .expect("run strata");
        let err = stderr(&out);
        assert!(!out.status.success());
        assert!(err.contains(says), "{err}");
        assert!(
            out.stdout.is_empty() && !err.contains("worker started"),
            "{err}"
        );
    }
}

#[test]
fn plan_prints_each_tensor_with_its_type_device_and_fallback() {
    let (_dir, path) =
        topology_file("0-15:\n  device: cpu[0]\n  isq: Q4K\n15-30:\n  device: cpu[1]\n");
    let out = run(&[
        "plan",
        "--topology",
        path.to_str().expect("utf-8"),
        "--isq",
        "Q8_0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("route (2 stages, 2 workers)"), "{text}");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name}:\n{text}"))
            .to_string()
    };
    let q = row("model.layers.3.self_attn.q_proj.weight ");
    assert!(
        q.contains("Q5_0")
            && q.contains("cpu[0]")
            && q.contains("576-wide rows do not split into Q4K's 256-wide blocks: using Q5_0"),
        "{q}"
    );
    let down = row("model.layers.3.mlp.down_proj.weight ");
    assert!(down.contains("Q4K"), "{down}");
    let late = row("model.layers.20.mlp.up_proj.weight ");
    assert!(
        late.contains("cpu[1]") && late.contains("range 15-30 (line 4)") && !late.contains("Q8_0"),
        "a covered range without isq keeps the stored type, whatever --isq says: {late}"
    );
    let head = row("lm_head.weight ");
    assert!(
        head.contains("cpu[1]") && head.contains("tied: reads model.embed_tokens.weight"),
        "{head}"
    );
}

#[test]
fn every_shipped_topology_plans_against_the_default_model() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(dir.join("bench")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        let out = run(&["plan", "--topology", f.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", f.display(), stderr(&out));
    }
    // The documented shape: cpu[0] runs 0-8 and 24-30, cpu[1] 8-24.
    let out = run(&[
        "plan",
        "--json",
        "--topology",
        dir.join("isq_and_device.yml").to_str().unwrap(),
    ]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let route: Vec<(String, u64, u64)> = plan["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["device"].as_str().unwrap().to_string(),
                s["layer_start"].as_u64().unwrap(),
                s["layer_end"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        route,
        vec![
            ("cpu[0]".to_string(), 0, 8),
            ("cpu[1]".to_string(), 8, 24),
            ("cpu[0]".to_string(), 24, 30)
        ]
    );
}

#[derive(serde::Deserialize)]
struct Reference {
    f32: f64,
    #[serde(rename = "Q4_0")]
    q4_0: f64,
    #[serde(rename = "Q4_1")]
    q4_1: f64,
    #[serde(rename = "Q5_0")]
    q5_0: f64,
    #[serde(rename = "Q5_1")]
    q5_1: f64,
    #[serde(rename = "Q8_0")]
    q8_0: f64,
    upper_bounds_vs_f32: std::collections::BTreeMap<String, f64>,
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(golden().join("ppl.json")).expect("ppl.json"))
        .expect("ppl.json parses")
}

fn perplexity(extra: &[&str]) -> f64 {
    let text = golden().join("ppl_text.txt");
    let mut args = vec![
        "perplexity",
        "--json",
        "--topology",
        "none",
        "--text",
        text.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(out.status.success(), "strata {args:?}: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["tokens"], 1191);
    assert_eq!(v["windows"], 1);
    v["perplexity"].as_f64().expect("perplexity")
}

#[test]
fn f32_and_the_exact_types_match_the_reference_perplexity() {
    let r = reference();
    let f32 = perplexity(&["--dtype", "f32"]);
    assert!(
        (f32 / r.f32 - 1.0).abs() <= 0.001,
        "f32 perplexity {f32} vs reference {}",
        r.f32
    );
    for (isq, want) in [
        ("Q4_0", r.q4_0),
        ("Q4_1", r.q4_1),
        ("Q5_0", r.q5_0),
        ("Q5_1", r.q5_1),
        ("Q8_0", r.q8_0),
    ] {
        let got = perplexity(&["--isq", isq, "--dtype", "f32"]);
        assert!(
            (got / want - 1.0).abs() <= 0.01,
            "{isq}: perplexity {got} vs reference {want}"
        );
    }
}

#[test]
fn the_other_types_stay_within_their_bounds() {
    let r = reference();
    for (isq, bound) in &r.upper_bounds_vs_f32 {
        let got = perplexity(&["--isq", isq, "--dtype", "f32"]);
        assert!(
            got <= r.f32 * bound,
            "{isq}: perplexity {got} exceeds {bound} x f32 = {}",
            r.f32 * bound
        );
    }
}

/// `strata bench --json` of a short run with every linear weight quantized to Q4_0 at load.
fn bench_q4_0(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "--json",
        "--topology",
        "none",
        "--isq",
        "Q4_0",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--reps",
        "1",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn quantizing_to_q4_0_at_load_peaks_below_the_models_f32_size() {
    let v = bench_q4_0(&[]);
    // SmolLM2-135M: 134,515,008 parameters, plus the tied head loaded once more.
    let f32_size = 134_515_008u64 * 4;
    let peak = v["peak_rss_bytes"].as_u64().expect("peak rss");
    assert!(
        peak < f32_size,
        "peak RSS {peak} is not below the f32 size {f32_size}"
    );
    let weights = v["weight_bytes"].as_u64().expect("weights");
    assert!(weights < 130 << 20, "Q4_0 weights {weights} bytes");
}

#[test]
fn generate_in_one_process_reproduces_the_reference_text() {
    for p in support::prompts() {
        let out = run(&[
            "generate",
            "--topology",
            "none",
            "--dtype",
            "f32",
            "--max-tokens",
            "32",
            "--ignore-eos",
            "--include-special-tokens",
            "--prompt",
            &p.prompt_text,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(text, format!("{}\n", p.greedy_text), "prompt {}", p.name);
        assert!(stderr(&out).contains("[length: "), "{}", stderr(&out));
    }
}

#[test]
fn sliding_windows_score_every_token_once() {
    let r = reference();
    let text = golden().join("ppl_text.txt");
    let out = run(&[
        "perplexity",
        "--json",
        "--topology",
        "none",
        "--dtype",
        "f32",
        "--context",
        "256",
        "--stride",
        "128",
        "--text",
        text.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["tokens"], 1191);
    assert_eq!(v["scored"], 1190, "every token but the first, once");
    assert_eq!(v["windows"], 9);
    let ppl = v["perplexity"].as_f64().expect("perplexity");
    // Less context per token than the one-window reference: a little worse, never better.
    assert!(
        ppl > r.f32 && ppl < r.f32 * 1.3,
        "perplexity {ppl} with 256-token windows vs {} in one window",
        r.f32
    );
}

#[test]
fn quantizing_a_full_precision_checkpoint_holds_one_tensor_in_full_precision_at_a_time() {
    // The default model's weights as an f32 Hugging Face checkpoint (513 MiB of weights).
    let model = strata_shared::source::fetch_default_model().expect("default model");
    let meta = strata_shared::meta::ModelMeta::open(
        strata_shared::source::ModelFiles::resolve(model.to_str().expect("utf-8"), None)
            .expect("resolve"),
    )
    .expect("meta");
    let dir = tempfile::tempdir().expect("tmp");
    strata_worker::weights::export_safetensors(
        &meta,
        strata_shared::plan::FloatType::F32,
        &dir.path().join("model.safetensors"),
    )
    .expect("write the f32 checkpoint");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(golden().join("hf").join(f), dir.path().join(f)).expect("copy");
    }
    let f32_size = std::fs::metadata(dir.path().join("model.safetensors"))
        .expect("size")
        .len();
    let v = bench_q4_0(&["--model", dir.path().to_str().expect("utf-8")]);
    let peak = v["peak_rss_bytes"].as_u64().expect("peak rss");
    let weights = v["weight_bytes"].as_u64().expect("weights");
    // Loaded: Q4_0 linear weights plus the f32 embedding (kept as stored; the tied head
    // shares it), 165 MiB. The largest tensor converted on the way is a 1536 x 576 projection
    // (3.4 MiB in f32); the decoder layers alone are 425 MiB in f32. The peak stays within the
    // loaded weights plus the runtime, the KV cache and allocator slack (measured: 88 MiB),
    // far from what holding the layers in full precision would take.
    eprintln!("f32 checkpoint {f32_size} bytes, loaded {weights}, peak RSS {peak}");
    assert!(weights < f32_size / 2, "weights {weights}");
    assert!(
        peak < weights + (128 << 20),
        "peak RSS {peak} exceeds the loaded weights {weights} by more than 128 MiB"
    );
}

#[test]
fn plan_shows_gpu_devices_and_serve_says_why_it_cannot_run_them() {
    // The user's documented shape: ranges on cuda[0] and the CPU, one uncovered.
    let (_dir, path) = topology_file(
        "0-8:\n  isq: Q4_0\n  device: cuda[0]\n8-16:\n  isq: Q8_0\n  device: cpu\n16-24:\n  isq: Q6K\n28-30:\n  isq: Q8_0\n  device: cuda[0]\n",
    );
    let p = path.to_str().expect("utf-8");
    let out = run(&["plan", "--topology", p]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("cuda[0]"), "{table}");
    if cfg!(feature = "cuda") {
        // A cuda build runs the plan; whether this machine has the GPU, its worker says.
        assert!(!table.contains("would refuse"), "{table}");
        if std::path::Path::new("/dev/nvidiactl").exists() {
            eprintln!("this machine has an NVIDIA GPU: scripts/gpu-check.sh serves on it");
            return;
        }
        let out = run(&["serve", "--topology", p, "--listen", "127.0.0.1:0"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains("cuda[0]: no NVIDIA driver on this machine: libcuda.so cannot be loaded"),
            "{err}"
        );
        return;
    }
    assert!(
        table.contains("note: `strata serve` would refuse this plan")
            && table.contains("topology.yml:1: key `0-8`: device cuda[0]"),
        "{table}"
    );
    let out = run(&["serve", "--topology", p, "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("topology.yml:1: key `0-8`: device cuda[0]: this build runs CPU workers only")
            && err.contains("--features cuda"),
        "{err}"
    );
    assert!(!err.contains("worker started"), "nothing starts: {err}");
}

#[test]
fn serve_refuses_metal_devices_naming_the_entry() {
    let (_dir, path) = topology_file("0-30:\n  device: metal[0]\n");
    let p = path.to_str().expect("utf-8");
    let out = run(&["serve", "--topology", p, "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(
            "topology.yml:1: key `0-30`: device metal[0]: Metal devices are not supported"
        ),
        "{err}"
    );
    assert!(!err.contains("worker started"), "nothing starts: {err}");
}
