//! The load plan: what a topology and `--isq` mean for one concrete model. For every tensor use
//! it fixes the ISQ type actually applied (after block-size fallbacks), the device and the byte
//! cost; and it fixes the pipeline route, the ordered runs of layers per device.

use std::fmt::Write as _;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::device::DeviceSpec;
use crate::ggml::GgmlType;
use crate::isq::IsqType;
use crate::meta::{ModelMeta, TensorMeta};
use crate::names::TensorRole;
use crate::topology::{SelectorEntry, Topology, TopologyError};

/// A float type weights may be converted to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "f32",
            FloatType::F16 => "f16",
            FloatType::BF16 => "bf16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
        }
    }
}

impl FromStr for FloatType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(FloatType::F32),
            "f16" | "float16" => Ok(FloatType::F16),
            "bf16" | "bfloat16" => Ok(FloatType::BF16),
            _ => Err(format!("unknown dtype `{s}`; expected f32, f16 or bf16")),
        }
    }
}

/// Inputs of a plan besides the model and the topology.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// `--isq`: applies to the linear weights of layers no topology range covers.
    pub isq: Option<IsqType>,
    /// `--dtype`: converts every weight without ISQ to this type at load (default: as stored).
    pub dtype: Option<FloatType>,
    /// Device of layers the topology gives none.
    pub default_device: DeviceSpec,
}

/// How one tensor use is loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorPlan {
    /// Canonical name of this use (`lm_head.weight` even when tied).
    pub name: String,
    /// Canonical name of the stored tensor it reads (`model.embed_tokens.weight` for a tied head).
    pub source: String,
    pub shape: Vec<usize>,
    pub stored: GgmlType,
    /// The ISQ type the topology / `--isq` asked for.
    pub requested: Option<IsqType>,
    /// The ISQ type applied (differs from `requested` after a block-size fallback).
    pub isq: Option<IsqType>,
    /// Float conversion for a weight without ISQ.
    pub dtype: Option<FloatType>,
    /// Why `requested` is what it is: `--isq`, `range 0-8 (line 1)`, `selector /q_proj/ (line 5)`.
    pub reason: String,
    /// Fallbacks and other remarks.
    pub note: Option<String>,
    pub device: DeviceSpec,
    /// Index of the route stage that loads it.
    pub stage: usize,
    pub bytes_stored: u64,
    pub bytes_loaded: u64,
}

/// One stage of the pipeline route: a run of consecutive layers on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    pub index: usize,
    pub device: DeviceSpec,
    /// Layers `[start, end)`; may be empty for a stage holding only the embedding or the head.
    pub layer_start: usize,
    pub layer_end: usize,
    /// Embeds token ids (the first stage).
    pub embed: bool,
    /// Applies the final norm and the output head and samples (the last stage).
    pub head: bool,
}

/// A resolved plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub tensors: Vec<TensorPlan>,
    pub route: Vec<StagePlan>,
    /// Distinct devices in route order: one worker process each.
    pub devices: Vec<DeviceSpec>,
}

/// A plan that cannot be made; says where in the topology the problem is.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Model(#[from] crate::error::ModelError),
    #[error("{origin}:{line}: key `{key}`: {message}")]
    Conflict {
        origin: String,
        line: usize,
        key: String,
        message: String,
    },
}

/// A field's value and where it came from.
struct Resolved<T> {
    value: T,
    reason: String,
}

impl Plan {
    /// Resolves `topology` and `opts` against `meta`.
    pub fn resolve(
        meta: &ModelMeta,
        topology: &Topology,
        opts: &PlanOptions,
    ) -> Result<Plan, PlanError> {
        let n_layers = meta.config.num_layers;
        let tied = meta.tied_head();
        let mut names: Vec<Vec<String>> = meta.tensors.values().map(TensorMeta::names).collect();
        if tied {
            names.push(vec!["lm_head.weight".into(), "output.weight".into()]);
        }
        topology.validate(n_layers, &names)?;

        let uses = tensor_uses(meta)?;
        let layer_device = layer_devices(topology, opts, &uses, n_layers)?;
        let first_dev = layer_device
            .first()
            .map_or(opts.default_device, |d| d.value);
        let last_dev = layer_device.last().map_or(opts.default_device, |d| d.value);
        let mut embed = EdgeDevice::new(first_dev);
        let mut head = EdgeDevice::new(last_dev);

        let mut plans = Vec::with_capacity(uses.len());
        for (role, t) in &uses {
            let use_names = use_names(*role, t);
            let name_refs: Vec<&str> = use_names.iter().map(String::as_str).collect();
            let selector = topology.selector_for(&name_refs);
            let device = match role.layer() {
                Some(i) => layer_device[i].value,
                None if *role == TensorRole::Embedding => {
                    embed.place(topology, selector, &use_names[0])?
                }
                None => head.place(topology, selector, &use_names[0])?,
            };
            plans.push(tensor_plan(
                topology,
                opts,
                *role,
                t,
                selector,
                &use_names[0],
                device,
            ));
        }

        let route = build_route(embed.device(), &layer_device, head.device());
        for p in &mut plans {
            let role = TensorRole::from_hf_name(&p.name).unwrap_or(TensorRole::LmHead);
            p.stage = stage_of(&route, role);
        }
        share_tied_head(&mut plans);
        let mut devices = Vec::new();
        for s in &route {
            if !devices.contains(&s.device) {
                devices.push(s.device);
            }
        }
        Ok(Plan {
            tensors: plans,
            route,
            devices,
        })
    }

    /// One line per kind of block-size fallback, with how many tensors took it, e.g.
    /// `Q4K → Q5_0 on 180 tensors (576-wide rows do not split into Q4K's 256-wide blocks)`.
    pub fn fallbacks(&self) -> Vec<String> {
        let mut seen: Vec<(IsqType, IsqType, usize, usize)> = Vec::new();
        for t in &self.tensors {
            if let (Some(req), Some(got)) = (t.requested, t.isq)
                && req != got
            {
                let cols = t.shape.last().copied().unwrap_or(0);
                match seen
                    .iter_mut()
                    .find(|s| s.0 == req && s.1 == got && s.3 == cols)
                {
                    Some(s) => s.2 += 1,
                    None => seen.push((req, got, 1, cols)),
                }
            }
        }
        seen.into_iter()
            .map(|(req, got, n, cols)| {
                format!(
                    "{req} → {got} on {n} tensor{} ({cols}-wide rows do not split into {req}'s {}-wide blocks)",
                    if n == 1 { "" } else { "s" },
                    req.block_size()
                )
            })
            .collect()
    }

    /// The tensor uses stage `index` loads.
    pub fn stage_tensors(&self, index: usize) -> impl Iterator<Item = &TensorPlan> {
        self.tensors.iter().filter(move |t| t.stage == index)
    }

    /// Bytes a stage holds after loading.
    pub fn stage_bytes(&self, index: usize) -> u64 {
        self.stage_tensors(index).map(|t| t.bytes_loaded).sum()
    }

    /// A human-readable table: the route, then every tensor.
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "route ({} stages, {} workers):",
            self.route.len(),
            self.devices.len()
        );
        for s in &self.route {
            let mut what = Vec::new();
            if s.embed {
                what.push("embedding".to_string());
            }
            if s.layer_end > s.layer_start {
                what.push(format!("layers {}-{}", s.layer_start, s.layer_end));
            }
            if s.head {
                what.push("norm + head".to_string());
            }
            let _ = writeln!(
                out,
                "  stage {:>2}  {:<9} {:<36} {:>9.2} MiB",
                s.index,
                s.device.to_string(),
                what.join(", "),
                mib(self.stage_bytes(s.index))
            );
        }
        let _ = writeln!(out);
        let w = self
            .tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let _ = writeln!(
            out,
            "{:<w$} {:<12} {:<6} {:<6} {:<9} {:>5} {:>9} {:>9}  why / note",
            "tensor", "shape", "stored", "isq", "device", "stage", "MiB in", "MiB out"
        );
        for t in &self.tensors {
            let shape = t
                .shape
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("x");
            let isq = match (t.isq, t.dtype) {
                (Some(q), _) => q.to_string(),
                (None, Some(f)) => f.name().to_string(),
                (None, None) => "-".to_string(),
            };
            let mut why = t.reason.clone();
            if t.source != t.name {
                why = format!(
                    "tied: reads {}{}{why}",
                    t.source,
                    if why.is_empty() { "" } else { "; " }
                );
            }
            if let Some(n) = &t.note {
                why = if why.is_empty() {
                    n.clone()
                } else {
                    format!("{why}; {n}")
                };
            }
            let _ = writeln!(
                out,
                "{:<w$} {:<12} {:<6} {:<6} {:<9} {:>5} {:>9.3} {:>9.3}  {}",
                t.name,
                shape,
                t.stored.to_string(),
                isq,
                t.device.to_string(),
                t.stage,
                mib(t.bytes_stored),
                mib(t.bytes_loaded),
                why
            );
        }
        let before: u64 = self.tensors.iter().map(|t| t.bytes_stored).sum();
        let after: u64 = self.tensors.iter().map(|t| t.bytes_loaded).sum();
        let _ = writeln!(
            out,
            "\ntotal: {:.2} MiB stored, {:.2} MiB loaded",
            mib(before),
            mib(after)
        );
        out
    }
}

/// Uses of stored tensors, in route order: embedding, layers, final norm, head (a tied head
/// is a second use of the embedding).
fn tensor_uses(meta: &ModelMeta) -> Result<Vec<(TensorRole, &TensorMeta)>, PlanError> {
    let tied = meta.tied_head();
    let mut uses: Vec<(TensorRole, &TensorMeta)> = meta
        .tensors
        .iter()
        .filter(|(role, _)| {
            **role != TensorRole::RopeFreqs && !(tied && **role == TensorRole::LmHead)
        })
        .map(|(role, t)| (*role, t))
        .collect();
    if tied {
        uses.push((TensorRole::LmHead, meta.require(TensorRole::Embedding)?));
    }
    let rank = |r: TensorRole| match r {
        TensorRole::Embedding => (0, 0, None),
        TensorRole::Layer(i, t) => (1, i, Some(t)),
        TensorRole::FinalNorm => (2, 0, None),
        _ => (3, 0, None),
    };
    uses.sort_by_key(|(role, _)| rank(*role));
    Ok(uses)
}

/// Each layer's device: its winning range's (or the default), unless selectors move the whole
/// layer. `uses` is in route order, so each layer's tensors are adjacent.
fn layer_devices(
    topology: &Topology,
    opts: &PlanOptions,
    uses: &[(TensorRole, &TensorMeta)],
    n_layers: usize,
) -> Result<Vec<Resolved<DeviceSpec>>, PlanError> {
    let mut layer_device: Vec<Resolved<DeviceSpec>> = (0..n_layers)
        .map(|i| match topology.layer(i) {
            Some(r) => Resolved {
                value: r.entry.device.unwrap_or(opts.default_device),
                reason: format!("range {} (line {})", r.key, r.line),
            },
            None => Resolved {
                value: opts.default_device,
                reason: "default device".into(),
            },
        })
        .collect();
    for group in uses.chunk_by(|a, b| a.0.layer() == b.0.layer()) {
        if let Some(i) = group.first().and_then(|(role, _)| role.layer())
            && let Some(layer) = layer_device.get_mut(i)
            && let Some(d) = selected_layer_device(topology, group, layer)?
        {
            *layer = d;
        }
    }
    Ok(layer_device)
}

/// The device of the embedding, or of the final norm and the head (which share one): the
/// first (last) layer's by default, or a selector's.
struct EdgeDevice {
    default: DeviceSpec,
    /// The device placed so far, and the selector (line, key) that chose it, if one did.
    placed: Option<(DeviceSpec, Option<(usize, String)>)>,
}

impl EdgeDevice {
    fn new(default: DeviceSpec) -> Self {
        EdgeDevice {
            default,
            placed: None,
        }
    }

    fn device(&self) -> DeviceSpec {
        self.placed.as_ref().map_or(self.default, |p| p.0)
    }

    /// Places one tensor use (`name`), whose last matching selector is `selector`; every use
    /// must land on the same device.
    fn place(
        &mut self,
        topology: &Topology,
        selector: Option<&SelectorEntry>,
        name: &str,
    ) -> Result<DeviceSpec, PlanError> {
        let (d, by) = match selector.and_then(|s| s.entry.device.map(|d| (d, s))) {
            Some((d, s)) => (d, Some((s.line, s.key.clone()))),
            None => (self.default, None),
        };
        if let Some((prev, prev_by)) = &self.placed
            && *prev != d
        {
            // Point at whichever selector split the head: this tensor's, or the one that
            // placed the rest of it. (Without selectors both take the same default device, so
            // one of the two is always set.)
            let (line, key) = by.or_else(|| prev_by.clone()).unwrap_or_default();
            let other = match prev_by {
                Some((l, k)) => format!(" (selector {k}, line {l})"),
                None => String::new(),
            };
            return Err(PlanError::Conflict {
                origin: topology.origin().to_string(),
                line,
                key,
                message: format!(
                    "puts `{name}` on {d}, but the rest of the output head is on {prev}{other}; the final norm and the head share one device"
                ),
            });
        }
        self.placed = Some((d, by));
        Ok(d)
    }
}

/// The ISQ type a use asks for and why: its layer's winning range (or `--isq` for an uncovered
/// layer's linear weights), overridden by a selector for matrices.
fn requested_isq(
    topology: &Topology,
    opts: &PlanOptions,
    role: TensorRole,
    t: &TensorMeta,
    selector: Option<&SelectorEntry>,
) -> (Resolved<Option<IsqType>>, Option<String>) {
    let base: Resolved<Option<IsqType>> = match role {
        TensorRole::Layer(i, lt) if lt.is_linear_weight() => match topology.layer(i) {
            Some(r) => Resolved {
                value: r.entry.isq,
                reason: format!("range {} (line {})", r.key, r.line),
            },
            None => Resolved {
                value: opts.isq,
                reason: if opts.isq.is_some() {
                    "--isq".into()
                } else {
                    String::new()
                },
            },
        },
        _ => Resolved {
            value: None,
            reason: String::new(),
        },
    };
    match selector.and_then(|s| s.entry.isq.map(|q| (q, s))) {
        Some((q, s)) if t.shape.len() == 2 => (
            Resolved {
                value: Some(q),
                reason: format!("selector {} (line {})", s.key, s.line),
            },
            None,
        ),
        Some((_, s)) => (
            base,
            Some(format!(
                "selector {} names an ISQ type, but 1-D tensors stay as stored",
                s.key
            )),
        ),
        None => (base, None),
    }
}

/// The ISQ type applied for a request: none when the tensor is already stored so, the nearest
/// type whose blocks fit its rows otherwise; with a note when it differs.
fn applied_isq(requested: Option<IsqType>, t: &TensorMeta) -> (Option<IsqType>, Option<String>) {
    let cols = t.shape.last().copied().unwrap_or(0);
    match requested {
        Some(q) if q.ggml() == Some(t.dtype) => {
            (None, Some(format!("already stored as {q}: kept as stored")))
        }
        Some(q) => match q.resolve_for(cols) {
            Some(actual) if actual != q => (
                Some(actual),
                Some(format!(
                    "{cols}-wide rows do not split into {q}'s {}-wide blocks: using {actual}",
                    q.block_size()
                )),
            ),
            Some(actual) => (Some(actual), None),
            None => (
                None,
                Some(format!("no ISQ type fits {cols}-wide rows: kept as stored")),
            ),
        },
        None => (None, None),
    }
}

/// How one use of `t` is loaded on `device` (its stage is set once the route is known).
fn tensor_plan(
    topology: &Topology,
    opts: &PlanOptions,
    role: TensorRole,
    t: &TensorMeta,
    selector: Option<&SelectorEntry>,
    name: &str,
    device: DeviceSpec,
) -> TensorPlan {
    let (requested, selector_note) = requested_isq(topology, opts, role, t, selector);
    let (isq, isq_note) = applied_isq(requested.value, t);
    let dtype = if isq.is_none() && requested.value.is_none_or(|q| q.ggml() != Some(t.dtype)) {
        opts.dtype
    } else {
        None
    };
    let cols = t.shape.last().copied().unwrap_or(0);
    let rows = t.numel() / cols.max(1);
    let bytes_loaded = match (isq, dtype) {
        (Some(q), _) => q.storage_bytes(rows, cols).unwrap_or(0) as u64,
        (None, Some(f)) => (t.numel() * f.size()) as u64,
        (None, None) => t.n_bytes,
    };
    TensorPlan {
        name: name.to_string(),
        source: t.name.clone(),
        shape: t.shape.clone(),
        stored: t.dtype,
        requested: requested.value,
        isq,
        dtype,
        reason: requested.reason,
        note: isq_note.or(selector_note),
        device,
        stage: 0,
        bytes_stored: t.n_bytes,
        bytes_loaded,
    }
}

/// The route: consecutive units (embedding, each layer, head) on one device merge into a stage.
fn build_route(
    embed_device: DeviceSpec,
    layer_device: &[Resolved<DeviceSpec>],
    head_device: DeviceSpec,
) -> Vec<StagePlan> {
    let mut route: Vec<StagePlan> = Vec::new();
    let mut push = |device: DeviceSpec, layer: Option<usize>, embed: bool, head: bool| match route
        .last_mut()
    {
        Some(s) if s.device == device => {
            if let Some(i) = layer {
                s.layer_end = i + 1;
            }
            s.head |= head;
        }
        _ => {
            let start = layer.unwrap_or_else(|| route.last().map_or(0, |s| s.layer_end));
            route.push(StagePlan {
                index: route.len(),
                device,
                layer_start: start,
                layer_end: layer.map_or(start, |i| i + 1),
                embed,
                head,
            });
        }
    };
    push(embed_device, None, true, false);
    for (i, d) in layer_device.iter().enumerate() {
        push(d.value, Some(i), false, false);
    }
    push(head_device, None, false, true);
    route
}

/// A tied head loaded by the embedding's stage, the same way, shares its weights: it costs no
/// memory of its own (as the worker loads it).
fn share_tied_head(plans: &mut [TensorPlan]) {
    let embedding = plans
        .iter()
        .find(|p| p.name == TensorRole::Embedding.hf_name())
        .map(|e| (e.source.clone(), e.stage, e.isq, e.dtype));
    if let Some((source, stage, isq, dtype)) = embedding
        && let Some(head) = plans.iter_mut().find(|p| {
            p.name == TensorRole::LmHead.hf_name()
                && p.source == source
                && p.stage == stage
                && p.isq == isq
                && p.dtype == dtype
        })
    {
        head.bytes_loaded = 0;
        let shared = "shares the embedding's weights (same stage, same type)".to_string();
        head.note = Some(match head.note.take() {
            Some(n) => format!("{n}; {shared}"),
            None => shared,
        });
    }
}

/// The device selectors give the layer whose tensor uses are `uses`, if any selector names a
/// device for one of them. Every tensor of the layer must then end up on that device: the
/// selectors must move all of them (or the range already puts the layer there).
fn selected_layer_device(
    topology: &Topology,
    uses: &[(TensorRole, &TensorMeta)],
    layer: &Resolved<DeviceSpec>,
) -> Result<Option<Resolved<DeviceSpec>>, PlanError> {
    let conflict = |s: &SelectorEntry, message: String| PlanError::Conflict {
        origin: topology.origin().to_string(),
        line: s.line,
        key: s.key.clone(),
        message,
    };
    let mut moved: Option<(DeviceSpec, &SelectorEntry, String)> = None;
    let mut unmoved: Option<String> = None;
    for (role, t) in uses {
        let names = use_names(*role, t);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let name = names.first().cloned().unwrap_or_default();
        match topology
            .selector_for(&refs)
            .and_then(|s| s.entry.device.map(|d| (d, s)))
        {
            Some((d, s)) => match &moved {
                Some((prev, prev_s, prev_name)) if *prev != d => {
                    return Err(conflict(
                        s,
                        format!(
                            "puts `{name}` on {d}, but selector {} (line {}) puts `{prev_name}` of the same layer on {prev}; a layer's tensors share one device",
                            prev_s.key, prev_s.line
                        ),
                    ));
                }
                Some(_) => {}
                None => moved = Some((d, s, name)),
            },
            None => {
                unmoved.get_or_insert(name);
            }
        }
    }
    let Some((d, s, name)) = moved else {
        return Ok(None);
    };
    if d != layer.value
        && let Some(other) = unmoved
    {
        return Err(conflict(
            s,
            format!(
                "puts `{name}` on {d}, but `{other}` of the same layer stays on {} ({}); a layer's tensors share one device: select all of them, or move the whole layer with a range key",
                layer.value, layer.reason
            ),
        ));
    }
    Ok(Some(Resolved {
        value: d,
        reason: format!("selector {} (line {})", s.key, s.line),
    }))
}

/// The names a selector matches for one use of `t`.
fn use_names(role: TensorRole, t: &TensorMeta) -> Vec<String> {
    if role == TensorRole::LmHead && t.role == TensorRole::Embedding {
        return vec!["lm_head.weight".into(), "output.weight".into()];
    }
    t.names()
}

/// The stage that loads a use with `role`.
fn stage_of(route: &[StagePlan], role: TensorRole) -> usize {
    let find = |pred: &dyn Fn(&StagePlan) -> bool| route.iter().position(pred).unwrap_or(0);
    match role {
        TensorRole::Embedding => find(&|s| s.embed),
        TensorRole::FinalNorm | TensorRole::LmHead => find(&|s| s.head),
        TensorRole::Layer(i, _) => find(&|s| (s.layer_start..s.layer_end).contains(&i)),
        TensorRole::RopeFreqs => 0,
    }
}
