//! Load plans for the default model (SmolLM2-135M-Instruct, Q4_1 GGUF: 30 layers, hidden size
//! 576, intermediate size 1536, tied output head): the ISQ type, device and stage each tensor
//! resolves to under overlapping ranges, regex selectors and `--isq`, and the errors a topology
//! that does not fit the model gets.

// Test helpers outside `#[test]` functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use strata_shared::device::DeviceSpec;
use strata_shared::ggml::GgmlType;
use strata_shared::isq::IsqType;
use strata_shared::meta::ModelMeta;
use strata_shared::plan::{Plan, PlanError, PlanOptions, StagePlan, TensorPlan};
use strata_shared::source::{ModelFiles, fetch_default_model};
use strata_shared::topology::{LayerTopology, Topology};

fn meta() -> &'static ModelMeta {
    static META: OnceLock<ModelMeta> = OnceLock::new();
    META.get_or_init(|| {
        let path = fetch_default_model().unwrap();
        ModelMeta::open(ModelFiles::resolve(path.to_str().unwrap(), None).unwrap()).unwrap()
    })
}

const OPTS: PlanOptions = PlanOptions {
    isq: Some(IsqType::Q8_0),
    dtype: None,
    default_device: DeviceSpec::Cpu(0),
};

fn plan(yaml: &str, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let topology = Topology::parse(yaml, "t.yml").unwrap();
    Plan::resolve(meta(), &topology, opts)
}

fn tensor<'p>(plan: &'p Plan, name: &str) -> &'p TensorPlan {
    plan.tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor `{name}` in the plan"))
}

fn layer(i: usize, suffix: &str) -> String {
    format!("model.layers.{i}.{suffix}")
}

/// Overlapping ranges, a single layer, two selectors; layers 25, 26, 28 and 29 uncovered.
const TOPOLOGY: &str = r"0-20:
  isq: Q4K
10-20:
  isq: Q5_0
15-25:
  isq: HQQ4
  device: cpu[1]
27:
  isq: Q6K
'/self_attn\.(q|k)_proj/':
  isq: Q8_0
'/layers\.2[0-9]\.mlp\.down_proj/':
  isq: Q2K
";

const QK_SELECTOR: &str = r"selector /self_attn\.(q|k)_proj/ (line 10)";
const DOWN_SELECTOR: &str = r"selector /layers\.2[0-9]\.mlp\.down_proj/ (line 12)";

/// Checks one tensor use: requested and applied ISQ type, why, device, stage, byte cost.
#[track_caller]
fn check(
    plan: &Plan,
    name: &str,
    requested: IsqType,
    isq: IsqType,
    reason: &str,
    device: DeviceSpec,
    stage: usize,
) {
    let t = tensor(plan, name);
    assert_eq!(t.source, name, "{name}: reads itself");
    assert_eq!(t.stored, GgmlType::Q4_1, "{name}");
    assert_eq!(t.requested, Some(requested), "{name}: requested");
    assert_eq!(t.isq, Some(isq), "{name}: applied ISQ");
    assert_eq!(t.dtype, None, "{name}");
    assert_eq!(t.reason, reason, "{name}: reason");
    assert_eq!(t.device, device, "{name}: device");
    assert_eq!(t.stage, stage, "{name}: stage");
    let [rows, cols] = t.shape[..] else {
        panic!("{name}: not a matrix: {:?}", t.shape)
    };
    assert_eq!(
        t.bytes_loaded,
        isq.storage_bytes(rows, cols).unwrap() as u64,
        "{name}: bytes loaded"
    );
    assert_eq!(
        t.bytes_stored,
        (rows * cols / 32 * 20) as u64,
        "{name}: Q4_1 bytes stored"
    );
    if isq == requested {
        assert_eq!(t.note, None, "{name}: no fallback, no note");
    } else {
        let cols = t.shape[1];
        let want = format!(
            "{cols}-wide rows do not split into {requested}'s {}-wide blocks: using {isq}",
            requested.block_size()
        );
        assert_eq!(t.note.as_deref(), Some(want.as_str()), "{name}: note");
    }
}

#[test]
fn overlapping_ranges_selectors_and_isq_resolve_per_tensor() {
    let p = plan(TOPOLOGY, &OPTS).unwrap();
    let (cpu0, cpu1) = (DeviceSpec::Cpu(0), DeviceSpec::Cpu(1));
    let r0_20 = "range 0-20 (line 1)";
    let r10_20 = "range 10-20 (line 3)";
    let r15_25 = "range 15-25 (line 5)";
    let r27 = "range 27 (line 8)";

    // 0-9: only 0-20 covers them (Q4K, default device). 576-wide rows fall back to Q5_0;
    // down_proj's 1536-wide rows take Q4K.
    check(
        &p,
        &layer(0, "self_attn.v_proj.weight"),
        IsqType::Q4K,
        IsqType::Q5_0,
        r0_20,
        cpu0,
        0,
    );
    check(
        &p,
        &layer(0, "mlp.gate_proj.weight"),
        IsqType::Q4K,
        IsqType::Q5_0,
        r0_20,
        cpu0,
        0,
    );
    check(
        &p,
        &layer(9, "self_attn.o_proj.weight"),
        IsqType::Q4K,
        IsqType::Q5_0,
        r0_20,
        cpu0,
        0,
    );
    check(
        &p,
        &layer(0, "mlp.down_proj.weight"),
        IsqType::Q4K,
        IsqType::Q4K,
        r0_20,
        cpu0,
        0,
    );
    // The q/k selector overrides every range.
    check(
        &p,
        &layer(0, "self_attn.q_proj.weight"),
        IsqType::Q8_0,
        IsqType::Q8_0,
        QK_SELECTOR,
        cpu0,
        0,
    );
    check(
        &p,
        &layer(3, "self_attn.k_proj.weight"),
        IsqType::Q8_0,
        IsqType::Q8_0,
        QK_SELECTOR,
        cpu0,
        0,
    );

    // 10-14: 0-20 and 10-20 end together; the later one (10-20) wins.
    check(
        &p,
        &layer(10, "self_attn.o_proj.weight"),
        IsqType::Q5_0,
        IsqType::Q5_0,
        r10_20,
        cpu0,
        0,
    );
    check(
        &p,
        &layer(14, "mlp.down_proj.weight"),
        IsqType::Q5_0,
        IsqType::Q5_0,
        r10_20,
        cpu0,
        0,
    );
    check(
        &p,
        &layer(12, "self_attn.q_proj.weight"),
        IsqType::Q8_0,
        IsqType::Q8_0,
        QK_SELECTOR,
        cpu0,
        0,
    );

    // 15-24: 15-25 has the highest end and wins, device included.
    check(
        &p,
        &layer(15, "self_attn.v_proj.weight"),
        IsqType::Hqq4,
        IsqType::Hqq4,
        r15_25,
        cpu1,
        1,
    );
    check(
        &p,
        &layer(17, "mlp.up_proj.weight"),
        IsqType::Hqq4,
        IsqType::Hqq4,
        r15_25,
        cpu1,
        1,
    );
    check(
        &p,
        &layer(19, "mlp.down_proj.weight"),
        IsqType::Hqq4,
        IsqType::Hqq4,
        r15_25,
        cpu1,
        1,
    );
    check(
        &p,
        &layer(24, "self_attn.o_proj.weight"),
        IsqType::Hqq4,
        IsqType::Hqq4,
        r15_25,
        cpu1,
        1,
    );
    check(
        &p,
        &layer(16, "self_attn.k_proj.weight"),
        IsqType::Q8_0,
        IsqType::Q8_0,
        QK_SELECTOR,
        cpu1,
        1,
    );
    // The down_proj selector covers layers 20-29; 1536-wide rows take Q2K as asked.
    check(
        &p,
        &layer(20, "mlp.down_proj.weight"),
        IsqType::Q2K,
        IsqType::Q2K,
        DOWN_SELECTOR,
        cpu1,
        1,
    );
    check(
        &p,
        &layer(22, "mlp.down_proj.weight"),
        IsqType::Q2K,
        IsqType::Q2K,
        DOWN_SELECTOR,
        cpu1,
        1,
    );

    // 25, 26, 28, 29: no range; --isq (Q8_0) on the default device.
    for i in [25, 26, 28, 29] {
        for suffix in [
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
        ] {
            check(
                &p,
                &layer(i, suffix),
                IsqType::Q8_0,
                IsqType::Q8_0,
                "--isq",
                cpu0,
                2,
            );
        }
        check(
            &p,
            &layer(i, "mlp.down_proj.weight"),
            IsqType::Q2K,
            IsqType::Q2K,
            DOWN_SELECTOR,
            cpu0,
            2,
        );
        check(
            &p,
            &layer(i, "self_attn.q_proj.weight"),
            IsqType::Q8_0,
            IsqType::Q8_0,
            QK_SELECTOR,
            cpu0,
            2,
        );
    }

    // 27: the single-layer key; Q6K falls back to Q8_0 on 576-wide rows.
    check(
        &p,
        &layer(27, "self_attn.o_proj.weight"),
        IsqType::Q6K,
        IsqType::Q8_0,
        r27,
        cpu0,
        2,
    );
    check(
        &p,
        &layer(27, "mlp.up_proj.weight"),
        IsqType::Q6K,
        IsqType::Q8_0,
        r27,
        cpu0,
        2,
    );
    check(
        &p,
        &layer(27, "self_attn.k_proj.weight"),
        IsqType::Q8_0,
        IsqType::Q8_0,
        QK_SELECTOR,
        cpu0,
        2,
    );
    check(
        &p,
        &layer(27, "mlp.down_proj.weight"),
        IsqType::Q2K,
        IsqType::Q2K,
        DOWN_SELECTOR,
        cpu0,
        2,
    );
    let o27 = tensor(&p, &layer(27, "self_attn.o_proj.weight"));
    assert!(
        o27.note
            .as_deref()
            .is_some_and(|n| n.contains("Q6K") && n.contains("Q8_0")),
        "{o27:?}"
    );

    // Route: embedding + 0-14 on cpu[0], 15-24 on cpu[1], 25-29 + head on cpu[0].
    let stage = |index, device, layer_start, layer_end, embed, head| StagePlan {
        index,
        device,
        layer_start,
        layer_end,
        embed,
        head,
    };
    assert_eq!(
        p.route,
        vec![
            stage(0, cpu0, 0, 15, true, false),
            stage(1, cpu1, 15, 25, false, false),
            stage(2, cpu0, 25, 30, false, true),
        ]
    );
    assert_eq!(p.devices, vec![cpu0, cpu1]);
    for t in &p.tensors {
        let s = &p.route[t.stage];
        assert_eq!(t.device, s.device, "{}: device of its stage", t.name);
    }
    assert_eq!(p.stage_tensors(1).count(), 10 * 9);
    let stage1: u64 = p
        .tensors
        .iter()
        .filter(|t| t.stage == 1)
        .map(|t| t.bytes_loaded)
        .sum();
    assert_eq!(p.stage_bytes(1), stage1);
}

#[test]
fn embedding_head_and_norms_are_never_quantized() {
    let p = plan(TOPOLOGY, &OPTS).unwrap();
    // 9 tensors per layer, the embedding, the final norm and the tied head.
    assert_eq!(p.tensors.len(), 30 * 9 + 3);
    assert_eq!(
        p.tensors.first().map(|t| t.name.as_str()),
        Some("model.embed_tokens.weight")
    );
    assert_eq!(
        p.tensors.last().map(|t| t.name.as_str()),
        Some("lm_head.weight")
    );

    let embed = tensor(&p, "model.embed_tokens.weight");
    let head = tensor(&p, "lm_head.weight");
    assert_eq!(
        head.source, "model.embed_tokens.weight",
        "tied head reads the embedding"
    );
    assert_eq!(head.shape, vec![49152, 576]);
    for t in [embed, head] {
        assert_eq!(t.stored, GgmlType::Q8_0, "{}", t.name);
        assert_eq!(
            (t.requested, t.isq, t.dtype),
            (None, None, None),
            "{}",
            t.name
        );
        assert_eq!(t.bytes_loaded, t.bytes_stored, "{}", t.name);
        assert_eq!(
            t.bytes_stored,
            IsqType::Q8_0.storage_bytes(49152, 576).unwrap() as u64
        );
        assert_eq!(t.device, DeviceSpec::Cpu(0));
    }
    assert_eq!(embed.stage, 0);
    assert_eq!(head.stage, 2);

    let norms: Vec<&TensorPlan> = p
        .tensors
        .iter()
        .filter(|t| t.name.contains("norm"))
        .collect();
    assert_eq!(norms.len(), 30 * 2 + 1);
    for t in norms {
        assert_eq!(t.shape, vec![576], "{}", t.name);
        assert_eq!(t.stored, GgmlType::F32, "{}", t.name);
        assert_eq!(
            (t.requested, t.isq, t.dtype),
            (None, None, None),
            "{}",
            t.name
        );
        assert_eq!(t.bytes_loaded, 576 * 4, "{}", t.name);
    }
    let n17 = tensor(&p, &layer(17, "input_layernorm.weight"));
    assert_eq!(
        (n17.device, n17.stage),
        (DeviceSpec::Cpu(1), 1),
        "a layer's norms go with the layer"
    );
    let final_norm = tensor(&p, "model.norm.weight");
    assert_eq!(
        (final_norm.device, final_norm.stage),
        (DeviceSpec::Cpu(0), 2)
    );
}

#[test]
fn selector_isq_on_a_norm_is_ignored_with_a_note() {
    let p = plan("'/input_layernorm/':\n  isq: Q8_0\n", &OPTS).unwrap();
    let t = tensor(&p, &layer(4, "input_layernorm.weight"));
    assert_eq!((t.requested, t.isq), (None, None));
    assert!(
        t.note
            .as_deref()
            .is_some_and(|n| n.contains("1-D tensors stay as stored")),
        "{t:?}"
    );
}

#[test]
fn requesting_the_stored_type_keeps_the_tensor_as_stored() {
    let opts = PlanOptions {
        isq: Some(IsqType::Q4_1),
        ..OPTS
    };
    let p = plan("", &opts).unwrap();
    for t in p.tensors.iter().filter(|t| t.name.contains("_proj")) {
        assert_eq!(t.requested, Some(IsqType::Q4_1), "{}", t.name);
        assert_eq!(t.isq, None, "{}", t.name);
        assert_eq!(t.dtype, None, "{}", t.name);
        assert_eq!(t.reason, "--isq", "{}", t.name);
        assert_eq!(
            t.note.as_deref(),
            Some("already stored as Q4_1: kept as stored"),
            "{}",
            t.name
        );
        assert_eq!(t.bytes_loaded, t.bytes_stored, "{}", t.name);
    }
    // The same through a selector, next to a layer that is quantized.
    let p = plan("'/layers\\.5\\.mlp\\.up_proj/':\n  isq: Q4_1\n", &OPTS).unwrap();
    let up5 = tensor(&p, &layer(5, "mlp.up_proj.weight"));
    assert_eq!((up5.requested, up5.isq), (Some(IsqType::Q4_1), None));
    assert_eq!(up5.bytes_loaded, up5.bytes_stored);
    let up6 = tensor(&p, &layer(6, "mlp.up_proj.weight"));
    assert_eq!(
        (up6.requested, up6.isq),
        (Some(IsqType::Q8_0), Some(IsqType::Q8_0))
    );
    // No topology and no --isq: everything as stored, one stage on the default device.
    let p = plan("", &PlanOptions::default()).unwrap();
    assert!(p.tensors.iter().all(|t| t.isq.is_none()
        && t.requested.is_none()
        && (t.name == "lm_head.weight" || t.bytes_loaded == t.bytes_stored)));
    // The tied head on the embedding's stage shares its weights: no memory of its own.
    let head = tensor(&p, "lm_head.weight");
    assert_eq!(
        (head.source.as_str(), head.bytes_loaded),
        ("model.embed_tokens.weight", 0)
    );
    assert!(
        head.note
            .as_deref()
            .is_some_and(|n| n.contains("shares the embedding"))
    );
    // On another stage than the embedding, the head is loaded again.
    let p = plan(
        "0-15: {device: 'cpu[0]'}\n15-30: {device: 'cpu[1]'}\n",
        &PlanOptions::default(),
    )
    .unwrap();
    let head = tensor(&p, "lm_head.weight");
    assert_eq!(head.bytes_loaded, head.bytes_stored);
    assert_eq!(p.route.len(), 2);
    let p = plan("", &PlanOptions::default()).unwrap();
    assert_eq!(p.route.len(), 1);
    assert_eq!(p.devices, vec![DeviceSpec::Cpu(0)]);
}

#[test]
fn a_selector_may_move_the_embedding_to_its_own_stage() {
    let p = plan("'/embed_tokens/':\n  device: cpu[1]\n", &OPTS).unwrap();
    assert_eq!(
        tensor(&p, "model.embed_tokens.weight").device,
        DeviceSpec::Cpu(1)
    );
    assert_eq!(
        tensor(&p, "lm_head.weight").device,
        DeviceSpec::Cpu(0),
        "the tied head stays with the last layer"
    );
    let spans: Vec<_> = p
        .route
        .iter()
        .map(|s| (s.device, s.layer_start, s.layer_end, s.embed, s.head))
        .collect();
    assert_eq!(
        spans,
        vec![
            (DeviceSpec::Cpu(1), 0, 0, true, false),
            (DeviceSpec::Cpu(0), 0, 30, false, true)
        ]
    );
    assert_eq!(p.devices, vec![DeviceSpec::Cpu(1), DeviceSpec::Cpu(0)]);
    assert_eq!(tensor(&p, "model.embed_tokens.weight").stage, 0);
    assert_eq!(tensor(&p, &layer(0, "mlp.up_proj.weight")).stage, 1);
}

fn err(yaml: &str) -> String {
    plan(yaml, &OPTS).unwrap_err().to_string()
}

#[test]
fn a_range_past_the_model_is_an_error() {
    let msg = err("0-10:\n  isq: Q4K\n25-31:\n  isq: Q8_0\n");
    assert!(msg.starts_with("t.yml:3: key `25-31`: "), "{msg}");
    assert!(
        msg.contains("range `25-31` ends past the model's 30 layers (0-29)"),
        "{msg}"
    );
    let msg = err("30:\n  isq: Q8_0\n");
    assert!(
        msg.starts_with("t.yml:1: key `30`: layer `30` ends past"),
        "{msg}"
    );
    // The last layer itself is fine.
    plan("29:\n  isq: Q8_0\n0-30:\n", &OPTS).unwrap();
}

#[test]
fn a_selector_matching_nothing_is_an_error() {
    let msg = err("0-30:\n  isq: Q4K\n'/no_such_tensor/':\n  isq: Q8_0\n");
    assert!(
        msg.starts_with("t.yml:3: key `/no_such_tensor/`: "),
        "{msg}"
    );
    assert!(
        msg.contains("regex selector matches no tensor of the model"),
        "{msg}"
    );
    assert!(msg.contains("checked 273 tensors"), "{msg}");
    // GGUF names match too, and so does the tied head's name.
    plan("'/blk\\.3\\.attn_q/':\n  isq: Q4_0\n'/^lm_head/':\n", &OPTS).unwrap();
    let p = plan("'/blk\\.3\\.attn_q/':\n  isq: Q4_0\n", &OPTS).unwrap();
    assert_eq!(
        tensor(&p, &layer(3, "self_attn.q_proj.weight")).isq,
        Some(IsqType::Q4_0)
    );
}

#[test]
fn moving_one_tensor_of_a_layer_is_a_conflict() {
    let yaml = "0-30:\n  device: cpu[0]\n'/layers\\.3\\.self_attn\\.q_proj/':\n  device: cpu[1]\n";
    let e = plan(yaml, &OPTS).unwrap_err();
    let PlanError::Conflict {
        origin, line, key, ..
    } = &e
    else {
        panic!("expected a conflict, got {e:?}")
    };
    assert_eq!(
        (origin.as_str(), *line, key.as_str()),
        ("t.yml", 3, r"/layers\.3\.self_attn\.q_proj/")
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with(r"t.yml:3: key `/layers\.3\.self_attn\.q_proj/`: "),
        "{msg}"
    );
    assert!(
        msg.contains("model.layers.3.self_attn.q_proj.weight") && msg.contains("cpu[1]"),
        "{msg}"
    );
    assert!(
        msg.contains(
            "`model.layers.3.input_layernorm.weight` of the same layer stays on cpu[0] (range 0-30 (line 1))"
        ),
        "{msg}"
    );

    // Two selectors that split one layer between them: the error names both.
    let msg = err(
        "'/layers\\.4\\.mlp/':\n  device: cpu[1]\n'/layers\\.4\\.self_attn/':\n  device: cpu[2]\n",
    );
    assert!(
        msg.starts_with(r"t.yml:1: key `/layers\.4\.mlp/`: "),
        "{msg}"
    );
    assert!(
        msg.contains(r"selector /layers\.4\.self_attn/ (line 3)") && msg.contains("cpu[2]"),
        "{msg}"
    );

    // Naming the layer's own device is no conflict.
    plan(
        "15-25:\n  device: cpu[1]\n'/layers\\.20\\.mlp/':\n  device: cpu[1]\n",
        &OPTS,
    )
    .unwrap();
}

#[test]
fn a_selector_moves_whole_layers() {
    // "Regex selectors may override both isq and device": every tensor of layers 10-12 moves.
    let p = plan(
        "0-30:\n  device: cpu[0]\n'/layers\\.1[0-2]\\./':\n  device: cpu[1]\n",
        &OPTS,
    )
    .unwrap();
    let route: Vec<_> = p
        .route
        .iter()
        .map(|s| (s.device, s.layer_start, s.layer_end))
        .collect();
    assert_eq!(
        route,
        vec![
            (DeviceSpec::Cpu(0), 0, 10),
            (DeviceSpec::Cpu(1), 10, 13),
            (DeviceSpec::Cpu(0), 13, 30)
        ]
    );
    let t = tensor(&p, &layer(11, "input_layernorm.weight"));
    assert_eq!((t.device, t.stage), (DeviceSpec::Cpu(1), 1));
    assert_eq!(p.devices, vec![DeviceSpec::Cpu(0), DeviceSpec::Cpu(1)]);
}

#[test]
fn splitting_the_final_norm_from_the_head_is_a_conflict() {
    let e = plan("'/^model\\.norm/':\n  device: cpu[2]\n", &OPTS).unwrap_err();
    assert!(matches!(e, PlanError::Conflict { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with(r"t.yml:1: key `/^model\.norm/`: "), "{msg}");
    assert!(msg.contains(r"(selector /^model\.norm/, line 1)"), "{msg}");
    assert!(
        msg.contains("the final norm and the head share one device"),
        "{msg}"
    );
    // Moving the head itself: the selector's line and key.
    let msg = err("'/^lm_head/':\n  device: cpu[2]\n");
    assert!(
        msg.starts_with("t.yml:1: key `/^lm_head/`: puts `lm_head.weight` on cpu[2]"),
        "{msg}"
    );
    // Moving both together is fine: the head stage gets its own device.
    let p = plan(
        "'/^model\\.norm/':\n  device: cpu[2]\n'/^lm_head/':\n  device: cpu[2]\n",
        &OPTS,
    )
    .unwrap();
    let last = p.route.last().unwrap();
    assert_eq!(
        (last.device, last.layer_start, last.layer_end, last.head),
        (DeviceSpec::Cpu(2), 30, 30, true)
    );
}

/// Library bug (shared/src/plan.rs:219): when the head use that conflicts has no selector of its
/// own (the final norm was moved by a selector, the tied head stays on the last layer's device),
/// the error is located at line 0 with an empty key (`t.yml:0: key ``: ...`) instead of at the
/// selector that moved the norm.
#[test]
fn head_conflict_is_located_at_the_selector_that_split_it() {
    let e = plan(
        "0-30:\n  isq: Q8_0\n'/^model\\.norm/':\n  device: cpu[2]\n",
        &OPTS,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with(r"t.yml:3: key `/^model\.norm/`: "), "{msg}");
}

#[test]
fn a_topology_built_in_code_plans_as_its_yaml() {
    let lt = |isq, device| LayerTopology {
        isq: Some(isq),
        device,
    };
    let built = Topology::empty()
        .with_range(0..20, lt(IsqType::Q4K, None))
        .with_range(10..20, lt(IsqType::Q5_0, None))
        .with_range(15..25, lt(IsqType::Hqq4, Some(DeviceSpec::Cpu(1))))
        .with_layer(27, lt(IsqType::Q6K, None))
        .with_selector(r"self_attn\.(q|k)_proj", lt(IsqType::Q8_0, None))
        .with_selector(r"layers\.2[0-9]\.mlp\.down_proj", lt(IsqType::Q2K, None))
        .build()
        .unwrap();
    assert_eq!(built.to_yaml().unwrap(), TOPOLOGY);
    let from_code = Plan::resolve(meta(), &built, &OPTS).unwrap();
    let from_yaml = plan(TOPOLOGY, &OPTS).unwrap();
    assert_eq!(from_code, from_yaml);
    // What `strata plan` prints.
    assert_eq!(from_code.table(), from_yaml.table());
    check(
        &from_code,
        &layer(3, "self_attn.q_proj.weight"),
        IsqType::Q8_0,
        IsqType::Q8_0,
        QK_SELECTOR,
        DeviceSpec::Cpu(0),
        0,
    );
}
