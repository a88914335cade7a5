use super::locate::scan_key;
use super::*;
use crate::device::InvalidDevice;
use crate::isq::UnknownIsq;

const RANGES_EXAMPLE: &str = "\
0-8:
  isq: Q3K
  device: cuda[0]
8-16:
  isq: Q4K
  device: cpu
16-24:
  isq: Q6K
# Skip 24-28
28-32:
  isq: Q8_0
  device: cuda[0]
";

const REGEX_EXAMPLE: &str = r"'/attn\.q_proj$/':
  isq: Q4K
'/ffn_.*\.weight$/':
  isq: Q3K
";

fn parse(text: &str) -> Topology {
    match Topology::parse(text, "<inline>") {
        Ok(t) => t,
        Err(e) => panic!("unexpected error for {text:?}: {e}"),
    }
}

fn lt(isq: Option<IsqType>, device: Option<DeviceSpec>) -> LayerTopology {
    LayerTopology { isq, device }
}

use DeviceSpec::{Cpu, Cuda};
use IsqType::*;

#[test]
fn documented_range_example() {
    let t = parse(RANGES_EXAMPLE);
    assert_eq!(t.origin(), "<inline>");
    assert!(t.selectors().is_empty());
    let keys: Vec<_> = t
        .ranges()
        .iter()
        .map(|r| (r.key.as_str(), r.start, r.end, r.line))
        .collect();
    assert_eq!(
        keys,
        [
            ("0-8", 0, 8, 1),
            ("8-16", 8, 16, 4),
            ("16-24", 16, 24, 7),
            ("28-32", 28, 32, 10)
        ]
    );
    let cases: &[(usize, Option<LayerTopology>)] = &[
        (0, Some(lt(Some(Q3K), Some(Cuda(0))))),
        (7, Some(lt(Some(Q3K), Some(Cuda(0))))),
        (8, Some(lt(Some(Q4K), Some(Cpu(0))))),
        (15, Some(lt(Some(Q4K), Some(Cpu(0))))),
        (16, Some(lt(Some(Q6K), None))),
        (23, Some(lt(Some(Q6K), None))),
        (24, None),
        (27, None),
        (28, Some(lt(Some(Q8_0), Some(Cuda(0))))),
        (31, Some(lt(Some(Q8_0), Some(Cuda(0))))),
        (32, None),
    ];
    for (layer, want) in cases {
        assert_eq!(t.layer(*layer).map(|r| r.entry), *want, "layer {layer}");
    }
    // Uncovered layers take the global ISQ; covered ones their range's (whole) entry.
    assert_eq!(
        t.resolve(Some(25), &["model.layers.25.mlp.up_proj.weight"], Some(Q5K)),
        lt(Some(Q5K), None)
    );
    assert_eq!(
        t.resolve(Some(20), &["model.layers.20.mlp.up_proj.weight"], Some(Q5K)),
        lt(Some(Q6K), None)
    );
    assert_eq!(
        t.resolve(None, &["model.embed_tokens.weight"], Some(Q5K)),
        lt(Some(Q5K), None)
    );
}

#[test]
fn documented_regex_example() {
    let t = parse(REGEX_EXAMPLE);
    assert!(t.ranges().is_empty());
    let sel: Vec<_> = t
        .selectors()
        .iter()
        .map(|s| (s.key.as_str(), s.regex.as_str(), s.line))
        .collect();
    assert_eq!(
        sel,
        [
            (r"/attn\.q_proj$/", r"attn\.q_proj$", 1),
            (r"/ffn_.*\.weight$/", r"ffn_.*\.weight$", 3)
        ]
    );
    let cases: &[(&[&str], Option<IsqType>)] = &[
        (&["model.layers.3.self_attn.q_proj"], Some(Q4K)),
        // `$` anchors: the `.weight` suffix keeps the first selector from matching.
        (&["model.layers.3.self_attn.q_proj.weight"], None),
        (&["blk.3.ffn_up.weight"], Some(Q3K)),
        (
            &["model.layers.3.mlp.up_proj.weight", "blk.3.ffn_up.weight"],
            Some(Q3K),
        ),
        (&["model.layers.3.mlp.up_proj.weight"], None),
        (&[], None),
    ];
    for (names, want) in cases {
        assert_eq!(
            t.selector_for(names).and_then(|s| s.entry.isq),
            *want,
            "{names:?}"
        );
    }
}

#[test]
fn resolution_rules() {
    let q = "model.layers.5.self_attn.q_proj.weight";
    // (rule, yaml, layer, names, global isq, expected)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<usize>,
        &'a [&'a str],
        Option<IsqType>,
        LayerTopology,
    );
    let cases: &[Case<'_>] = &[
        (
            "overlap: higher end wins (declared first)",
            "0-10:\n  isq: Q8_0\n0-6:\n  isq: Q2K\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q8_0), None),
        ),
        (
            "overlap: higher end wins (declared last)",
            "0-6:\n  isq: Q2K\n4-10:\n  isq: Q8_0\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q8_0), None),
        ),
        (
            "overlap: lower-end range keeps layers the other does not cover",
            "0-6:\n  isq: Q2K\n4-10:\n  isq: Q8_0\n",
            Some(3),
            &[q],
            None,
            lt(Some(Q2K), None),
        ),
        (
            "equal ends: later declared wins",
            "0-8:\n  isq: Q2K\n4-8:\n  isq: Q4K\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q4K), None),
        ),
        (
            "equal ends: later declared wins (wider one later)",
            "4-8:\n  isq: Q4K\n0-8:\n  isq: Q2K\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q2K), None),
        ),
        (
            "whole-entry replacement: missing device not inherited",
            "0-6:\n  isq: Q2K\n  device: cuda[1]\n0-10:\n  isq: Q8_0\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q8_0), None),
        ),
        (
            "whole-entry replacement: missing isq means no ISQ (not global)",
            "0-6:\n  isq: Q2K\n0-10:\n  device: cpu\n",
            Some(5),
            &[q],
            Some(Q6K),
            lt(None, Some(Cpu(0))),
        ),
        (
            "null value: covered layer with no ISQ and no device",
            "0-10:\n",
            Some(5),
            &[q],
            Some(Q6K),
            lt(None, None),
        ),
        (
            "a range ending higher beats a single layer inside it",
            "0-8:\n  isq: Q2K\n5:\n  isq: Q8_0\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q2K), None),
        ),
        (
            "a single layer declared before an equal-end range loses",
            "5:\n  isq: Q8_0\n0-6:\n  isq: Q2K\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q2K), None),
        ),
        (
            "single layer with equal end declared later wins",
            "0-6:\n  isq: Q2K\n'5':\n  isq: Q8_0\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q8_0), None),
        ),
        (
            "single layer covers only itself",
            "0-6:\n  isq: Q2K\n5:\n  isq: Q8_0\n",
            Some(6),
            &[q],
            Some(Q4_0),
            lt(Some(Q4_0), None),
        ),
        (
            "regex beats range",
            "0-10:\n  isq: Q2K\n  device: cuda[0]\n'/q_proj/':\n  isq: Q8_0\n  device: cpu\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q8_0), Some(Cpu(0))),
        ),
        (
            "regex declared before the range still beats it",
            "'/q_proj/':\n  isq: Q8_0\n0-10:\n  isq: Q2K\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q8_0), None),
        ),
        (
            "later regex wins",
            "'/q_proj/':\n  isq: Q8_0\n'/layers\\.5\\./':\n  isq: Q4K\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q4K), None),
        ),
        (
            "later regex wins only when it matches",
            "'/q_proj/':\n  isq: Q8_0\n'/layers\\.6\\./':\n  isq: Q4K\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q8_0), None),
        ),
        (
            "regex overrides only isq when it sets only isq",
            "0-10:\n  isq: Q2K\n  device: cuda[0]\n'/q_proj/':\n  isq: Q8_0\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q8_0), Some(Cuda(0))),
        ),
        (
            "regex overrides only device when it sets only device",
            "0-10:\n  isq: Q2K\n  device: cuda[0]\n'/q_proj/':\n  device: cpu[1]\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q2K), Some(Cpu(1))),
        ),
        (
            "regex on an uncovered layer overrides the global ISQ",
            "0-2:\n  isq: Q2K\n'/q_proj/':\n  isq: Q8_0\n",
            Some(5),
            &[q],
            Some(Q4K),
            lt(Some(Q8_0), None),
        ),
        (
            "regex matching a second name of the tensor",
            "'/blk\\.5\\.attn_q/':\n  isq: Q5K\n",
            Some(5),
            &[q, "blk.5.attn_q.weight"],
            None,
            lt(Some(Q5K), None),
        ),
        (
            "uncovered layer, no selector: global ISQ",
            "0-2:\n  isq: Q2K\n",
            Some(5),
            &[q],
            Some(Q4K),
            lt(Some(Q4K), None),
        ),
        (
            "regex is unanchored",
            "'/self_attn/':\n  isq: Q5_1\n",
            Some(5),
            &[q],
            None,
            lt(Some(Q5_1), None),
        ),
    ];
    for (rule, yaml, layer, names, global, want) in cases {
        let t = parse(yaml);
        assert_eq!(t.resolve(*layer, names, *global), *want, "{rule}");
    }
}

#[test]
fn layer_lookup_returns_winning_range() {
    let t = parse("0-8:\n  isq: Q2K\n4-8:\n  isq: Q4K\n2-6:\n  isq: Q6K\n");
    let cases: &[(usize, Option<&str>)] = &[
        (0, Some("0-8")),
        (2, Some("0-8")),
        (4, Some("4-8")),
        (7, Some("4-8")),
        (8, None),
        (100, None),
    ];
    for (layer, want) in cases {
        assert_eq!(
            t.layer(*layer).map(|r| r.key.as_str()),
            *want,
            "layer {layer}"
        );
    }
}

#[test]
fn key_forms() {
    let t = parse(
        "8:\n  isq: Q4K\n'9':\n  isq: Q5K\n\"10-12\":\n  isq: Q6K\n'/a/': {isq: Q2K}\n\"/b\\\\.c/\":\n  device: metal[0]\n",
    );
    let r: Vec<_> = t
        .ranges()
        .iter()
        .map(|r| (r.key.as_str(), r.start, r.end, r.line))
        .collect();
    assert_eq!(r, [("8", 8, 9, 1), ("9", 9, 10, 3), ("10-12", 10, 12, 5)]);
    let s: Vec<_> = t
        .selectors()
        .iter()
        .map(|s| (s.key.as_str(), s.regex.as_str(), s.line, s.entry))
        .collect();
    assert_eq!(
        s,
        [
            ("/a/", "a", 7, lt(Some(Q2K), None)),
            ("/b\\.c/", "b\\.c", 8, lt(None, Some(DeviceSpec::Metal(0))))
        ]
    );
}

#[test]
fn empty_and_comment_only_are_valid() {
    for text in [
        "",
        "\n\n",
        "# nothing here\n# at all\n",
        "---\n# only a comment\n",
        "~\n",
    ] {
        let t = parse(text);
        assert!(t.is_empty(), "{text:?}");
        assert!(t.layer(0).is_none());
        assert_eq!(t.resolve(Some(0), &["x"], Some(Q4K)), lt(Some(Q4K), None));
    }
    let e = Topology::empty();
    assert!(e.is_empty());
    assert_eq!(e.origin(), "<none>");
    assert!(Topology::default().is_empty());
    assert!(!parse("0-1:\n").is_empty());
}

#[test]
fn flow_style_parses_with_unknown_lines() {
    let t = parse("{0-8: {isq: Q4K}, '/x/': {device: cpu}}");
    assert_eq!(t.ranges()[0].entry, lt(Some(Q4K), None));
    assert_eq!(t.ranges()[0].line, 0);
    assert_eq!(t.selectors()[0].entry, lt(None, Some(Cpu(0))));
    let err = Topology::parse("{0-8: {isq: Q9K}}", "<inline>").unwrap_err();
    assert_eq!(err.line, None);
    assert!(
        err.to_string()
            .starts_with("<inline>: key `0-8`: unknown ISQ type `Q9K`"),
        "{err}"
    );
}

#[test]
fn comments_and_blank_lines_do_not_shift_lines() {
    let text = "---\n# header\n0-4: # first\n  # about isq\n  isq: Q4K\n\n  device: cuda[0]\n";
    let t = parse(text);
    assert_eq!(t.ranges()[0].line, 3);
    let bad = text.replace("cuda[0]", "gpu");
    let err = Topology::parse(&bad, "f.yaml").unwrap_err();
    assert_eq!(err.line, Some(7));
    assert!(
        err.to_string()
            .starts_with("f.yaml:7: key `0-4`: invalid device `gpu`"),
        "{err}"
    );
}

#[test]
fn errors() {
    let isq_names = IsqType::valid_names();
    let unknown_isq = format!("unknown ISQ type `Q3_0`; expected one of {isq_names}");
    // (yaml, expected line, expected key, substring of the kind's message)
    let cases: Vec<(&str, Option<usize>, Option<&str>, &str)> = vec![
        // YAML syntax
        (
            "0-8:\n  isq: Q4K\n device: cpu\n",
            Some(3),
            None,
            "invalid YAML: ",
        ),
        ("0-8: [\n", Some(2), None, "invalid YAML: "),
        // top level not a mapping
        (
            "# c\n- 0-8\n- 8-16\n",
            Some(2),
            None,
            "expected a mapping of layer ranges (START-END), layers (N) or regex selectors ('/.../') to {isq, device}, found a sequence",
        ),
        ("Q4K\n", Some(1), None, "found a string"),
        // value not a mapping
        (
            "0-8: Q4K\n",
            Some(1),
            Some("0-8"),
            "expected a mapping with optional `isq` and `device` fields (or nothing), found a string",
        ),
        (
            "0-4:\n  isq: Q4K\n4-8:\n  - isq: Q4K\n",
            Some(3),
            Some("4-8"),
            "found a sequence",
        ),
        // unknown field
        (
            "0-8:\n  isq: Q4K\n  isqq: Q4K\n",
            Some(3),
            Some("0-8"),
            "unknown field `isqq`; expected `isq` or `device`",
        ),
        (
            "'/x/':\n  dtype: f16\n",
            Some(2),
            Some("/x/"),
            "unknown field `dtype`; expected `isq` or `device`",
        ),
        // field not a string
        (
            "0-8:\n  isq: [Q4K]\n",
            Some(2),
            Some("0-8"),
            "field `isq` must be a string (an ISQ type name such as `Q4K`), found a sequence",
        ),
        (
            "0-8:\n  isq: Q4K\n  device: 0\n",
            Some(3),
            Some("0-8"),
            "field `device` must be a string (`cpu`, `cpu[N]`, `cuda[N]` or `metal[N]`), found a number",
        ),
        // bad keys
        (
            "x-3:\n  isq: Q4K\n",
            Some(1),
            Some("x-3"),
            "invalid key (not a layer range: START and END must be non-negative integers); expected a layer range `START-END` (e.g. `0-8`, end exclusive), a single layer `N` (e.g. `8`) or a regex selector `'/PATTERN/'`",
        ),
        (
            "0-4:\nabc:\n  isq: Q4K\n",
            Some(2),
            Some("abc"),
            "invalid key (not a layer number, layer range or regex selector); expected a layer range `START-END`",
        ),
        (
            "-3:\n  isq: Q4K\n",
            Some(1),
            Some("-3"),
            "invalid key (layer numbers cannot be negative); expected",
        ),
        (
            "'-3':\n  isq: Q4K\n",
            Some(1),
            Some("-3"),
            "invalid key (not a layer range",
        ),
        (
            "1-2-3:\n  isq: Q4K\n",
            Some(1),
            Some("1-2-3"),
            "invalid key (not a layer range",
        ),
        (
            "'':\n  isq: Q4K\n",
            Some(1),
            Some(""),
            "invalid key (empty key); expected",
        ),
        (
            "'//':\n  isq: Q4K\n",
            Some(1),
            Some("//"),
            "invalid key (empty regex selector); expected",
        ),
        (
            "'/':\n  isq: Q4K\n",
            Some(1),
            Some("/"),
            "invalid key (a regex selector must start and end with `/`)",
        ),
        (
            "'/abc':\n  isq: Q4K\n",
            Some(1),
            Some("/abc"),
            "invalid key (a regex selector must start and end with `/`)",
        ),
        (
            "1.5:\n  isq: Q4K\n",
            Some(1),
            Some("1.5"),
            "invalid key (a layer number must be a whole number)",
        ),
        (
            "true:\n  isq: Q4K\n",
            Some(1),
            Some("true"),
            "invalid key (found a boolean)",
        ),
        (
            "99999999999999999999999-2:\n",
            Some(1),
            Some("99999999999999999999999-2"),
            "is too large",
        ),
        // reversed / empty range
        (
            "0-4:\n  isq: Q4K\n8-4:\n  isq: Q4K\n",
            Some(3),
            Some("8-4"),
            "range end must be greater than start (START-END: start inclusive, end exclusive)",
        ),
        (
            "4-4:\n",
            Some(1),
            Some("4-4"),
            "range end must be greater than start",
        ),
        // unknown ISQ / invalid device
        (
            "0-8:\n  device: cpu\n  isq: Q3_0\n",
            Some(3),
            Some("0-8"),
            &unknown_isq,
        ),
        (
            "0-8:\n  isq: Q4K\n  device: gpu[0]\n",
            Some(3),
            Some("0-8"),
            "invalid device `gpu[0]`; expected `cpu`, `cpu[N]`, `cuda[N]` or `metal[N]`",
        ),
        // invalid regex
        (
            "'/a(b/':\n  isq: Q4K\n",
            Some(1),
            Some("/a(b/"),
            "invalid regex selector: regex parse error",
        ),
        (
            "'/a(b/':\n  isq: Q4K\n",
            Some(1),
            Some("/a(b/"),
            "unclosed group",
        ),
        // duplicates that serde_yaml lets through
        (
            "8:\n  isq: Q4K\n'8':\n  isq: Q5K\n",
            Some(3),
            Some("8"),
            "duplicate key; first defined on line 1",
        ),
        (
            "8-9:\n  isq: Q4K\n# c\n8:\n  isq: Q5K\n",
            Some(4),
            Some("8"),
            "duplicate key; first defined on line 1 (as `8-9`)",
        ),
        (
            "'/a/':\n  isq: Q4K\n\"/a/\":\n  isq: Q5K\n",
            Some(3),
            Some("/a/"),
            "duplicate key; first defined on line 1",
        ),
        // exact duplicates, which serde_yaml itself rejects
        (
            "0-8:\n  isq: Q4K\n8-16:\n  isq: Q4K\n0-8:\n  isq: Q5K\n",
            Some(5),
            Some("0-8"),
            "duplicate key; first defined on line 1",
        ),
        (
            "'/a/':\n  isq: Q4K\n'/a/':\n  isq: Q5K\n",
            Some(3),
            Some("/a/"),
            "duplicate key; first defined on line 1",
        ),
        (
            "0-8:\n  isq: Q4K\n  isq: Q5K\n",
            Some(3),
            Some("0-8"),
            "duplicate field `isq`; first defined on line 2",
        ),
    ];
    for (yaml, line, key, msg) in cases {
        let err = match Topology::parse(yaml, "topo.yaml") {
            Ok(t) => panic!("expected an error for {yaml:?}, got {t:?}"),
            Err(e) => e,
        };
        let shown = err.to_string();
        assert_eq!(err.line, line, "{yaml:?}: {shown}");
        assert_eq!(err.key.as_deref(), key, "{yaml:?}: {shown}");
        assert!(err.kind.to_string().contains(msg), "{yaml:?}: {shown}");
        let prefix = match (line, key) {
            (Some(l), Some(k)) => format!("topo.yaml:{l}: key `{k}`: "),
            (Some(l), None) => format!("topo.yaml:{l}: "),
            (None, Some(k)) => format!("topo.yaml: key `{k}`: "),
            (None, None) => "topo.yaml: ".to_string(),
        };
        assert!(shown.starts_with(&prefix), "{yaml:?}: {shown}");
    }
}

#[test]
fn error_kinds_are_matchable() {
    let kind = |yaml: &str| Topology::parse(yaml, "t").map(|_| ()).unwrap_err().kind;
    assert!(matches!(
        kind("8-4:\n"),
        TopologyErrorKind::EmptyRange { start: 8, end: 4 }
    ));
    assert!(
        matches!(kind("0-1:\n  isq: Q9\n"), TopologyErrorKind::UnknownIsq(UnknownIsq { given }) if given == "Q9")
    );
    assert!(
        matches!(kind("0-1:\n  device: x\n"), TopologyErrorKind::InvalidDevice(InvalidDevice { given }) if given == "x")
    );
    assert!(matches!(kind("0-1: [\n"), TopologyErrorKind::Yaml { .. }));
}

#[test]
fn from_file_reads_and_errors_carry_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, RANGES_EXAMPLE).unwrap();
    let t = Topology::from_file(&good).unwrap();
    assert_eq!(t.origin(), good.display().to_string());
    assert_eq!(t.ranges().len(), 4);

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "0-8:\n  isq: Q4K\n8-16:\n  isqq: Q4K\n").unwrap();
    let err = Topology::from_file(&bad).unwrap_err();
    assert_eq!(err.origin, bad.display().to_string());
    assert_eq!(
        err.to_string(),
        format!(
            "{}:4: key `8-16`: unknown field `isqq`; expected `isq` or `device`",
            bad.display()
        )
    );

    let missing = dir.path().join("missing.yaml");
    let err = Topology::from_file(&missing).unwrap_err();
    assert!(matches!(err.kind, TopologyErrorKind::Io(_)));
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}: cannot read topology file: ",
            missing.display()
        )),
        "{shown}"
    );
}

fn tensors(names: &[&[&str]]) -> Vec<Vec<String>> {
    names
        .iter()
        .map(|n| n.iter().map(|s| s.to_string()).collect())
        .collect()
}

#[test]
fn validate_against_a_model() {
    let model = tensors(&[
        &["model.embed_tokens.weight", "token_embd.weight"],
        &[
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
        ],
        &["model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"],
    ]);
    let ok = parse("0-30:\n  isq: Q4K\n'/ffn_up/':\n  isq: Q8_0\n");
    assert!(ok.validate(30, &model).is_ok());
    assert!(parse(RANGES_EXAMPLE).validate(32, &model).is_ok());

    // (yaml, n_layers, expected full message)
    let cases: &[(&str, usize, &str)] = &[
        (
            RANGES_EXAMPLE,
            30,
            "<inline>:10: key `28-32`: range `28-32` ends past the model's 30 layers (0-29)",
        ),
        (
            "0-4:\n  isq: Q4K\n4:\n  isq: Q5K\n",
            4,
            "<inline>:3: key `4`: layer `4` ends past the model's 4 layers (0-3)",
        ),
        (
            "0-2:\n",
            1,
            "<inline>:1: key `0-2`: range `0-2` ends past the model's 1 layer (0-0)",
        ),
        (
            "0-4:\n'/attn_q/':\n  isq: Q4K\n'/lm_head/':\n  isq: Q8_0\n",
            30,
            "<inline>:4: key `/lm_head/`: regex selector matches no tensor of the model (checked 3 tensors, named like `model.embed_tokens.weight`)",
        ),
        (
            REGEX_EXAMPLE,
            30,
            "<inline>:1: key `/attn\\.q_proj$/`: regex selector matches no tensor of the model",
        ),
    ];
    for (yaml, n_layers, want) in cases {
        let err = parse(yaml).validate(*n_layers, &model).unwrap_err();
        assert!(err.to_string().starts_with(want), "{}\nwant {want}", err);
    }
    let err = parse("'/x/':\n").validate(1, &[]).unwrap_err();
    assert!(matches!(
        err.kind,
        TopologyErrorKind::SelectorMatchesNothing {
            n_tensors: 0,
            example: None
        }
    ));
}

#[test]
fn locator_reads_quoted_and_plain_keys() {
    let cases: &[(&str, Option<(&str, bool)>)] = &[
        ("0-8:", Some(("0-8", false))),
        ("0-8: # c", Some(("0-8", false))),
        ("0-8 : {isq: Q4K}", Some(("0-8", false))),
        ("'/a''b/':", Some(("/a'b/", true))),
        ("\"/a\\\\.b\\\"/\":", Some(("/a\\.b\"/", true))),
        ("'/a:b/': x", Some(("/a:b/", true))),
        ("{0-8: {}}", None),
        ("- a: b", None),
        ("abc", None),
        ("a:b", None),
    ];
    for (line, want) in cases {
        let got = scan_key(line);
        assert_eq!(
            got.as_ref().map(|(k, q)| (k.as_str(), *q)),
            *want,
            "{line:?}"
        );
    }
}
