//! The engine against the fixtures' references (transformers and TransformerLens, float32):
//! logits within 1e-4, greedy continuations equal, hook values within 1e-4, batches equal to
//! one prompt at a time.

mod common;

use std::path::Path;

use candle_core::{safetensors, Tensor};
use neurosteer::generate::{generate, GenerateOptions};
use neurosteer::hooks::Hooks;
use neurosteer::model::{LoadOptions, LogitsAt, Model};

fn greedy(model: &Model, prompts: &[Vec<u32>], n: usize, batch: usize) -> Vec<Vec<u32>> {
    let opts = GenerateOptions { max_new_tokens: n, batch_size: batch, stop_at_eos: true, ..Default::default() };
    generate(model, prompts, &opts, &Hooks::none(), |_| Ok(())).unwrap()
}

/// Checks every prompt of a `reference.json`: tokenizer ids, final logits, greedy ids.
fn check_reference(model: &Model, reference: &Path, tokenizer_adds_bos: bool) {
    let r = common::json(reference);
    let mut all_inputs = Vec::new();
    let mut all_greedy = Vec::new();
    for p in r["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let text = p["text"].as_str().unwrap();
        let tok_ids = common::u32s(&p["tokenizer_ids"]);
        let ours = model.codec.tokenizer.encode(text).unwrap();
        let expected_plain: Vec<u32> = if tokenizer_adds_bos { tok_ids[1..].to_vec() } else { tok_ids.clone() };
        assert_eq!(ours, expected_plain, "{name}: tokenizer ids");
        let input_ids = common::u32s(&p["input_ids"]);
        let logits = common::final_logits(model, &input_ids);
        let diff = common::max_abs_diff(&logits, &common::f32s(&p["final_logits"]));
        assert!(diff < 1e-4, "{name}: final logits differ by {diff}");
        let greedy_ids = common::u32s(&p["greedy_ids"]);
        let got = greedy(model, &[input_ids.clone()], greedy_ids.len(), 1).remove(0);
        assert_eq!(got, greedy_ids, "{name}: greedy ids");
        let text_ref = p["greedy_text"].as_str().unwrap();
        assert_eq!(model.codec.decode(&got).unwrap(), text_ref, "{name}: greedy text");
        all_inputs.push(input_ids);
        all_greedy.push(greedy_ids);
    }
    // Mixed-length prompts in one batch give exactly the one-at-a-time output.
    let batched = greedy(model, &all_inputs, 20, all_inputs.len());
    assert_eq!(batched, all_greedy, "batched generation differs from one prompt at a time");
}

/// Checks TransformerLens hook values on the `boolq` prompt at layer 1.
fn check_hooks(model: &Model, dir: &Path) {
    let r = common::json(&dir.join("reference.json"));
    let tl = &r["transformer_lens_hooks"];
    let ids = common::u32s(&tl["input_ids"]);
    let prompt = tl["prompt"].as_str().unwrap();
    assert_eq!(model.codec.to_tokens(prompt).unwrap(), ids, "to_tokens");
    let reference = safetensors::load(dir.join("reference_hooks.safetensors"), &candle_core::Device::Cpu).unwrap();
    let names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.ln2.hook_scale",
                 "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"];
    let mut hooks = Hooks::none();
    for n in names {
        hooks.record(model.hook_point(n).unwrap());
    }
    let mut cache = model.new_cache(1, ids.len());
    let logits = model.forward(&[ids.clone()], &[vec![true; ids.len()]], &mut cache, &mut hooks, LogitsAt::All).unwrap();
    for n in names {
        let ours: Tensor = hooks.recorded(model.hook_point(n).unwrap()).unwrap().squeeze(0).unwrap();
        let want = &reference[n];
        assert_eq!(ours.dims(), want.dims(), "{n}: shape");
        let diff = (ours - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{n}: differs from TransformerLens by {diff}");
    }
    let last: Vec<f32> = logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap().to_vec1().unwrap();
    let tl_logits: Vec<f32> = reference["tl.logits_final"].to_vec1().unwrap();
    let diff = common::max_abs_diff(&common::centred(&last), &tl_logits);
    assert!(diff < 1e-4, "centred logits differ from TransformerLens by {diff}");
}

#[test]
fn tiny_llama3_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/tiny-llama3");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    check_reference(&model, &dir.join("reference.json"), true);
    check_hooks(&model, &dir);
}

#[test]
fn tiny_gpt2_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/tiny-gpt2");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    check_reference(&model, &dir.join("reference.json"), false);
    check_hooks(&model, &dir);
}

#[test]
fn stories260k_hf_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("assets/stories260K/hf");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    check_reference(&model, &dir.join("reference.json"), true);
    check_hooks(&model, &dir);
}

#[test]
fn stories260k_llama2c_matches_reference_and_karpathy() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("assets/stories260K");
    for ckpt in ["stories260K.bin", "stories260K_v1_ak42.bin"] {
        let opts = LoadOptions { tokenizer: Some(dir.join("tok512.bin")), ..Default::default() };
        let model = Model::load(dir.join(ckpt).to_str().unwrap(), &opts).unwrap();
        check_reference(&model, &dir.join("hf/reference.json"), true);
        // karpathy's documented temperature-0 output from BOS.
        let doc = std::fs::read_to_string(dir.join("stories260K.md")).unwrap();
        let start = doc.find("Once upon a time, there was a little girl named Lily").unwrap();
        let expected = &doc[start..start + doc[start..].find("\n```").unwrap()];
        let out = greedy(&model, &[vec![1]], 256, 1).remove(0);
        let text = model.codec.decode(&out).unwrap();
        assert_eq!(text, expected, "{ckpt}: greedy output from BOS");
    }
}
