//! Honest discovery: q-values and effect sizes against hand computations, the evidence-ranked
//! selections, the token-injection control recomputed from the traces and a plain forward pass,
//! `steer --features neurons.json:LIST` with random controls, evaluate's numbers recounted from
//! results.json, report.html's sections, and a planted effect that evaluate must find.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("neurosteer-disc-{name}-{}", std::process::id()));
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

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn ids(v: &serde_json::Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// Benjamini–Hochberg by its definition: q_i = min over j with p_j >= p_i of p_j m / rank_j.
fn bh_reference(p: &[f64]) -> Vec<f64> {
    let m = p.len() as f64;
    let rank = |x: f64| p.iter().filter(|&&y| y <= x).count() as f64;
    p.iter().map(|&pi| p.iter().filter(|&&pj| pj >= pi).map(|&pj| pj * m / rank(pj)).fold(1.0, f64::min)).collect()
}

#[test]
fn classify_q_values_effect_sizes_and_selections() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/seed-traces");
    let d = tmpdir("select");
    let run = |select: &str, out: &Path| {
        ok(common::bin()
            .args(["classify", "--traces", &s(&dir), "--frequency", &s(&dir.join("log_feature_sparsity.pt")), "--select", select, "--out", &s(out)])
            .output()
            .unwrap());
        common::json(out)
    };
    let n = run("threshold", &d.join("threshold.json"));
    assert_eq!(n["n_reasoning"], 86, "the default is the original rule");
    let feats = n["features"].as_array().unwrap();
    let alive = ids(&n["alive"]);
    // One family: both styles' p-values of every alive feature.
    let ps: Vec<f64> = alive.iter().flat_map(|&i| [f(&feats[i]["p_0shot"]), f(&feats[i]["p_fewshot"])]).collect();
    let want = bh_reference(&ps);
    for (k, &i) in alive.iter().enumerate() {
        for (j, style) in ["0shot", "fewshot"].iter().enumerate() {
            let got = f(&feats[i][format!("q_{style}")]);
            assert!((got - want[2 * k + j]).abs() < 1e-12, "feature {i} {style}: q {got} vs {}", want[2 * k + j]);
        }
    }
    assert!(feats.iter().filter(|x| x["alive"] == false).all(|x| x["q_0shot"].is_null()), "dead features are not tested");
    // Hedges' g has the sign of Welch's t.
    for &i in &alive {
        let (t, g) = (f(&feats[i]["t_0shot"]), f(&feats[i]["g_0shot"]));
        if t.is_finite() && t != 0.0 {
            assert_eq!(t.signum(), g.signum(), "feature {i}");
        }
    }
    // fdr:Q selects exactly the alive features with t > 0 and q <= Q in some style.
    let fdr = run("fdr:0.05", &d.join("fdr.json"));
    let expect: Vec<usize> = alive
        .iter()
        .copied()
        .filter(|&i| ["0shot", "fewshot"].iter().any(|st| f(&feats[i][format!("t_{st}")]) > 0.0 && f(&feats[i][format!("q_{st}")]) <= 0.05))
        .collect();
    assert_eq!(ids(&fdr["reasoning"]), expect);
    assert_eq!(fdr["thresholds"]["select"], "fdr:0.05");
    let top = run("top:7", &d.join("top.json"));
    assert_eq!(top["n_reasoning"], 7);
    assert_eq!(top["n_memory"].as_u64().unwrap() + 7, alive.len() as u64);
    assert!(d.join("top_volcano.svg").exists() && d.join("top_volcano.png").exists());
    let csv = std::fs::read_to_string(d.join("top.csv")).unwrap();
    assert!(csv.lines().next().unwrap().contains(",q_0shot,q_fewshot,q,g,injection_ratio"));
    // Bad selections are one clear error line.
    let bad = common::bin().args(["classify", "--traces", &s(&dir), "--select", "fdr:2", "--out", &s(&d.join("x.json"))]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--select"));
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

fn load(fx: &Fixture) -> (neurosteer::model::Model, std::sync::Arc<neurosteer::transcoder::Transcoder>) {
    let model = neurosteer::model::Model::load(&fx.model, &neurosteer::model::LoadOptions::default()).unwrap();
    let tc = neurosteer::experiment::load_transcoder_for(&model, Path::new(&fx.transcoder), None).unwrap();
    (model, tc)
}

/// Feature activations `[seq, d_sae]` of `ids` in one plain forward pass.
fn features(model: &neurosteer::model::Model, tc: &neurosteer::transcoder::Transcoder, ids: &[u32]) -> Vec<Vec<f32>> {
    let point = tc.meta.points().unwrap().0;
    let mut hooks = neurosteer::hooks::Hooks::none();
    hooks.record(point);
    let mut cache = model.new_cache(1, ids.len());
    model.forward(&[ids.to_vec()], &[vec![true; ids.len()]], &mut cache, &mut hooks, neurosteer::model::LogitsAt::Last).unwrap();
    tc.encode(&hooks.recorded(point).unwrap().squeeze(0).unwrap()).unwrap().to_vec2::<f32>().unwrap()
}

#[test]
fn injection_control_steer_a_named_list_and_report() {
    let Some(shared) = common::shared() else { return };
    let fx = fixture(&shared);
    let d = tmpdir("inject");
    let traces = d.join("traces");
    ok(common::bin()
        .args(["trace", "--model", &fx.model, "--transcoder", &fx.transcoder, "--dataset", &fx.gsm8k, "--n", "12", "--max-new-tokens", "8",
            "--batch-size", "4", "--truncate-left", "--out", &s(&traces)])
        .output()
        .unwrap());
    let neurons = d.join("neurons.json");
    ok(common::bin().args(["classify", "--traces", &s(&traces), "--inject", "--inject-texts", "4", "--out", &s(&neurons)]).output().unwrap());
    // With another model's tokenizer the traced ids are other tokens: refused, nothing written.
    let other = d.join("other.json");
    let out = common::bin()
        .args(["classify", "--traces", &s(&traces), "--inject", "--inject-texts", "4", "--model", &s(&shared.join("fixtures/tiny-llama3")), "--out", &s(&other)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("another model's tokenizer"), "{err}");
    assert!(!other.exists());
    let n = common::json(&neurons);
    let (reasoning, lexical, nonlexical) = (ids(&n["reasoning"]), ids(&n["lexical"]), ids(&n["reasoning_nonlexical"]));
    let mut union: Vec<usize> = lexical.iter().chain(&nonlexical).copied().collect();
    union.sort_unstable();
    assert_eq!(union, reasoning, "lexical and reasoning_nonlexical split the reasoning set");
    let inj = &n["injection"];
    assert_eq!(inj["n_texts"], 4);
    assert_eq!(inj["cot_styles"], serde_json::json!(["0shot", "fewshot"]));

    // A_cot(t) recounted from the shards: Σ activation at positions holding t / positions holding t.
    let mut sum: HashMap<(usize, u32), f64> = HashMap::new();
    let mut count: HashMap<u32, usize> = HashMap::new();
    for style in ["0shot", "fewshot"] {
        for path in neurosteer::trace::shard_files(&traces.join(style)).unwrap() {
            let sh = neurosteer::trace::read_shard(&path).unwrap();
            for (r, &(_, _, tok)) in sh.rows.iter().enumerate() {
                *count.entry(tok).or_default() += 1;
                for j in sh.offsets[r]..sh.offsets[r + 1] {
                    *sum.entry((sh.features[j] as usize, tok)).or_default() += sh.values[j] as f64;
                }
            }
        }
    }
    let (model, tc) = load(&fx);
    let basic: Vec<String> = neurosteer::trace::shard_files(&traces.join("basic"))
        .unwrap()
        .iter()
        .flat_map(|p| neurosteer::trace::read_shard(p).unwrap().texts.into_iter().map(|t| t.prompt))
        .take(4)
        .collect();
    let tested = inj["features"].as_array().unwrap();
    assert!(!tested.is_empty());
    for (k, feat) in tested.iter().enumerate() {
        let i = feat["index"].as_u64().unwrap() as usize;
        let toks = feat["tokens"].as_array().unwrap();
        assert!(!toks.is_empty() && toks.len() <= 5);
        let mut cot = 0.0;
        let mut inj_sum = 0.0;
        for t in toks {
            let id = t["id"].as_u64().unwrap() as u32;
            let want = sum.get(&(i, id)).copied().unwrap_or(0.0) / count[&id] as f64;
            assert!((f(&t["cot_mean"]) - want).abs() < 1e-9, "feature {i} token {id}");
            assert_eq!(t["cot_count"].as_u64().unwrap() as usize, count[&id]);
            cot += want;
            inj_sum += f(&t["injected_mean"]);
        }
        let ratio = inj_sum / cot;
        assert!((f(&feat["ratio"]) - ratio).abs() < 1e-9 * ratio.abs().max(1.0), "feature {i} ratio");
        assert_eq!(feat["lexical"], ratio >= 0.5);
        assert_eq!(f(&n["features"][i]["injection_ratio"]), f(&feat["ratio"]));
        // A_inj for a few features from plain forward passes (no shared cache).
        if k < 3 {
            for (j, t) in toks.iter().enumerate() {
                let mut total = 0.0;
                for b in &basic {
                    let mut seq = model.codec.to_tokens(b).unwrap();
                    let base = seq.len();
                    seq.extend(toks.iter().map(|t| t["id"].as_u64().unwrap() as u32));
                    total += features(&model, &tc, &seq)[base + j][i] as f64;
                }
                let want = total / basic.len() as f64;
                assert!((f(&t["injected_mean"]) - want).abs() < 1e-4, "feature {i}: injected {} vs {want}", t["injected_mean"]);
            }
        }
    }

    // Steer a named list with five random controls, then evaluate with the classification.
    let results = d.join("results.json");
    ok(common::bin()
        .args(["steer", "--model", &fx.model, "--transcoder", &fx.transcoder, "--features", &format!("{}:reasoning_nonlexical", s(&neurons)),
            "--dataset", &fx.boolq, "--n", "16", "--max-new-tokens", "4", "--batch-size", "8", "--configs", "Base,Suppressed=0.5,Strengthen=2.0",
            "--random-controls", "5", "--score", "both", "--out", &s(&results)])
        .output()
        .unwrap());
    let meta = common::json(&d.join("results.json.meta.json"));
    assert_eq!(ids(&meta["settings"]["feature_sets"]["reasoning"]), nonlexical);
    for k in 1..=5 {
        let ctl = ids(&meta["settings"]["feature_sets"][format!("control{k}")]);
        assert_eq!(ctl.len(), nonlexical.len());
        assert!(ctl.iter().all(|i| reasoning.binary_search(i).is_err()), "controls come from the memory features");
    }
    let missing = common::bin()
        .args(["steer", "--model", &fx.model, "--transcoder", &fx.transcoder, "--features", &format!("{}:nosuchlist", s(&neurons)),
            "--dataset", &fx.boolq, "--n", "2", "--out", &s(&d.join("x.json"))])
        .output()
        .unwrap();
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no \"nosuchlist\" list"));

    let eval_dir = d.join("eval");
    ok(common::bin().args(["evaluate", &s(&results), "--neurons", &s(&neurons), "--out", &s(&eval_dir)]).output().unwrap());
    let e = common::json(&eval_dir.join("evaluation.json"));
    let records: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    recount(&e, &records);
    assert_eq!(e["n_controls"], 5);
    assert_eq!(e["bootstrap"]["resamples"], 10_000);

    let html = std::fs::read_to_string(eval_dir.join("report.html")).unwrap();
    for needle in ["<h2>Settings</h2>", "<h2>Features</h2>", "<h2>Token-injection control</h2>", "<h2>Accuracy</h2>", "<h2>Changes against Base</h2>",
        "<h2>Items that flip</h2>", "percentile", "paired bootstrap", "reasoning_nonlexical", "Volcano"] {
        assert!(html.contains(needle), "report.html lacks {needle}");
    }
    assert!(html.matches("<svg").count() >= 4, "the plots are inlined");
    assert!(!html.contains("src=\"http") && !html.contains("<script"), "self-contained");
}

/// Checks evaluation.json's changes, flips, McNemar counts and control percentiles against a
/// recount from the results.
fn recount(e: &serde_json::Value, records: &[serde_json::Value]) {
    let answer = |r: &serde_json::Value, cfg: &str, score: &str| -> Option<&'static str> {
        if score == "loglik" {
            let l = r["loglik"].get(cfg)?;
            return Some(if f(&l["yes"]) > f(&l["no"]) { "yes" } else { "no" });
        }
        let g = r["generations"].get(cfg)?.as_str()?.to_lowercase();
        Some(match g.split(|c: char| !c.is_alphanumeric()).find(|w| ["yes", "no", "true", "false"].contains(w)) {
            Some("yes") | Some("true") => "yes",
            Some(_) => "no",
            None => "unparsed",
        })
    };
    let comps = e["comparisons"].as_array().unwrap();
    assert!(!comps.is_empty());
    for c in comps {
        let (cfg, score) = (c["config"].as_str().unwrap(), c["score"].as_str().unwrap());
        let (mut right, mut base_right, mut changed, mut plus, mut minus) = (0, 0, 0, 0, 0);
        for r in records {
            let truth = if r["ground_truth"] == "True" { "yes" } else { "no" };
            let (a, b) = (answer(r, cfg, score).unwrap(), answer(r, "Base", score).unwrap());
            right += (a == truth) as usize;
            base_right += (b == truth) as usize;
            changed += (a != b) as usize;
            plus += (a == truth && b != truth) as usize;
            minus += (b == truth && a != truth) as usize;
        }
        let n = records.len() as f64;
        assert_eq!(c["correct"].as_u64().unwrap() as usize, right, "{cfg} {score}");
        assert!((f(&c["delta"]) - (right as f64 - base_right as f64) / n).abs() < 1e-12);
        assert!(f(&c["ci_low"]) <= f(&c["delta"]) + 1e-12 && f(&c["delta"]) <= f(&c["ci_high"]) + 1e-12);
        assert_eq!((c["changed"].as_u64().unwrap(), c["to_correct"].as_u64().unwrap(), c["to_wrong"].as_u64().unwrap()), (changed as u64, plus as u64, minus as u64));
        let flips = e["flips"].as_array().unwrap().iter().filter(|x| x["config"] == cfg && x["score"] == score).count();
        assert_eq!(flips, changed);
        if let Some(ctl) = c["controls"].as_object() {
            let deltas: Vec<f64> = comps
                .iter()
                .filter(|o| o["feature_set"].as_str().unwrap().starts_with("control") && o["strength"] == c["strength"] && o["score"] == c["score"])
                .map(|o| f(&o["delta"]))
                .collect();
            assert_eq!(deltas.len(), 5);
            let dr = f(&c["delta"]);
            let pct = 100.0 * (deltas.iter().filter(|&&x| x < dr).count() as f64 + 0.5 * deltas.iter().filter(|&&x| x == dr).count() as f64) / 5.0;
            assert!((f(&ctl["percentile"]) - pct).abs() < 1e-9);
            let p = (1.0 + deltas.iter().filter(|x| x.abs() >= dr.abs()).count() as f64) / 6.0;
            assert!((f(&ctl["p_empirical"]) - p).abs() < 1e-9);
        }
    }
}

/// A planted effect: the 10 features that, steered alone (strength 8 or -8, whichever direction
/// works better), raise " yes" over " no" most where a few prompts end, steered together on items
/// whose answer is yes (which the base model answers no). On stories260K it is -8: accuracy
/// +0.38, bootstrap interval above 0, McNemar p 0.002, every control +0. Evaluate must find the change, above every
/// random control, and the controls must not show one; otherwise a null result means nothing.
#[test]
fn positive_control_is_detected_and_random_controls_are_not() {
    let Some(shared) = common::shared() else { return };
    let fx = fixture(&shared);
    let d = tmpdir("positive");
    let items: Vec<serde_json::Value> = std::fs::read_to_string(&fx.boolq)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["answer"] == true && v["passage"].as_str().unwrap().len() < 700)
        .take(30)
        .collect();
    let data = d.join("yes.jsonl");
    std::fs::write(&data, items.iter().map(|v| v.to_string() + "\n").collect::<String>()).unwrap();

    // Each feature that fires where the first prompts end, steered alone: how much it raises
    // log p(" yes") − log p(" no") there. The 10 that raise it most are the planted set.
    let (model, tc) = load(&fx);
    let prompts: Vec<Vec<u32>> = items
        .iter()
        .take(4)
        .map(|v| model.codec.to_tokens(&format!("Question: {}\nPassage: {}\nAnswer:", v["question"].as_str().unwrap(), v["passage"].as_str().unwrap())).unwrap())
        .collect();
    let margin = |hooks: &neurosteer::hooks::Hooks| -> f64 {
        prompts.iter().map(|p| {
            let l = neurosteer::steer::yes_no_loglik(&model, p, std::slice::from_ref(hooks)).unwrap().remove(0);
            l["yes"] - l["no"]
        }).sum::<f64>()
    };
    let base = margin(&neurosteer::hooks::Hooks::none());
    let mut active = vec![0f32; tc.meta.d_sae];
    for p in &prompts {
        for (a, v) in active.iter_mut().zip(features(&model, &tc, p).pop().unwrap()) {
            *a += v;
        }
    }
    // Both directions: strength 8 adds 7 times a feature's output, -8 subtracts 9 times it.
    let gains_at = |strength: f64| -> Vec<(usize, f64)> {
        let mut g: Vec<(usize, f64)> = (0..active.len())
            .filter(|&i| active[i] > 0.0)
            .map(|i| {
                let mut hooks = neurosteer::hooks::Hooks::none();
                let edit = neurosteer::transcoder::splice::Steering::new(tc.clone(), vec![i], strength, neurosteer::transcoder::splice::SteerMode::Delta).unwrap();
                hooks.edit(std::sync::Arc::new(edit));
                (i, margin(&hooks) - base)
            })
            .collect();
        g.sort_by(|a, b| b.1.total_cmp(&a.1));
        g.truncate(10);
        g
    };
    let (up, down) = (gains_at(8.0), gains_at(-8.0));
    let total = |g: &[(usize, f64)]| g.iter().map(|x| x.1).sum::<f64>();
    eprintln!("gains at 8: {up:?}\ngains at -8: {down:?}");
    let (strength, gains) = if total(&up) >= total(&down) { ("8", up) } else { ("-8", down) };
    let chosen: Vec<usize> = gains.iter().map(|g| g.0).collect();
    let features_file = d.join("planted.json");
    std::fs::write(&features_file, serde_json::to_string(&chosen).unwrap()).unwrap();

    let results = d.join("results.json");
    ok(common::bin()
        .args(["steer", "--model", &fx.model, "--transcoder", &fx.transcoder, "--features", &s(&features_file), "--dataset", &s(&data),
            "--no-shuffle", "--n", "30", "--configs", &format!("Base,Push={strength}"), "--random-controls", "5", "--score", "loglik", "--out", &s(&results)])
        .output()
        .unwrap());
    let eval_dir = d.join("eval");
    ok(common::bin().args(["evaluate", &s(&results), "--out", &s(&eval_dir)]).output().unwrap());
    let e = common::json(&eval_dir.join("evaluation.json"));
    let comps = e["comparisons"].as_array().unwrap();
    let set = comps.iter().find(|c| c["config"] == "Push").unwrap();
    eprintln!("planted: {set}");
    assert!(f(&set["base_accuracy"]) < 0.5, "the base model should mostly answer no here: {}", set["base_accuracy"]);
    assert!(f(&set["ci_low"]) > 0.0 && f(&set["p_mcnemar"]) < 0.01, "the planted effect is detected: {set}");
    let ctl = &set["controls"];
    assert_eq!(ctl["k"], 5);
    assert_eq!(f(&ctl["percentile"]), 100.0);
    assert!(f(&ctl["max"]) < f(&set["delta"]));
    for c in comps.iter().filter(|c| c["feature_set"].as_str().unwrap().starts_with("control")) {
        assert!(f(&c["p_mcnemar"]) > 0.05, "a random control looks significant: {c}");
    }
}
