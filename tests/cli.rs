//! The command line end to end: real commands on the fixtures, and bad input that must end
//! with one clear line and a non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("neurosteer-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    common::bin().args(args).output().unwrap()
}

/// Asserts a clean failure: non-zero exit, one line on stderr containing every `needle`.
fn assert_clean_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from: {err}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn generate_json_matches_library_and_karpathy() {
    let Some(shared) = common::shared() else { return };
    let s = shared.join("assets/stories260K");
    let out = run(&[
        "generate", "--model", s.join("stories260K.bin").to_str().unwrap(), "--tokenizer", s.join("tok512.bin").to_str().unwrap(),
        "--prompt", "Once upon a time, there was a little girl named Lily.", "--max-new-tokens", "12", "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["text"].as_str().unwrap(), "She loved to play outside in the");
    assert_eq!(v["new_tokens"].as_array().unwrap().len(), 12);
}

#[test]
fn prompts_file_with_newlines_and_batches() {
    let Some(shared) = common::shared() else { return };
    let d = tmpdir("prompts");
    let f = d.join("p.jsonl");
    std::fs::write(&f, "\"Question: why?\\nAnswer:\"\n{\"prompt\": \"Once upon a time\"}\n\"Hi\"\n").unwrap();
    let model = shared.join("fixtures/tiny-llama3");
    let batched = run(&["generate", "--model", model.to_str().unwrap(), "--prompts", f.to_str().unwrap(), "--max-new-tokens", "6", "--json", "--batch-size", "3"]);
    let single = run(&["generate", "--model", model.to_str().unwrap(), "--prompts", f.to_str().unwrap(), "--max-new-tokens", "6", "--json", "--batch-size", "1"]);
    assert!(batched.status.success(), "{}", String::from_utf8_lossy(&batched.stderr));
    assert_eq!(String::from_utf8_lossy(&batched.stdout).lines().count(), 3);
    assert_eq!(batched.stdout, single.stdout);
    // A prompt too long for the context is named by its file and place.
    std::fs::write(&f, format!("\"Hi\"\n{}\n", serde_json::to_string(&"word ".repeat(3000)).unwrap())).unwrap();
    assert_clean_error(&run(&["generate", "--model", model.to_str().unwrap(), "--prompts", f.to_str().unwrap()]), &["p.jsonl: prompt 2", "context"]);
}

#[test]
fn activations_writes_hooks_logits_tokens() {
    let Some(shared) = common::shared() else { return };
    let d = tmpdir("acts");
    let out = d.join("a.safetensors");
    let r = run(&["activations", "--model", shared.join("fixtures/tiny-gpt2").to_str().unwrap(), "--prompt", "Hello world",
        "--hook", "blocks.1.ln2.hook_normalized", "--hook", "hook_pos_embed", "--out", out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let n = t["tokens"].dims()[0];
    assert_eq!(n, 3, "BOS + 2 tokens");
    assert_eq!(t["blocks.1.ln2.hook_normalized"].dims(), &[n, 64]);
    assert_eq!(t["logits"].dims(), &[n, 50257]);
    let tok: Vec<i64> = t["tokens"].to_vec1().unwrap();
    assert_eq!(tok[0], 50256);
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let Some(shared) = common::shared() else { return };
    let d = tmpdir("bad");
    let gpt2 = shared.join("fixtures/tiny-gpt2");

    // Datasets that leave nothing to run on name the dataset (and say why).
    let (m, t) = (shared.join("assets/stories260K/hf"), shared.join("fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt"));
    let boolq = shared.join("assets/boolq/validation.jsonl");
    let args = |cmd: &[&'static str], rest: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend(["--model", m.to_str().unwrap(), "--transcoder", t.to_str().unwrap(), "--dataset", boolq.to_str().unwrap()].map(String::from));
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let run_owned = |v: Vec<String>| run(&v.iter().map(String::as_str).collect::<Vec<_>>());
    assert_clean_error(&run_owned(args(&["transcoder", "eval"], &["--n", "0"])), &["validation.jsonl", "--n is 0"]);
    // BoolQ has no worked solutions for the few-shot style.
    let traces = d.join("traces");
    assert_clean_error(&run_owned(args(&["trace"], &["--n", "2", "--out", traces.to_str().unwrap()])), &["validation.jsonl", "worked examples", "reasoning"]);

    // Unknown architecture.
    let arch = d.join("arch");
    copy_dir(&gpt2, &arch);
    std::fs::write(arch.join("config.json"), r#"{"architectures": ["MistralForCausalLM"]}"#).unwrap();
    assert_clean_error(&run(&["generate", "--model", arch.to_str().unwrap(), "--prompt", "x"]), &["MistralForCausalLM", "GPT2LMHeadModel", "config.json"]);

    // Truncated weights.
    let trunc = d.join("trunc");
    copy_dir(&gpt2, &trunc);
    let w = std::fs::read(trunc.join("model.safetensors")).unwrap();
    std::fs::write(trunc.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    assert_clean_error(&run(&["generate", "--model", trunc.to_str().unwrap(), "--prompt", "x"]), &["model.safetensors"]);

    // Wrong shapes: the config says a wider model than the weights.
    let shape = d.join("shape");
    copy_dir(&gpt2, &shape);
    let cfg = std::fs::read_to_string(shape.join("config.json")).unwrap().replace("\"n_embd\": 64", "\"n_embd\": 128");
    std::fs::write(shape.join("config.json"), cfg).unwrap();
    assert_clean_error(&run(&["generate", "--model", shape.to_str().unwrap(), "--prompt", "x"]), &["shape"]);
    // Fewer layers in the config than in the weights.
    let shallow = d.join("shallow");
    copy_dir(&gpt2, &shallow);
    let cfg = std::fs::read_to_string(shallow.join("config.json")).unwrap().replace("\"n_layer\": 2", "\"n_layer\": 1");
    std::fs::write(shallow.join("config.json"), cfg).unwrap();
    assert_clean_error(&run(&["generate", "--model", shallow.to_str().unwrap(), "--prompt", "x"]), &["h.1.", "of layer 1", "declares 1 layers"]);

    // Missing folder, bad hook names.
    assert_clean_error(&run(&["generate", "--model", d.join("nothing/here").to_str().unwrap(), "--prompt", "x"]), &["nothing/here"]);
    let out = d.join("a.safetensors");
    assert_clean_error(&run(&["activations", "--model", gpt2.to_str().unwrap(), "--prompt", "x", "--hook", "blocks.0.hook_nope", "--out", out.to_str().unwrap()]), &["blocks.0.hook_nope"]);
    assert_clean_error(&run(&["activations", "--model", gpt2.to_str().unwrap(), "--prompt", "x", "--hook", "blocks.7.hook_mlp_out", "--out", out.to_str().unwrap()]), &["blocks.7.hook_mlp_out"]);
    assert!(!out.exists(), "no half-written output");

    // A prompt that does not fit the context.
    let long = "word ".repeat(200);
    assert_clean_error(&run(&["generate", "--model", gpt2.to_str().unwrap(), "--prompt", &long, "--max-new-tokens", "10"]), &["context"]);
    // Truncated llama2.c checkpoint.
    let s = shared.join("assets/stories260K");
    let ck = std::fs::read(s.join("stories260K.bin")).unwrap();
    std::fs::write(d.join("short.bin"), &ck[..1000]).unwrap();
    assert_clean_error(&run(&["generate", "--model", d.join("short.bin").to_str().unwrap(), "--tokenizer", s.join("tok512.bin").to_str().unwrap(), "--prompt", "x"]), &["short.bin", "truncated"]);
}

#[test]
fn mismatched_transcoder_and_offline_hub_fail_cleanly() {
    let Some(shared) = common::shared() else { return };
    // A tiny-gpt2 transcoder (d_in 64, layer 1) on stories260K works shape-wise, so use a layer
    // the model lacks: stories260K's layer-4 transcoder on tiny-gpt2 (2 layers).
    let tc = shared.join("fixtures/transcoders/stories260K/layer_04/stories260K_blocks.4.ln2.hook_normalized_512.pt");
    let out = run(&["generate", "--model", shared.join("fixtures/tiny-gpt2").to_str().unwrap(), "--prompt", "x",
        "--transcoder", tc.to_str().unwrap(), "--features", "1,2", "--strength", "2"]);
    assert_clean_error(&out, &["blocks.4", "layer 4 does not exist"]);
    // A truncated transcoder file.
    let d = tmpdir("tc");
    let bytes = std::fs::read(&tc).unwrap();
    let bad = d.join("bad.pt");
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let out = run(&["transcoder", "info", bad.to_str().unwrap()]);
    assert_clean_error(&out, &["bad.pt"]);
    // A transcoder whose layer field disagrees with its hook points.
    let mut t = neurosteer::transcoder::Transcoder::load(&shared.join("fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt"), None).unwrap();
    t.meta.layer = 0;
    let relabelled = d.join("relabelled.safetensors");
    t.save(&relabelled).unwrap();
    let out = run(&["generate", "--model", shared.join("fixtures/tiny-gpt2").to_str().unwrap(), "--prompt", "x",
        "--transcoder", relabelled.to_str().unwrap(), "--features", "1"]);
    assert_clean_error(&out, &["relabelled.safetensors", "layer field says 0", "hooks layer 1"]);
    // steer's --out names a file, not a folder.
    let tc1 = shared.join("fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt");
    let out = run(&["steer", "--model", shared.join("fixtures/tiny-gpt2").to_str().unwrap(), "--transcoder", tc1.to_str().unwrap(), "--features", "1",
        "--dataset", shared.join("assets/boolq/validation.jsonl").to_str().unwrap(), "--n", "2", "--out", d.to_str().unwrap()]);
    assert_clean_error(&out, &["is a folder", "--out"]);
    // A hub id that is not cached, offline.
    let out = common::bin()
        .args(["generate", "--model", "someone/not-cached", "--prompt", "x"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", d.join("hf"))
        .output()
        .unwrap();
    assert_clean_error(&out, &["someone/not-cached", "config.json", "tokenizer.json", "model.safetensors"]);
}

/// Invalid inputs the hostile-input corpus found accepted are refused in one line: duplicate
/// feature ids, absurd config sizes, special tokens outside the vocabulary, a weight map that
/// points outside the model's folder, an untied model without its lm_head.
#[test]
fn invalid_inputs_are_refused() {
    let Some(shared) = common::shared() else { return };
    let gpt2 = shared.join("fixtures/tiny-gpt2");
    let tc = shared.join("fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt");
    assert_clean_error(
        &run(&["generate", "--model", gpt2.to_str().unwrap(), "--prompt", "x", "--max-new-tokens", "2", "--transcoder", tc.to_str().unwrap(), "--features", "7,3,3", "--strength", "3"]),
        &["feature 3 is listed twice"],
    );
    assert_clean_error(&run(&["generate", "--model", gpt2.to_str().unwrap(), "--prompt", "x", "--batch-size", "0"]), &["--batch-size"]);
    let traces = shared.join("fixtures/seed-traces");
    assert_clean_error(&run(&["classify", "--traces", traces.to_str().unwrap(), "--diff-threshold", "NaN", "--out", "/tmp/never.json"]), &["--diff-threshold"]);
    let s = shared.join("assets");
    assert_clean_error(
        &run(&["transcoder", "train", "--model", s.join("stories260K/hf").to_str().unwrap(), "--layer", "2", "--dataset", s.join("boolq/validation.jsonl").to_str().unwrap(), "--lr", "NaN", "--out", "/tmp/never.safetensors"]),
        &["--lr"],
    );
    let llama = shared.join("fixtures/tiny-llama3");
    let edit = |name: &str, change: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let d = tmpdir(name);
        copy_dir(&llama, &d);
        let mut cfg = common::json(&d.join("config.json"));
        change(&mut cfg);
        std::fs::write(d.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
        d
    };
    for (name, change, needle) in [
        ("layers", Box::new(|c: &mut serde_json::Value| c["num_hidden_layers"] = 1_000_000_000_000u64.into()) as Box<dyn Fn(&mut serde_json::Value)>, "num_hidden_layers"),
        ("positions", Box::new(|c: &mut serde_json::Value| c["max_position_embeddings"] = 1_000_000_000_000_000u64.into()), "max_position_embeddings"),
        ("theta", Box::new(|c: &mut serde_json::Value| c["rope_theta"] = (-1.0).into()), "rope_theta"),
        // Positive, but its frequencies overflow to ∞ (and the attention to NaN).
        ("tiny-theta", Box::new(|c: &mut serde_json::Value| c["rope_theta"] = 1e-300.into()), "rope_theta"),
        // The llama3 rule divides by the factor and by high − low.
        ("rope-factor", Box::new(|c: &mut serde_json::Value| c["rope_scaling"]["factor"] = 0.0.into()), "rope_scaling"),
        ("rope-high-low", Box::new(|c: &mut serde_json::Value| c["rope_scaling"]["high_freq_factor"] = c["rope_scaling"]["low_freq_factor"].clone()), "high_freq_factor above"),
        ("eps", Box::new(|c: &mut serde_json::Value| c["rms_norm_eps"] = (-1e-5).into()), "epsilon"),
        ("eos", Box::new(|c: &mut serde_json::Value| c["eos_token_id"] = 99_999_999.into()), "outside the vocabulary"),
        // A shallower config than the checkpoint would run, silently dropping layers.
        ("shallower", Box::new(|c: &mut serde_json::Value| c["num_hidden_layers"] = (c["num_hidden_layers"].as_u64().unwrap() - 1).into()), "declares"),
        // The fixture's tokenizer has ids up to 50,257: a vocabulary of 1,000 cannot embed them.
    ] {
        let d = edit(name, &*change);
        assert_clean_error(&run(&["generate", "--model", d.to_str().unwrap(), "--prompt", "x"]), &["config.json", needle]);
    }
    // The fixture's tokenizer has ids up to 50,257: a vocabulary of 1,000 cannot embed them.
    let d = edit("vocab", &|c: &mut serde_json::Value| {
        c["vocab_size"] = 1000.into();
        c["bos_token_id"] = 1.into();
        c["eos_token_id"] = 2.into();
    });
    assert_clean_error(&run(&["generate", "--model", d.to_str().unwrap(), "--prompt", "x"]), &["tokenizer", "id 50257", "vocabulary of 1000"]);
    // A weight stored as integers (its header relabelled I32: the same bytes per element).
    let d = tmpdir("intweights");
    copy_dir(&shared.join("fixtures/tiny-gpt2"), &d);
    let shard = d.join("model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.windows(13).position(|w| w == b"\"dtype\":\"F32\"").expect("an F32 tensor in the header");
    bytes[at + 9] = b'I';
    std::fs::write(&shard, bytes).unwrap();
    assert_clean_error(&run(&["generate", "--model", d.to_str().unwrap(), "--prompt", "x"]), &["model.safetensors", "I32", "floating point"]);
    // The index points outside the folder.
    let d = tmpdir("weightmap");
    copy_dir(&llama, &d);
    let idx = d.join("model.safetensors.index.json");
    let mut index = common::json(&idx);
    let first = index["weight_map"].as_object().unwrap().keys().next().unwrap().clone();
    index["weight_map"][&first] = "../../etc/passwd".into();
    std::fs::write(&idx, serde_json::to_string(&index).unwrap()).unwrap();
    assert_clean_error(&run(&["generate", "--model", d.to_str().unwrap(), "--prompt", "x"]), &["weight_map", "../../etc/passwd"]);
}

/// Finite weights whose forward pass overflows f32 (layer 0's q and k scaled by 1e19: scores of
/// ∞, attention of NaN) fail with one line, and write nothing; so does a strength past f32, and
/// `bench` without decode steps to time or with more logits than memory.
#[test]
fn overflowing_forward_passes_and_strengths_are_refused() {
    let Some(shared) = common::shared() else { return };
    let d = tmpdir("overflow");
    copy_dir(&shared.join("fixtures/tiny-llama3"), &d);
    let index = common::json(&d.join("model.safetensors.index.json"));
    let shard = d.join(index["weight_map"]["model.layers.0.self_attn.q_proj.weight"].as_str().unwrap());
    let mut tensors = candle_core::safetensors::load(&shard, &candle_core::Device::Cpu).unwrap();
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"] {
        let t = (&tensors[name] * 1e19).unwrap();
        tensors.insert(name.to_string(), t);
    }
    candle_core::safetensors::save(&tensors, &shard).unwrap();
    let model = d.to_str().unwrap();
    let needles = ["NaN or infinite logits", "overflowed"];
    assert_clean_error(&run(&["generate", "--model", model, "--prompt", "Hello world", "--max-new-tokens", "3"]), &needles);
    let out = d.join("acts.safetensors");
    assert_clean_error(&run(&["activations", "--model", model, "--prompt", "Hello world", "--hook", "blocks.0.hook_attn_out", "--out", out.to_str().unwrap()]), &needles);
    let left: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("acts")).collect();
    assert!(left.is_empty(), "a failed run left {left:?}");
    let gpt2 = shared.join("fixtures/tiny-gpt2");
    let tc = shared.join("fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt");
    assert_clean_error(
        &run(&["generate", "--model", gpt2.to_str().unwrap(), "--prompt", "hi", "--transcoder", tc.to_str().unwrap(), "--features", "1,2", "--strength", "1e39"]),
        &["strength 1e39", "f32"],
    );
    assert_clean_error(&run(&["bench", "--model", gpt2.to_str().unwrap(), "--new-tokens", "0"]), &["--new-tokens"]);
    // Ten million sequences' logits (4 TB) are refused before anything is allocated for them.
    assert_clean_error(&run(&["bench", "--model", gpt2.to_str().unwrap(), "--batch", "10000000", "--prompt-tokens", "1", "--new-tokens", "1"]), &["--batch", "GiB"]);
    std::fs::remove_dir_all(&d).ok();
}

/// `bench` on a given model in f32 and (`--also-dtype`) bf16: one row per batch size and
/// steering mode and, with `--experiment`, the experiment's shape timed per configuration
/// (strength 1 not generated again in delta mode), with a bf16 transcoder; the JSON holds both.
/// Every ratio is the median of step-by-step ratios within a cycle (recomputed here from the
/// steps and probes the JSON keeps).
#[test]
fn bench_rows_and_experiment_timing() {
    let Some(shared) = common::shared() else { return };
    let d = tmpdir("bench");
    let out_file = d.join("bench.json");
    let out = run(&[
        "bench", "--model", shared.join("fixtures/tiny-gpt2").to_str().unwrap(), "--batch", "1,2", "--prompt-tokens", "8",
        "--new-tokens", "3", "--experiment", "3", "--steer-features", "64", "--transcoder-dtype", "bf16", "--dtype", "f32",
        "--also-dtype", "bf16", "--out", out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = common::json(&out_file);
    let rows = report["rows"].as_array().unwrap();
    // Per dtype, per batch size: plain, +delta, +replace.
    assert_eq!(rows.len(), 12);
    let dtypes: Vec<&str> = rows.iter().map(|r| r["dtype"].as_str().unwrap()).collect();
    assert_eq!(dtypes, [["f32"; 6], ["bf16"; 6]].concat());
    let f64s = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let probes = f64s(&rows[0]["probes_gb_s"]);
    assert_eq!(probes.len(), 3);
    let steps: Vec<Vec<f64>> = rows.iter().map(|r| f64s(&r["steps_ms"])).collect();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    for (i, r) in rows.iter().enumerate() {
        let batch = r["batch"].as_u64().unwrap();
        assert_eq!(steps[i].len(), 3, "{r}");
        assert_eq!(f64s(&r["probes_gb_s"]), probes, "{r}");
        assert!(close(r["decode_step_ms"].as_f64().unwrap(), median(steps[i].clone())), "{r}");
        // The median step's KV cache: 2 layers, keys and values of 64 floats, 8 + 2 positions
        // per sequence; the floor reads it and the weights at the median probed bandwidth, and
        // each step is set against the bandwidth probed before it.
        assert_eq!(r["kv_bytes"].as_u64(), Some(2 * 2 * 64 * 4 * 10 * batch), "{r}");
        let bytes = (r["weight_bytes"].as_u64().unwrap() + r["kv_bytes"].as_u64().unwrap()) as f64;
        let bandwidth = r["bandwidth_gb_s"].as_f64().unwrap();
        assert!(close(bandwidth, median(probes.clone())), "{r}");
        assert!(close(r["floor_ms"].as_f64().unwrap(), bytes / (bandwidth * 1e9) * 1e3), "{r}");
        let flops = r["compute_floor_ms"].as_f64().unwrap();
        let over: Vec<f64> = (0..3).map(|t| steps[i][t] / (bytes / (probes[t] * 1e9) * 1e3).max(flops)).collect();
        assert!(close(r["over_floor"].as_f64().unwrap(), median(over)), "{r}");
        // Plain rows (0 and 3 of each dtype) against batch 1's step of the same cycle; steered
        // ones against the plain step at their batch size; bf16 rows against the same f32 row
        // (with half its weight bytes).
        let (first, plain) = (i / 6 * 6, i / 3 * 3);
        let ratio = |o: usize| median((0..3).map(|t| steps[i][t] / steps[o][t]).collect());
        if i == plain {
            let want = median((0..3).map(|t| batch as f64 * steps[first][t] / steps[i][t]).collect());
            assert!(close(r["vs_batch1"].as_f64().unwrap(), want), "{r}");
            assert!(r["steer_overhead"].is_null(), "{r}");
        } else {
            assert!(r["vs_batch1"].is_null(), "{r}");
            assert!(close(r["steer_overhead"].as_f64().unwrap(), ratio(plain) - 1.0), "{r}");
        }
        if i < 6 {
            assert!(r["vs_dtype"].is_null(), "{r}");
        } else {
            assert!(close(r["vs_dtype"].as_f64().unwrap(), ratio(i - 6)), "{r}");
            assert_eq!(2 * r["weight_bytes"].as_u64().unwrap(), rows[i - 6]["weight_bytes"].as_u64().unwrap(), "{r}");
        }
    }
    let experiments = report["experiments"].as_array().unwrap();
    assert_eq!(experiments.iter().map(|e| e["dtype"].as_str().unwrap()).collect::<Vec<_>>(), ["f32", "bf16"]);
    let e = &experiments[0];
    assert_eq!((e["prompts"].as_u64(), e["batch"].as_u64(), e["d_sae"].as_u64()), (Some(3), Some(2), Some(64)));
    assert_eq!(e["transcoder_dtype"], "bf16");
    let configs = e["configs"].as_array().unwrap();
    let names: Vec<&str> = configs.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Base", "Original", "Suppressed", "Strengthen"]);
    assert_eq!(configs[1]["same_as"], "Base");
    assert!(e["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_clean_error(&run(&["bench", "--model", "x", "--experiment", "0"]), &["--experiment"]);
    let tiny = shared.join("fixtures/tiny-gpt2");
    assert_clean_error(&run(&["bench", "--model", tiny.to_str().unwrap(), "--dtype", "bf16", "--also-dtype", "bf16"]), &["--also-dtype", "bf16"]);
    std::fs::remove_dir_all(&d).ok();
}

/// `transcoder train --out` into a folder that does not exist yet (as `examples/demo.toml`'s
/// header trains into `examples/runs/demo/`) creates it and writes a transcoder there that loads.
#[test]
fn train_creates_the_output_folder() {
    let Some(shared) = common::shared() else { return };
    let d = tmpdir("train");
    let out_file = d.join("runs/demo/tc.safetensors");
    let s = shared.join("assets");
    let out = run(&[
        "transcoder", "train", "--model", s.join("stories260K/hf").to_str().unwrap(), "--layer", "2", "--dataset",
        s.join("boolq/validation.jsonl").to_str().unwrap(), "--d-sae", "16", "--steps", "5", "--batch-tokens", "64",
        "--max-tokens", "2000", "--out", out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info = run(&["transcoder", "info", out_file.to_str().unwrap()]);
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    std::fs::remove_dir_all(&d).ok();
}

/// `run` checks its steer stage before loading the model: a missing steer dataset fails at once,
/// before any trace is written; `demo --n 0` fails before training.
#[test]
fn run_checks_the_steer_stage_first() {
    let Some(shared) = common::shared() else { return };
    let d = tmpdir("run-steer-first");
    let s = shared.join("assets/stories260K");
    let config = format!(
        "model = {:?}\ntokenizer = {:?}\ntranscoder = {:?}\nout = \"out\"\n[trace]\nmax_new_tokens = 4\n[trace.dataset]\npath = {:?}\nkind = \"gsm8k\"\nn = 4\n\
         [steer]\n[steer.dataset]\npath = \"missing.jsonl\"\nkind = \"boolq\"\nn = 4\n",
        s.join("stories260K.bin"),
        s.join("tok512.bin"),
        shared.join("fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt"),
        shared.join("assets/reasoning/gsm8k/test.jsonl"),
    );
    std::fs::write(d.join("run.toml"), config).unwrap();
    let out = run(&["run", "--config", d.join("run.toml").to_str().unwrap()]);
    assert_clean_error(&out, &["steer stage", "missing.jsonl"]);
    assert!(!d.join("out").exists(), "a stage ran before the steer stage was checked");
    // So does the demo, before it trains its transcoder.
    let demo = d.join("demo");
    assert_clean_error(&run(&["demo", "--n", "0", "--out", demo.to_str().unwrap()]), &["no items to steer", "--n is 0"]);
    assert!(!demo.join("transcoder_layer2.safetensors").exists());
    std::fs::remove_dir_all(&d).ok();
}

/// A templates file that adds a style nobody traces (here a misspelt `0shot`) is warned about.
#[test]
fn untraced_template_styles_are_warned_about() {
    let Some(shared) = common::shared() else { return };
    let d = tmpdir("templates");
    let templates = d.join("templates.toml");
    std::fs::write(&templates, "[0shoot]\ntemplate = \"Q: {question}\\nA: Let's think.\"\n").unwrap();
    let out = run(&[
        "trace", "--model", shared.join("assets/stories260K/hf").to_str().unwrap(),
        "--transcoder", shared.join("fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt").to_str().unwrap(),
        "--dataset", shared.join("assets/reasoning/gsm8k/test.jsonl").to_str().unwrap(), "--n", "2", "--max-new-tokens", "2", "--truncate-left",
        "--templates", templates.to_str().unwrap(), "--out", d.join("traces").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("templates.toml") && err.contains("style `0shoot` is not among the styles traced"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}
