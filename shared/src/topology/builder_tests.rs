//! The builder: topologies made in code behave as their YAML form, with the same errors.

use super::*;
use crate::device::DeviceSpec::{Cpu, Cuda};
use crate::isq::IsqType::*;

fn lt(isq: Option<IsqType>, device: Option<DeviceSpec>) -> LayerTopology {
    LayerTopology { isq, device }
}

fn parse(text: &str) -> Topology {
    Topology::parse(text, "<inline>").unwrap()
}

#[test]
fn the_builder_makes_what_the_yaml_says() {
    let built = Topology::empty()
        .with_range(0..8, lt(Some(Q3K), Some(Cuda(0))))
        .with_selector(r"attn\.q_proj$", lt(Some(Q4K), None))
        .with_range(8..16, lt(Some(Q4K), Some(Cpu(0))))
        .with_layer(20, LayerTopology::default())
        .with_range(16..24, lt(Some(Q6K), None))
        .build()
        .unwrap();
    let yaml = built.to_yaml().unwrap();
    assert_eq!(
        yaml,
        "0-8:\n  isq: Q3K\n  device: cuda[0]\n8-16:\n  isq: Q4K\n  device: cpu[0]\n20:\n16-24:\n  isq: Q6K\n'/attn\\.q_proj$/':\n  isq: Q4K\n"
    );
    let parsed = parse(&yaml);
    assert_eq!(built.ranges(), parsed.ranges(), "same entries, same lines");
    let sel = |t: &Topology| {
        t.selectors()
            .iter()
            .map(|s| (s.key.clone(), s.entry, s.line))
            .collect::<Vec<_>>()
    };
    assert_eq!(sel(&built), sel(&parsed));
    assert_eq!(built.origin(), "<code>");
    for layer in 0..30 {
        let names = [format!("model.layers.{layer}.self_attn.q_proj.weight")];
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(
            built.resolve(Some(layer), &names, Some(Q8_0)),
            parsed.resolve(Some(layer), &names, Some(Q8_0)),
            "layer {layer}"
        );
    }
    // A quote in a pattern survives the round trip.
    let quoted = Topology::empty()
        .with_selector("it's", LayerTopology::default())
        .build()
        .unwrap();
    let back = parse(&quoted.to_yaml().unwrap());
    assert_eq!(back.selectors()[0].regex.as_str(), "it's");
}

#[test]
#[allow(clippy::reversed_empty_ranges)] // an empty range is one of the mistakes under test
fn builder_errors_are_the_yaml_errors() {
    let q4 = lt(Some(Q4K), None);
    let none = LayerTopology::default();
    let cases = [
        (Topology::empty().with_range(8..4, q4), "8-4:\n  isq: Q4K\n"),
        (
            Topology::empty()
                .with_range(0..8, q4)
                .with_range(0..8, none),
            "0-8:\n  isq: Q4K\n0-8:\n",
        ),
        (
            Topology::empty().with_layer(8, q4).with_range(8..9, q4),
            "8:\n  isq: Q4K\n8-9:\n  isq: Q4K\n",
        ),
        (
            Topology::empty()
                .with_selector("a", q4)
                .with_range(0..2, none)
                .with_selector("a", none),
            "0-2:\n'/a/':\n  isq: Q4K\n'/a/':\n",
        ),
        (
            Topology::empty().with_selector("(", q4),
            "'/(/':\n  isq: Q4K\n",
        ),
        (
            Topology::empty().with_selector("", q4),
            "'//':\n  isq: Q4K\n",
        ),
    ];
    for (built, yaml) in cases {
        let from_code = built.clone().build().unwrap_err();
        let from_yaml = Topology::parse(yaml, "<code>").unwrap_err();
        assert_eq!(from_code.to_string(), from_yaml.to_string(), "{yaml}");
        assert_eq!(from_code.line, from_yaml.line, "{yaml}");
        // The mistake stays with the topology: every later use reports it.
        assert_eq!(
            built.to_yaml().unwrap_err().to_string(),
            from_yaml.to_string()
        );
        assert_eq!(
            built.validate(30, &[]).unwrap_err().to_string(),
            from_yaml.to_string()
        );
        // Later calls keep the first mistake.
        let more = built.with_range(0..1, q4).build().unwrap_err();
        assert_eq!(more.to_string(), from_yaml.to_string());
    }
    // Validation against a model is the same too.
    let past = Topology::empty().with_range(25..31, q4).build().unwrap();
    let yaml = Topology::parse("25-31:\n  isq: Q4K\n", "<code>").unwrap();
    assert_eq!(
        past.validate(30, &[]).unwrap_err().to_string(),
        yaml.validate(30, &[]).unwrap_err().to_string()
    );
}
