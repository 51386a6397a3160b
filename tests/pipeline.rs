//! The discovery and steering pipeline through the command line: trace, classify (also on the
//! seed notebook's trace files), steer, evaluate; crash-and-resume for trace and steer.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("neurosteer-pipe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "command failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn classify_seed_traces_reproduces_expected() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/seed-traces");
    let d = tmpdir("seed");
    let out = d.join("neurons.json");
    ok(common::bin()
        .args(["classify", "--traces", &s(&dir), "--frequency", &s(&dir.join("log_feature_sparsity.pt")), "--out", &s(&out)])
        .output()
        .unwrap());
    let got = common::json(&out);
    let want = common::json(&dir.join("expected.json"));
    for key in ["reasoning", "memory"] {
        assert_eq!(got[key], want[key], "{key} list");
    }
    assert_eq!(got["n_alive"], want["n_alive"]);
    assert_eq!(got["n_reasoning"], 86);
    // The per-feature mean/first/last values agree with the expected vectors.
    for (style_idx, style) in ["basic", "0shot", "fewshot"].iter().enumerate() {
        for (k, stat) in ["mean", "first", "last"].iter().enumerate() {
            let expected = common::f32s(&want["means"][style][stat]);
            let ours: Vec<f32> = got["features"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["values"][style_idx][1][k].as_f64().unwrap() as f32)
                .collect();
            let diff = common::max_abs_diff(&ours, &expected);
            assert!(diff < 1e-6, "{style} {stat}: {diff}");
        }
    }
    assert!(d.join("neurons.csv").exists() && d.join("neurons.png").exists() && d.join("neurons_diff.svg").exists());
}

struct Fixture {
    model: String,
    transcoder: String,
    gsm8k: String,
    boolq: String,
}

fn fixture(shared: &Path) -> Fixture {
    Fixture {
        model: s(&shared.join("assets/stories260K/hf")),
        transcoder: s(&shared.join("fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt")),
        gsm8k: s(&shared.join("assets/reasoning/gsm8k/test.jsonl")),
        boolq: s(&shared.join("assets/boolq/validation.jsonl")),
    }
}

fn trace_cmd(f: &Fixture, out: &Path) -> Command {
    let mut c = common::bin();
    c.args(["trace", "--model", &f.model, "--transcoder", &f.transcoder, "--dataset", &f.gsm8k, "--n", "12",
        "--max-new-tokens", "8", "--batch-size", "4", "--truncate-left", "--out", &s(out)]);
    c
}

/// Runs `cmd`, kills it with SIGKILL once `marker` exists (or it ends), and returns whether it
/// was killed.
fn kill_when(mut cmd: Command, marker: impl Fn() -> bool) -> bool {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            return false;
        }
        if marker() {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        if start.elapsed() > Duration::from_secs(300) {
            panic!("command did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn trace_classify_steer_evaluate_with_crashes() {
    let Some(shared) = common::shared() else { return };
    let f = fixture(&shared);
    let d = tmpdir("full");

    // Trace: one run straight through, one killed after its first shard and resumed.
    let clean = d.join("traces-clean");
    ok(trace_cmd(&f, &clean).output().unwrap());
    let crashed = d.join("traces-crash");
    let shard = crashed.join("basic/shard-00001.safetensors");
    let killed = kill_when(trace_cmd(&f, &crashed), || shard.exists());
    eprintln!("trace killed mid-run: {killed}");
    ok(trace_cmd(&f, &crashed).output().unwrap());
    for style in ["basic", "0shot", "fewshot"] {
        let a = std::fs::read(clean.join(style).join("summary.safetensors")).unwrap();
        let b = std::fs::read(crashed.join(style).join("summary.safetensors")).unwrap();
        assert!(a == b, "{style}: resumed summary differs");
    }
    // Other arguments against the same folder are refused.
    let other = common::bin()
        .args(["trace", "--model", &f.model, "--transcoder", &f.transcoder, "--dataset", &f.gsm8k, "--n", "10", "--max-new-tokens", "8", "--out", &s(&crashed)])
        .output()
        .unwrap();
    assert!(!other.status.success());
    // A live process tracing into the folder holds its lock: a clear error.
    let lock = d.join("traces-crash.lock");
    std::fs::write(&lock, std::process::id().to_string()).unwrap();
    let locked = trace_cmd(&f, &crashed).output().unwrap();
    assert!(!locked.status.success() && String::from_utf8_lossy(&locked.stderr).contains("another neurosteer process"));
    std::fs::remove_file(&lock).unwrap();

    // Classify with the transcoder's own frequencies.
    let neurons = d.join("neurons.json");
    ok(common::bin().args(["classify", "--traces", &s(&clean), "--out", &s(&neurons)]).output().unwrap());
    let n = common::json(&neurons);
    let reasoning = n["reasoning"].as_array().unwrap().len();
    assert_eq!(reasoning + n["memory"].as_array().unwrap().len(), n["alive"].as_array().unwrap().len());
    assert!(reasoning > 0, "some feature rises under chain of thought");
    assert_eq!(n["layer"], 2);

    // A corrupt shard (row offsets past the end, falling, or a NaN value) is one clear error.
    for (name, change, needle) in [
        ("past", Box::new(|t: &mut std::collections::HashMap<String, candle_core::Tensor>| {
            let mut o = t["row_offsets"].to_vec1::<i64>().unwrap();
            o[1] = 1 << 40;
            t.insert("row_offsets".into(), candle_core::Tensor::new(o, &candle_core::Device::Cpu).unwrap());
        }) as Box<dyn Fn(&mut std::collections::HashMap<String, candle_core::Tensor>)>, "row_offsets"),
        ("falling", Box::new(|t: &mut std::collections::HashMap<String, candle_core::Tensor>| {
            let mut o = t["row_offsets"].to_vec1::<i64>().unwrap();
            o.swap(1, 2);
            t.insert("row_offsets".into(), candle_core::Tensor::new(o, &candle_core::Device::Cpu).unwrap());
        }), "row_offsets"),
        ("nan", Box::new(|t: &mut std::collections::HashMap<String, candle_core::Tensor>| {
            let mut v = t["value"].to_vec1::<f32>().unwrap();
            v[0] = f32::NAN;
            t.insert("value".into(), candle_core::Tensor::new(v, &candle_core::Device::Cpu).unwrap());
        }), "NaN"),
    ] {
        let bad = d.join(format!("traces-{name}"));
        assert!(Command::new("cp").arg("-r").arg(&clean).arg(&bad).status().unwrap().success());
        let shard = bad.join("basic/shard-00000.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).unwrap();
        change(&mut tensors);
        let views: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
        std::fs::write(&shard, safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), header.metadata().clone()).unwrap()).unwrap();
        let out = common::bin().args(["classify", "--traces", &s(&bad), "--out", &s(&d.join("bad.json"))]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("shard-00000.safetensors") && err.contains(needle) && !err.contains("panicked"), "{name}: {err}");
    }

    // Steer 20 of the reasoning features (replace mode, so strength 1 differs from Base), with a
    // random control set drawn from the other alive features; killed once and resumed.
    let top: Vec<serde_json::Value> = n["reasoning"].as_array().unwrap().iter().take(20).cloned().collect();
    let chosen = d.join("chosen.json");
    std::fs::write(&chosen, serde_json::to_string(&top).unwrap()).unwrap();
    let steer = |out: &Path| {
        let mut c = common::bin();
        c.args(["steer", "--model", &f.model, "--transcoder", &f.transcoder, "--features", &s(&chosen), "--dataset", &f.boolq,
            "--n", "12", "--max-new-tokens", "6", "--batch-size", "4", "--mode", "replace", "--random-controls", "1",
            "--score", "both", "--out", &s(out)]);
        c
    };
    let clean_results = d.join("clean.json");
    ok(steer(&clean_results).output().unwrap());
    // When no item fits the context, the run fails before writing anything.
    let none_fit = d.join("none_fit.json");
    let out = common::bin()
        .args(["steer", "--model", &f.model, "--transcoder", &f.transcoder, "--features", &s(&chosen), "--dataset", &f.boolq,
            "--n", "12", "--max-new-tokens", "100000", "--out", &s(&none_fit)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nothing to steer"), "{err}");
    assert!(!none_fit.exists() && !d.join("none_fit.json.meta.json").exists());
    let results = d.join("results.json");
    let m2 = d.join("results.json.meta.json");
    let killed = kill_when(steer(&results), move || m2.exists());
    eprintln!("steer killed mid-run: {killed}");
    ok(steer(&results).output().unwrap());
    let (a, b) = (std::fs::read_to_string(&clean_results).unwrap(), std::fs::read_to_string(&results).unwrap());
    assert!(a == b, "resumed results differ from an uninterrupted run");

    // The generations equal what `generate` gives with the same transcoder, features and strength.
    let records: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert!(!records.is_empty());
    let meta = common::json(&d.join("results.json.meta.json"));
    let prompts = d.join("prompts.jsonl");
    std::fs::write(&prompts, records.iter().map(|r| serde_json::to_string(&r["prompt"]).unwrap() + "\n").collect::<String>()).unwrap();
    let features: Vec<String> = meta["settings"]["feature_sets"]["reasoning"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
    let gen = ok(common::bin()
        .args(["generate", "--model", &f.model, "--prompts", &s(&prompts), "--max-new-tokens", "6", "--json",
            "--transcoder", &f.transcoder, "--features", &features.join(","), "--strength", "0.5", "--mode", "replace"])
        .output()
        .unwrap());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&gen.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (rec, line) in records.iter().zip(&lines) {
        assert_eq!(rec["new_tokens"]["Suppressed"], line["new_tokens"], "steer vs generate");
        assert_eq!(rec["generations"]["Suppressed"], line["text"]);
    }

    // Evaluate, and recount accuracy from the JSON by hand.
    let eval_dir = d.join("eval");
    ok(common::bin().args(["evaluate", &s(&results), "--out", &s(&eval_dir)]).output().unwrap());
    let e = common::json(&eval_dir.join("evaluation.json"));
    for cfg in e["configs"].as_array().unwrap() {
        let name = cfg["name"].as_str().unwrap();
        let mut correct = 0;
        for r in &records {
            let g = r["generations"][name].as_str().unwrap().to_lowercase();
            let first = g.split(|c: char| !c.is_alphanumeric()).find(|w| ["yes", "no", "true", "false"].contains(w));
            let truth = r["ground_truth"] == "True";
            if let Some(w) = first {
                if (w == "yes" || w == "true") == truth {
                    correct += 1;
                }
            }
        }
        assert_eq!(cfg["correct"].as_u64().unwrap(), correct, "{name}");
        assert_eq!(cfg["n"].as_u64().unwrap() as usize, records.len());
    }
    assert!(eval_dir.join("evaluation.md").exists() && eval_dir.join("accuracy_vs_strength.png").exists());
}
