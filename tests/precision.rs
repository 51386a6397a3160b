//! Half-precision weights against the float32 references: bf16 and f16 final logits (centred)
//! within 2.5% and 0.4% of the largest centred reference logit (twice transformers' own error on
//! these models), steering in bf16, the growing KV cache, and the device flag.

mod common;

use std::sync::Arc;

use candle_core::DType;
use neurosteer::generate::{generate, GenerateOptions};
use neurosteer::hooks::Hooks;
use neurosteer::model::{DTypeChoice, LoadOptions, LogitsAt, Model};
use neurosteer::transcoder::splice::{SteerMode, Steering};
use neurosteer::transcoder::Transcoder;

fn load(path: &std::path::Path, dtype: DTypeChoice) -> Model {
    Model::load(path.to_str().unwrap(), &LoadOptions { dtype, ..Default::default() }).unwrap()
}

#[test]
fn half_precision_logits_within_twice_transformers_error() {
    let Some(shared) = common::shared() else { return };
    for dir in ["fixtures/tiny-llama3", "fixtures/tiny-gpt2", "assets/stories260K/hf", "fixtures/tiny-gemma2", "fixtures/tiny-qwen3"] {
        let dir = shared.join(dir);
        let r = common::json(&dir.join("reference.json"));
        for (dtype, bound) in [(DTypeChoice::Bf16, 0.025f32), (DTypeChoice::F16, 0.004)] {
            let model = load(&dir, dtype);
            assert_eq!(model.dtype, if dtype == DTypeChoice::Bf16 { candle_core::DType::BF16 } else { candle_core::DType::F16 });
            let mut worst = 0f32;
            for p in r["prompts"].as_array().unwrap() {
                let ids = common::u32s(&p["input_ids"]);
                let want = common::centred(&common::f32s(&p["final_logits"]));
                let got = common::centred(&common::final_logits(&model, &ids));
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                worst = worst.max(common::max_abs_diff(&got, &want) / scale);
            }
            eprintln!("{} {dtype:?}: largest centred-logit error {:.4}% of the largest logit", dir.display(), worst * 100.0);
            assert!(worst <= bound, "{} {dtype:?}: error {worst} above {bound}", dir.display());
            assert!(worst > 0.0, "{} {dtype:?}: no rounding at all: were the weights converted?", dir.display());
        }
    }
}

/// bf16 model, transcoder held in f32, bf16 and f16: delta at strength 1 is exactly the unsteered
/// model and strength 4 changes the generations.
#[test]
fn bf16_delta_at_strength_one_is_the_unsteered_model() {
    let Some(shared) = common::shared() else { return };
    let model = load(&shared.join("fixtures/tiny-gpt2"), DTypeChoice::Bf16);
    let tc32 =
        Transcoder::load(&shared.join("fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt"), None).unwrap();
    let prompts: Vec<Vec<u32>> = ["Question: is the sky blue?\nAnswer:", "The cat sat on the", "1 2 3 4"]
        .iter()
        .map(|p| model.codec.to_tokens(p).unwrap())
        .collect();
    let features: Vec<usize> = (0..tc32.meta.d_sae).step_by(3).collect();
    let opts = GenerateOptions { max_new_tokens: 16, batch_size: 3, ..Default::default() };
    let base = generate(&model, &prompts, &opts, &Hooks::none(), |_| Ok(())).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tc = Arc::new(tc32.to(&candle_core::Device::Cpu, dtype).unwrap());
        assert_eq!(tc.w_enc.dtype(), dtype);
        let run = |strength: f64| {
            let mut hooks = Hooks::none();
            hooks.edit(Arc::new(Steering::new(tc.clone(), features.clone(), strength, SteerMode::Delta).unwrap()));
            generate(&model, &prompts, &opts, &hooks, |_| Ok(())).unwrap()
        };
        assert_eq!(run(1.0), base, "{dtype:?} transcoder: delta at strength 1 must be the unsteered model");
        assert_ne!(run(4.0), base, "{dtype:?} transcoder: delta at strength 4 should change the generations");
    }
}

/// A transcoder held in bf16 or f16 encodes and decodes within its rounding of the f32 one
/// (largest error at most 1% (bf16) and 0.15% (f16) of the largest f32 value), and the same
/// features fire, apart from those within that error of zero.
#[test]
fn half_precision_transcoder_within_its_rounding() {
    let Some(shared) = common::shared() else { return };
    let model = load(&shared.join("fixtures/tiny-gpt2"), DTypeChoice::F32);
    let tc32 =
        Transcoder::load(&shared.join("fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt"), None).unwrap();
    let ids = model.codec.to_tokens("A transcoder stands for the MLP of its layer, feature by feature.").unwrap();
    let point = tc32.meta.points().unwrap().0;
    let (_, values) = neurosteer::activations::run_with_cache(&model, &ids, &[point]).unwrap();
    let x = &values[&point];
    let f32s = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (f_want, y_want) = (f32s(&tc32.encode(x).unwrap()), f32s(&tc32.forward(x).unwrap()));
    for (dtype, bound) in [(DType::BF16, 0.01f32), (DType::F16, 0.0015)] {
        let tc = tc32.to(&candle_core::Device::Cpu, dtype).unwrap();
        let (f, y) = (f32s(&tc.encode(x).unwrap()), f32s(&tc.forward(x).unwrap()));
        for (what, got, want) in [("features", &f, &f_want), ("output", &y, &y_want)] {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = common::max_abs_diff(got, want);
            eprintln!("{dtype:?} transcoder {what}: largest error {:.4}% of the largest value", err / scale * 100.0);
            assert!(err <= bound * scale && err > 0.0, "{dtype:?} {what}: error {err} (scale {scale})");
        }
        let scale = f_want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let flipped = f.iter().zip(&f_want).filter(|(a, b)| (**a > 0.0) != (**b > 0.0) && a.max(**b) > bound * scale).count();
        assert_eq!(flipped, 0, "{dtype:?}: features fire differently beyond the rounding");
    }
}

/// A cache allocated too small grows (twice over here) and gives what a large one gives.
#[test]
fn kv_cache_grows_past_its_capacity() {
    let Some(shared) = common::shared() else { return };
    let model = load(&shared.join("fixtures/tiny-llama3"), DTypeChoice::F32);
    let prompts = vec![model.codec.to_tokens("Once upon a time").unwrap(), model.codec.to_tokens("Hi").unwrap()];
    let opts = GenerateOptions { max_new_tokens: 12, batch_size: 2, stop_at_eos: false, ..Default::default() };
    let want = generate(&model, &prompts, &opts, &Hooks::none(), |_| Ok(())).unwrap();
    // The same greedy loop by hand on a cache of capacity 2.
    let longest = prompts.iter().map(|p| p.len()).max().unwrap();
    let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| [vec![0; longest - p.len()], p.clone()].concat()).collect();
    let valid: Vec<Vec<bool>> = prompts.iter().map(|p| [vec![false; longest - p.len()], vec![true; p.len()]].concat()).collect();
    let mut cache = model.new_cache(2, 2);
    let mut h = Hooks::none();
    let mut logits = model.forward(&tokens, &valid, &mut cache, &mut h, LogitsAt::Last).unwrap();
    let mut got = vec![Vec::new(); 2];
    for _ in 0..12 {
        let next = neurosteer::generate::argmax(&logits).unwrap();
        for (g, &t) in got.iter_mut().zip(&next) {
            g.push(t);
        }
        let feed: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        logits = model.forward(&feed, &[vec![true], vec![true]], &mut cache, &mut h, LogitsAt::Last).unwrap();
    }
    assert_eq!(got, want);
}

/// Through the CLI, on a prompt the references do not hold: bf16 and f16 `activations` against
/// the f32 run (which matches transformers), on tiny-gpt2 (stored in f32, so rounding happens).
#[test]
fn cli_activations_in_half_precision() {
    let Some(shared) = common::shared() else { return };
    let tmp = std::env::temp_dir().join(format!("neurosteer-precision-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let model = shared.join("fixtures/tiny-gpt2");
    let logits = |dtype: &str| -> Vec<f32> {
        let out = tmp.join(format!("{dtype}.safetensors"));
        let st = common::bin()
            .args(["activations", "--model", model.to_str().unwrap(), "--prompt", "A fox jumped over seven lazy dogs, then"])
            .args(["--dtype", dtype, "--out", out.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success(), "activations --dtype {dtype} failed");
        let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
        let l = &t["logits"];
        let seq = l.dim(0).unwrap();
        l.get(seq - 1).unwrap().to_vec1().unwrap()
    };
    let want = logits("f32");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (dtype, bound) in [("bf16", 0.025f32), ("f16", 0.004)] {
        let err = common::max_abs_diff(&logits(dtype), &want) / scale;
        assert!(err <= bound && err > 0.0, "{dtype}: centred-logit error {err} (bound {bound})");
    }
    std::fs::remove_dir_all(&tmp).ok();
}

/// `generate --dtype bf16 --transcoder-dtype model`: the transcoder is held in bf16 (and says so),
/// delta at strength 1 gives the unsteered tokens and strength 4 others; a bad value is refused.
#[test]
fn cli_transcoder_dtype() {
    let Some(shared) = common::shared() else { return };
    let model = shared.join("fixtures/tiny-gpt2");
    let tc = shared.join("fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt");
    let run = |extra: &[&str]| {
        let out = common::bin()
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "The cat sat on the", "--max-new-tokens", "12", "--json"])
            .args(["--dtype", "bf16"])
            .args(extra)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, base, _) = run(&[]);
    assert!(ok);
    let features: Vec<String> = (0..256).step_by(3).map(|i: usize| i.to_string()).collect();
    let features = features.join(",");
    let steer = |strength: &str| run(&["--transcoder", tc.to_str().unwrap(), "--features", &features, "--strength", strength, "--transcoder-dtype", "model"]);
    let (ok, same, err) = steer("1");
    assert!(ok, "{err}");
    assert!(err.contains("held in bf16"), "the transcoder's dtype is not reported: {err}");
    assert_eq!(same, base, "strength 1 must give the unsteered tokens");
    let (ok, other, err) = steer("4");
    assert!(ok, "{err}");
    assert_ne!(other, base, "strength 4 should change the tokens");
    let (ok, _, err) = run(&["--transcoder-dtype", "f8"]);
    assert!(!ok && err.contains("--transcoder-dtype"), "{err}");
}

#[test]
fn cli_cuda_device_is_one_clear_error_without_a_gpu() {
    let Some(shared) = common::shared() else { return };
    if candle_core::utils::cuda_is_available() {
        eprintln!("*** SKIPPED: this build has CUDA support ***");
        return;
    }
    let out = common::bin()
        .env("RUST_BACKTRACE", "1")
        .args(["generate", "--model", shared.join("fixtures/tiny-gpt2").to_str().unwrap(), "--prompt", "Hi"])
        .args(["--max-new-tokens", "2", "--device", "cuda"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line expected, got: {err}");
    assert!(err.contains("--device cuda") && err.contains("CUDA") && !err.contains("panicked"), "{err}");
}
