//! The experiment's shortcuts give what the long way gives: in `delta` mode strength 1 is run
//! once and recorded under both names; yes/no log-likelihoods come from one prefill per prompt.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_nn::ops::log_softmax;
use neurosteer::hooks::Hooks;
use neurosteer::model::{LoadOptions, LogitsAt, Model};
use neurosteer::steer::{parse_configs, run_steer, yes_no_loglik, SteerItem, SteerSettings};
use neurosteer::transcoder::splice::{SteerMode, Steering};
use neurosteer::transcoder::Transcoder;

fn stories(shared: &std::path::Path) -> (Model, Arc<Transcoder>) {
    let model = Model::load(shared.join("assets/stories260K/hf").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let tc = Transcoder::load(&shared.join("fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt"), None).unwrap();
    (model, Arc::new(tc))
}

/// The log-probability of `cont` after `prompt` from one forward pass over both.
fn full_loglik(model: &Model, prompt: &[u32], cont: &[u32], hooks: &Hooks) -> f64 {
    let seq: Vec<u32> = prompt.iter().chain(cont).copied().collect();
    let mut h = hooks.clone();
    let mut cache = model.new_cache(1, seq.len());
    let logits = model.forward(&[seq.clone()], &[vec![true; seq.len()]], &mut cache, &mut h, LogitsAt::All).unwrap();
    let lp = log_softmax(&logits.squeeze(0).unwrap(), 1).unwrap();
    cont.iter()
        .enumerate()
        .map(|(j, &t)| lp.get(prompt.len() - 1 + j).unwrap().get(t as usize).unwrap().to_scalar::<f32>().unwrap() as f64)
        .sum()
}

#[test]
fn loglik_from_one_prefill_equals_the_full_pass() {
    let Some(shared) = common::shared() else { return };
    let (model, tc) = stories(&shared);
    let mut steered = Hooks::none();
    steered.edit(Arc::new(Steering::new(tc, (0..512).step_by(7).collect(), 2.0, SteerMode::Delta).unwrap()));
    for hooks in [Hooks::none(), steered] {
        for text in ["Once upon a time, was the cat happy? Answer:", "Tom had a ball. Is it red?"] {
            let prompt = model.codec.to_tokens(text).unwrap();
            let got = yes_no_loglik(&model, &prompt, &hooks).unwrap();
            for answer in ["yes", "no"] {
                let cont = model.codec.tokenizer.encode(&format!(" {answer}")).unwrap();
                assert!(cont.len() > 1, "stories260K spells ` {answer}` with several tokens: the continuation path is tested");
                let want = full_loglik(&model, &prompt, &cont, &hooks);
                assert!((got[answer] - want).abs() < 1e-4, "{text} {answer}: {} vs {want}", got[answer]);
            }
        }
    }
}

#[test]
fn delta_strength_one_is_recorded_from_base() {
    let Some(shared) = common::shared() else { return };
    let (model, tc) = stories(&shared);
    let items: Vec<SteerItem> = ["Is the sky blue?", "Can a dog fly?", "Do cats sleep?"]
        .iter()
        .enumerate()
        .map(|(i, q)| SteerItem { id: i.to_string(), prompt: format!("Question: {q}\nAnswer:"), ground_truth: "True".into() })
        .collect();
    let settings = SteerSettings {
        model: "stories260K".into(),
        transcoder: "layer 2".into(),
        layer: 2,
        mode: SteerMode::Delta,
        max_new_tokens: 8,
        batch_size: 2,
        score: "both".into(),
        dataset: "inline".into(),
        seed: 0,
        configs: parse_configs("Base,Original=1.0,Strengthen=3.0").unwrap(),
        feature_sets: BTreeMap::from([("reasoning".to_string(), (0..512).step_by(5).collect())]),
        items,
    };
    let dir = std::env::temp_dir().join(format!("neurosteer-shortcut-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("results.json");
    let records = run_steer(&model, &neurosteer::transcoder::splice::Splice::new(tc), settings, &out).unwrap();
    for r in &records {
        assert_eq!(r.new_tokens["Original"], r.new_tokens["Base"]);
        assert_eq!(r.loglik["Original"], r.loglik["Base"]);
    }
    assert!(records.iter().any(|r| r.new_tokens["Strengthen"] != r.new_tokens["Base"]), "strength 3 changes nothing");
    let meta = common::json(&dir.join("results.json.meta.json"));
    assert_eq!(meta["identical"]["Original"], "Base");
    std::fs::remove_dir_all(&dir).ok();
}
