//! Splicing and steering against the fixtures' reference (TransformerLens hooks, float32):
//! every mode and strength on stories260K layer 2 and tiny-gpt2 layer 1. Centred final logits
//! within 2e-4, greedy continuations equal, encoder outputs within 1e-4.

mod common;

use std::sync::Arc;

use candle_core::{safetensors, Device, Tensor};
use neurosteer::generate::{generate, GenerateOptions};
use neurosteer::hooks::Hooks;
use neurosteer::model::{LoadOptions, LogitsAt, Model};
use neurosteer::transcoder::splice::{SteerMode, Steering};
use neurosteer::transcoder::Transcoder;

fn hooks_for(tc: &Arc<Transcoder>, features: &[usize], mode: &str, s: Option<f64>) -> Hooks {
    let mut hooks = Hooks::none();
    let mode = match mode {
        "base" => return hooks,
        "replace" => SteerMode::Replace,
        "delta" => SteerMode::Delta,
        "seed_compat" => SteerMode::SeedCompat,
        other => panic!("unknown mode {other}"),
    };
    let edit = Steering::new(tc.clone(), features.to_vec(), s.unwrap(), mode).unwrap();
    hooks.edit(Arc::new(edit));
    hooks
}

#[test]
fn every_mode_and_strength_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let root = shared.parent().unwrap().to_path_buf();
    let dir = shared.join("fixtures/transcoders");
    let r = common::json(&dir.join("reference.json"));
    let arrays = safetensors::load(dir.join("reference_arrays.safetensors"), &Device::Cpu).unwrap();
    for case in r["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model_dir = root.join(case["model_dir"].as_str().unwrap());
        let model = Model::load(model_dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
        let tc = Arc::new(Transcoder::load(&root.join(case["transcoder"].as_str().unwrap()), None).unwrap());
        let ids = common::u32s(&case["input_ids"]);
        let features: Vec<usize> = common::u32s(&case["feature_idx"]).into_iter().map(|i| i as usize).collect();

        // The encoder alone, on the reference's own input.
        let x = &arrays[&format!("{name}/ln2_hook_normalized")];
        let f = tc.encode(x).unwrap();
        let diff = (f - &arrays[&format!("{name}/feature_acts")]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{name}: feature activations differ by {diff}");

        for (cfg_name, cfg) in case["configs"].as_object().unwrap() {
            let hooks = hooks_for(&tc, &features, cfg["mode"].as_str().unwrap(), cfg["s"].as_f64());
            let mut h = hooks.clone();
            let mut cache = model.new_cache(1, ids.len());
            let logits = model.forward(std::slice::from_ref(&ids), &[vec![true; ids.len()]], &mut cache, &mut h, LogitsAt::Last).unwrap();
            let ours: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = arrays[cfg["final_logits_key"].as_str().unwrap()].to_vec1().unwrap();
            let diff = common::max_abs_diff(&common::centred(&ours), &want);
            assert!(diff < 2e-4, "{name} {cfg_name}: centred logits differ by {diff}");
            let greedy = common::u32s(&cfg["greedy_ids"]);
            let opts = GenerateOptions { max_new_tokens: 20, batch_size: 1, ..Default::default() };
            let got = generate(&model, std::slice::from_ref(&ids), &opts, &hooks, |_| Ok(())).unwrap().remove(0);
            assert_eq!(got, greedy, "{name} {cfg_name}: greedy ids");
        }
    }
}

#[test]
fn delta_at_strength_one_is_exactly_the_model() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/transcoders/tiny-gpt2/layer_01");
    let model = Model::load(shared.join("fixtures/tiny-gpt2").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let tc = Arc::new(Transcoder::load(&dir.join("tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt"), None).unwrap());
    let ids = model.codec.to_tokens("Question: is the sky blue?\nAnswer:").unwrap();
    let run = |hooks: &Hooks| -> Tensor {
        let mut h = hooks.clone();
        let mut cache = model.new_cache(1, ids.len());
        model.forward(std::slice::from_ref(&ids), &[vec![true; ids.len()]], &mut cache, &mut h, LogitsAt::All).unwrap()
    };
    let base = run(&Hooks::none());
    let steered = run(&hooks_for(&tc, &[0, 1, 2, 3], "delta", Some(1.0)));
    let diff = (base - steered).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
}
