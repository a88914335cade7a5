use strata_shared::isq::IsqType;
use strata_shared::meta::ModelMeta;
use strata_shared::plan::{FloatType, Plan, PlanOptions};
use strata_shared::source::{ModelFiles, fetch_default_model};
use strata_shared::topology::Topology;
use strata_worker::Engine;

#[test]
fn scratch() {
    let ids: Vec<u32> = serde_json::from_str(&std::fs::read_to_string("/tmp/ppl_ids.json").unwrap()).unwrap();
    let path = fetch_default_model().unwrap();
    let meta = ModelMeta::open(ModelFiles::resolve(path.to_str().unwrap(), None).unwrap()).unwrap();
    let types: Vec<Option<IsqType>> = std::env::var("TYPES").unwrap_or_default().split(',').filter(|s| !s.is_empty()).map(|s| if s == "f32" { None } else { Some(s.parse().unwrap()) }).collect();
    for isq in types {
        let opts = PlanOptions { isq, dtype: Some(FloatType::F32), ..Default::default() };
        let plan = Plan::resolve(&meta, &Topology::empty(), &opts).unwrap();
        let t0 = std::time::Instant::now();
        let mut e = Engine::load(&meta, &plan, 128, &mut |_, _, _| {}).unwrap();
        let t1 = t0.elapsed();
        let nll = e.token_nll(&ids).unwrap();
        let ppl = (nll.iter().sum::<f64>() / nll.len() as f64).exp();
        eprintln!("{:?}: ppl {ppl:.4} load {t1:?} eval {:?} bytes {}", isq, t0.elapsed() - t1, e.weight_bytes());
    }
}
