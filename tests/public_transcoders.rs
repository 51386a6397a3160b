//! The public transcoder layouts (circuit-tracer sets with ReLU + skip, TopK and JumpReLU, a
//! cross-layer transcoder, Gemma Scope npz, a Qwen3 set, SAELens skip and JumpReLU) against the
//! fixtures' references (`shared/fixtures/transcoders/*/reference.json`, computed by an
//! independent implementation): features at every position within 1e-4 relative, and greedy
//! continuations under delta and replace equal, the prompts generated together in one batch
//! (a case is skipped when the reference records a JumpReLU/TopK decision within 1e-5 along its
//! path, or a top-2 logit gap below 1e-3: float noise could flip it).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{safetensors, Device};
use neurosteer::generate::{generate, GenerateOptions};
use neurosteer::hooks::Hooks;
use neurosteer::model::{LoadOptions, LogitsAt, Model};
use neurosteer::transcoder::splice::{Splice, SteerMode};
use neurosteer::transcoder::Transcoder;

/// Checks one fixture folder; returns how many greedy configurations were compared.
fn check_folder(folder: &str) -> Option<usize> {
    let shared = common::shared()?;
    let root = shared.parent().unwrap().to_path_buf();
    let dir = shared.join("fixtures/transcoders").join(folder);
    let r = common::json(&dir.join("reference.json"));
    let arrays = safetensors::load(dir.join("reference_features.safetensors"), &Device::Cpu).unwrap();
    let model_dir = root.join(r["model_dir"].as_str().unwrap());
    let model = Model::load(model_dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let tc_path: PathBuf = root.join(r["cli"]["transcoder"].as_str().unwrap());
    let layer = r["cli"]["layer"].as_u64().map(|l| l as usize);
    let features: Vec<usize> = common::u32s(&r["steering"]["feature_set"]).into_iter().map(|i| i as usize).collect();
    let steer_layer = r["steering"]["layer"].as_u64().unwrap() as usize;
    let prompts = r["prompts"].as_array().unwrap();

    // Features at every position of each prompt, for every layer the reference holds.
    let mut ids_all = Vec::new();
    for p in prompts {
        let ids = common::u32s(&p["input_ids"]);
        assert_eq!(model.codec.to_tokens(p["text"].as_str().unwrap()).unwrap(), ids, "{folder}: input ids");
        for (l, key) in p["features"].as_object().unwrap() {
            let tc = Transcoder::load(&tc_path, Some(l.parse().unwrap())).unwrap();
            neurosteer::experiment::check_fit(&model, &tc, &tc_path).unwrap();
            let input = tc.meta.points().unwrap().0;
            let mut hooks = Hooks::none();
            hooks.record(input);
            let mut cache = model.new_cache(1, ids.len());
            model.forward(std::slice::from_ref(&ids), &[vec![true; ids.len()]], &mut cache, &mut hooks, LogitsAt::Last).unwrap();
            let x = hooks.recorded(input).unwrap().squeeze(0).unwrap();
            let got: Vec<f32> = tc.encode(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = arrays[key.as_str().unwrap()].flatten_all().unwrap().to_vec1().unwrap();
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = common::max_abs_diff(&got, &want) / scale;
            assert!(diff <= 1e-4, "{folder} {} layer {l}: features differ by {diff} (relative)", p["name"]);
        }
        ids_all.push(ids);
    }

    // Greedy continuations, all prompts in one batch, for every configuration.
    let opts = GenerateOptions { max_new_tokens: 20, batch_size: prompts.len(), ..Default::default() };
    let configs = prompts[0]["configs"].as_array().unwrap().len();
    let mut compared = 0;
    for c in 0..configs {
        let cfg = &prompts[0]["configs"][c];
        let (mode, s) = (cfg["mode"].as_str().unwrap(), cfg["s"].as_f64().unwrap());
        let mut hooks = Hooks::none();
        if mode != "base" {
            let mode = if mode == "delta" { SteerMode::Delta } else { SteerMode::Replace };
            let splice = load_splice(&model, &tc_path, layer, steer_layer, mode);
            hooks.edit(Arc::new(splice.steering(features.clone(), s, mode).unwrap()));
        }
        let got = generate(&model, &ids_all, &opts, &hooks, |_| Ok(())).unwrap();
        for (p, got) in prompts.iter().zip(got) {
            let cfg = &p["configs"][c];
            let margin_ok = cfg["min_top2_margin"].as_f64().unwrap() >= 1e-3
                && cfg["min_activation_margin"].as_f64().is_none_or(|m| m >= 1e-5);
            if !margin_ok {
                eprintln!("{folder} {} {mode} s={s}: skipped (the reference's decision margin is below float noise)", p["name"]);
                continue;
            }
            assert_eq!(got, common::u32s(&cfg["new_tokens"]), "{folder} {} {mode} s={s}: greedy ids", p["name"]);
            compared += 1;
        }
    }
    Some(compared)
}

fn load_splice(model: &Model, path: &Path, layer: Option<usize>, steer_layer: usize, mode: SteerMode) -> Splice {
    let splice = neurosteer::experiment::load_splice_for(model, path, layer, mode).unwrap();
    assert_eq!(splice.transcoder().meta.layer, steer_layer);
    splice
}

fn check(folder: &str) {
    if let Some(n) = check_folder(folder) {
        assert!(n >= 12, "{folder}: only {n} greedy configurations compared");
    }
}

#[test]
fn circuit_tracer_relu_skip() {
    check("circuit-tracer-relu-skip");
}

#[test]
fn circuit_tracer_topk() {
    check("circuit-tracer-topk");
}

#[test]
fn circuit_tracer_jumprelu() {
    check("circuit-tracer-jumprelu");
}

#[test]
fn circuit_tracer_cross_layer() {
    check("circuit-tracer-clt");
}

#[test]
fn gemma_scope() {
    check("gemma-scope");
}

#[test]
fn qwen3_transcoder_set() {
    check("qwen3-transcoder-set");
}

#[test]
fn saelens_skip_transcoder() {
    check("saelens-skip-transcoder");
}

#[test]
fn saelens_jumprelu_transcoder() {
    check("saelens-jumprelu-transcoder");
}

/// The command line, as a user would run it: a cross-layer transcoder read from the hub cache
/// with `HF_HUB_OFFLINE=1` (`hf://org/repo`), through `activations` and `generate --json`.
#[test]
fn cli_reads_a_set_from_the_hub_cache() {
    let Some(shared) = common::shared() else { return };
    let root = shared.parent().unwrap().to_path_buf();
    let src = shared.join("fixtures/transcoders/circuit-tracer-clt");
    let r = common::json(&src.join("reference.json"));
    let tmp = std::env::temp_dir().join(format!("neurosteer-public-{}", std::process::id()));
    let repo = tmp.join("hf/hub/models--someone--tiny-clt");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in ["config.yaml", "W_enc_0.safetensors", "W_enc_1.safetensors", "W_enc_2.safetensors", "W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors"] {
        std::fs::copy(src.join(f), snap.join(f)).unwrap();
    }
    let model = root.join(r["model_dir"].as_str().unwrap());
    let run = |args: &[&str]| {
        let out = common::bin().args(args).env("HF_HUB_OFFLINE", "1").env("HF_HOME", tmp.join("hf")).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let p = &r["prompts"][0];
    let text = p["text"].as_str().unwrap();
    let acts = tmp.join("acts.safetensors");
    run(&["activations", "--model", model.to_str().unwrap(), "--prompt", text, "--transcoder", "hf://someone/tiny-clt", "--layer", "0", "--out", acts.to_str().unwrap()]);
    let got = safetensors::load(&acts, &Device::Cpu).unwrap();
    let want = safetensors::load(src.join("reference_features.safetensors"), &Device::Cpu).unwrap();
    let got: Vec<f32> = got["features.0"].flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want[p["features"]["0"].as_str().unwrap()].flatten_all().unwrap().to_vec1().unwrap();
    assert!(common::max_abs_diff(&got, &want) <= 1e-4, "features.0 differ");

    let features: Vec<String> = common::u32s(&r["steering"]["feature_set"]).iter().map(|f| f.to_string()).collect();
    let features = features.join(",");
    for cfg in p["configs"].as_array().unwrap().iter().filter(|c| c["mode"] != "base") {
        let (mode, s) = (cfg["mode"].as_str().unwrap(), cfg["s"].as_f64().unwrap().to_string());
        let out = run(&["generate", "--model", model.to_str().unwrap(), "--prompt", text, "--max-new-tokens", "20", "--json",
            "--transcoder", "hf://someone/tiny-clt", "--layer", "0", "--features", &features, "--strength", &s, "--mode", mode]);
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(common::u32s(&line["new_tokens"]), common::u32s(&cfg["new_tokens"]), "{mode} s={s}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `transcoder info` describes a set's layer; ambiguous or inconsistent requests are one line.
#[test]
fn cli_info_and_clear_errors() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/transcoders");
    let topk = dir.join("circuit-tracer-topk");
    let out = common::bin().args(["transcoder", "info", topk.to_str().unwrap(), "--layer", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["circuit-tracer", "TopK (k = 16)", "blocks.1.mlp.hook_in", "blocks.1.mlp.hook_out", "d_sae:       128"] {
        assert!(text.contains(needle), "`{needle}` missing from: {text}");
    }
    let gemma = dir.join("gemma-scope/layer_2");
    let npz = std::fs::read_dir(std::fs::read_dir(&gemma).unwrap().next().unwrap().unwrap().path()).unwrap().next().unwrap().unwrap().path();
    let out = common::bin().args(["transcoder", "info"]).arg(npz.join("params.npz")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("gemma-scope") && text.contains("blocks.2.ln2.hook_normalized") && text.contains("JumpReLU"), "{text}");
    let one_line_error = |args: &[&str], needle: &str| {
        let out = common::bin().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.lines().filter(|l| !l.trim().is_empty()).count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "`{needle}` missing from: {err}");
    };
    one_line_error(&["transcoder", "info", topk.to_str().unwrap()], "pass --layer");
    one_line_error(&["transcoder", "info", topk.join("layer_2.safetensors").to_str().unwrap(), "--layer", "1"], "layer 2");
    one_line_error(&["transcoder", "info", topk.to_str().unwrap(), "--layer", "7"], "layer_7.safetensors");
}
