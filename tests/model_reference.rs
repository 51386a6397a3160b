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

/// Checks every prompt of a `reference.json`: tokenizer ids, final logits, greedy ids. With
/// `to_tokens_is_input`, `to_tokens(text)` must also give the ids the reference ran on (true
/// except for GPT-2, whose TransformerLens ids carry a BOS the reference's do not).
fn check_reference(model: &Model, reference: &Path, tokenizer_adds_bos: bool, to_tokens_is_input: bool) {
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
        if to_tokens_is_input {
            assert_eq!(model.codec.to_tokens(text).unwrap(), input_ids, "{name}: to_tokens");
        }
        let logits = common::final_logits(model, &input_ids);
        let diff = common::max_abs_diff(&logits, &common::f32s(&p["final_logits"]));
        eprintln!("{} {name}: final logits within {diff:.2e} of transformers", model.info.family);
        assert!(diff < 1e-4, "{name}: final logits differ by {diff}");
        let greedy_ids = common::u32s(&p["greedy_ids"]);
        let got = greedy(model, std::slice::from_ref(&input_ids), greedy_ids.len(), 1).remove(0);
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

/// Checks hook values on the `boolq` prompt at layer 1: every TransformerLens hook of
/// `reference_hooks.safetensors` that is one of ours (`skipped` lists those that are not), and
/// `mlp.hook_in` / `mlp.hook_out` against the raw HF MLP input and output (`hf_mlp_out`: whether
/// `mlp.hook_out` is HF's; GPT-2's is centred).
fn check_hooks(model: &Model, dir: &Path, skipped: &[&str], hf_mlp_out: bool) {
    let r = common::json(&dir.join("reference.json"));
    let tl = &r["transformer_lens_hooks"];
    let ids = common::u32s(&tl["input_ids"]);
    let prompt = tl["prompt"].as_str().unwrap();
    assert_eq!(model.codec.to_tokens(prompt).unwrap(), ids, "to_tokens");
    let reference = safetensors::load(dir.join("reference_hooks.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut not_ours = Vec::new();
    let mut tl_names: Vec<&String> = reference.keys().filter(|n| n.starts_with("blocks.")).collect();
    tl_names.sort();
    for n in tl_names {
        match model.hook_point(n) {
            Ok(_) => pairs.push((n.clone(), n.clone())),
            Err(_) => not_ours.push(n.as_str()),
        }
    }
    assert_eq!(not_ours, skipped, "TransformerLens hooks that are not ours");
    pairs.push(("blocks.1.mlp.hook_in".into(), "hf.layers.1.mlp_in".into()));
    if hf_mlp_out {
        pairs.push(("blocks.1.mlp.hook_out".into(), "hf.layers.1.mlp_out".into()));
    }
    let mut hooks = Hooks::none();
    for (ours, _) in &pairs {
        hooks.record(model.hook_point(ours).unwrap());
    }
    let mut cache = model.new_cache(1, ids.len());
    let logits = model.forward(std::slice::from_ref(&ids), &[vec![true; ids.len()]], &mut cache, &mut hooks, LogitsAt::All).unwrap();
    for (n, reference_name) in &pairs {
        let ours: Tensor = hooks.recorded(model.hook_point(n).unwrap()).unwrap().squeeze(0).unwrap();
        let want = &reference[reference_name];
        assert_eq!(ours.dims(), want.dims(), "{n}: shape");
        let diff = (ours - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!("{} {n}: within {diff:.2e} of {reference_name}", model.info.family);
        assert!(diff < 1e-4, "{n}: differs from {reference_name} by {diff}");
    }
    // TransformerLens's logits: centred, except for models with a final soft cap (Gemma-2).
    let last = logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
    let ours: Vec<f32> = model.tl_logits(&last).unwrap().to_vec1().unwrap();
    let tl_logits: Vec<f32> = reference["tl.logits_final"].to_vec1().unwrap();
    let diff = common::max_abs_diff(&ours, &tl_logits);
    eprintln!("{} TransformerLens logits within {diff:.2e}", model.info.family);
    assert!(diff < 1e-4, "logits differ from TransformerLens by {diff}");
}

#[test]
fn tiny_llama3_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/tiny-llama3");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    check_reference(&model, &dir.join("reference.json"), true, true);
    check_hooks(&model, &dir, &[], true);
}

/// With `tie_word_embeddings` true a stored `lm_head.weight` is ignored, as transformers ties
/// the head to the embeddings: the logits are those of a copy whose head holds the embeddings.
#[test]
fn tied_embeddings_ignore_a_stored_lm_head() {
    let Some(shared) = common::shared() else { return };
    let src = shared.join("fixtures/tiny-llama3");
    let copy = |name: &str, tie: bool, head_from_embed: bool| {
        let d = std::env::temp_dir().join(format!("neurosteer-tie-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        let mut cfg = common::json(&d.join("config.json"));
        cfg["tie_word_embeddings"] = tie.into();
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        if head_from_embed {
            let index = common::json(&d.join("model.safetensors.index.json"));
            let embed = index["weight_map"]["model.embed_tokens.weight"].as_str().unwrap().to_string();
            let head = d.join(index["weight_map"]["lm_head.weight"].as_str().unwrap());
            let table = safetensors::load(d.join(&embed), &candle_core::Device::Cpu).unwrap()["model.embed_tokens.weight"].clone();
            let mut tensors = safetensors::load(&head, &candle_core::Device::Cpu).unwrap();
            tensors.insert("lm_head.weight".into(), table);
            safetensors::save(&tensors, &head).unwrap();
        }
        let model = Model::load(d.to_str().unwrap(), &LoadOptions::default()).unwrap();
        std::fs::remove_dir_all(&d).ok();
        model
    };
    let ids = [1u32, 400, 23, 9001];
    let tied = common::final_logits(&copy("tied", true, false), &ids);
    assert_eq!(tied, common::final_logits(&copy("head-is-embed", false, true), &ids));
    assert_ne!(tied, common::final_logits(&copy("untied", false, false), &ids), "the fixture's head differs from its embeddings");
}

#[test]
fn tiny_gpt2_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/tiny-gpt2");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    check_reference(&model, &dir.join("reference.json"), false, false);
    check_hooks(&model, &dir, &[], false);
}

#[test]
fn tiny_gemma2_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/tiny-gemma2");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(model.info.family, "gemma2");
    check_reference(&model, &dir.join("reference.json"), true, true);
    check_hooks(&model, &dir, &[], true);
}

/// TransformerLens's q/k hooks inside Qwen3's attention are not hook points of ours.
const QWEN3_ATTENTION_HOOKS: [&str; 8] = [
    "blocks.1.attn.hook_k",
    "blocks.1.attn.hook_q",
    "blocks.1.attn.hook_rot_k",
    "blocks.1.attn.hook_rot_q",
    "blocks.1.attn.k_norm.hook_normalized",
    "blocks.1.attn.k_norm.hook_scale",
    "blocks.1.attn.q_norm.hook_normalized",
    "blocks.1.attn.q_norm.hook_scale",
];

#[test]
fn tiny_qwen3_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/tiny-qwen3");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!((model.info.family, model.info.eos.as_slice()), ("qwen3", &[50256, 50258][..]));
    check_reference(&model, &dir.join("reference.json"), false, true);
    check_hooks(&model, &dir, &QWEN3_ATTENTION_HOOKS, true);
    // Gemma-2's post-norm hooks are refused for other families.
    let e = model.hook_point("blocks.1.ln2_post.hook_normalized").unwrap_err();
    assert!(e.to_string().contains("no post-attention or post-MLP norms"), "{e}");
}

#[test]
fn stories260k_hf_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("assets/stories260K/hf");
    let model = Model::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    check_reference(&model, &dir.join("reference.json"), true, true);
    check_hooks(&model, &dir, &[], true);
}

#[test]
fn stories260k_llama2c_matches_reference_and_karpathy() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("assets/stories260K");
    for ckpt in ["stories260K.bin", "stories260K_v1_ak42.bin"] {
        let opts = LoadOptions { tokenizer: Some(dir.join("tok512.bin")), ..Default::default() };
        let model = Model::load(dir.join(ckpt).to_str().unwrap(), &opts).unwrap();
        check_reference(&model, &dir.join("hf/reference.json"), true, true);
        // karpathy's documented temperature-0 output from BOS.
        let doc = std::fs::read_to_string(dir.join("stories260K.md")).unwrap();
        let start = doc.find("Once upon a time, there was a little girl named Lily").unwrap();
        let expected = &doc[start..start + doc[start..].find("\n```").unwrap()];
        let out = greedy(&model, &[vec![1]], 256, 1).remove(0);
        let text = model.codec.decode(&out).unwrap();
        assert_eq!(text, expected, "{ckpt}: greedy output from BOS");
    }
}
