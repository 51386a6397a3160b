//! The experiment's shortcuts give what the long way gives: in `delta` mode strength 1 is run
//! once and recorded under both names; yes/no log-likelihoods come from one prefill per prompt;
//! the blocks before the steered layer run once for every configuration; decode steps, which run
//! on the shared thread pool, give each caller the same from several threads at once; a long
//! prefill goes through the transcoder a chunk of positions at a time, each as it would alone.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_nn::ops::log_softmax;
use candle_core::{Device, Tensor};
use neurosteer::generate::{argmax, generate_each, GenerateOptions};
use neurosteer::hooks::{Edit, HookPoint, Hooks};
use neurosteer::model::{LoadOptions, LogitsAt, Model};
use neurosteer::steer::{parse_configs, run_steer, yes_no_loglik, SteerItem, SteerSettings};
use neurosteer::transcoder::splice::{SteerMode, Steering};
use neurosteer::transcoder::Transcoder;

fn stories(shared: &std::path::Path) -> (Model, Arc<Transcoder>) {
    let model = Model::load(shared.join("assets/stories260K/hf").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let tc = Transcoder::load(&shared.join("fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt"), None).unwrap();
    (model, Arc::new(tc))
}

/// Hooks steering every `every`-th of stories260K's 512 features at strength `s` in `mode`.
fn steered(tc: &Arc<Transcoder>, every: usize, s: f64, mode: SteerMode) -> Hooks {
    let mut h = Hooks::none();
    h.edit(Arc::new(Steering::new(tc.clone(), (0..512).step_by(every).collect(), s, mode).unwrap()));
    h
}

/// The log-probability of `cont` after `prompt` from one forward pass over both.
fn full_loglik(model: &Model, prompt: &[u32], cont: &[u32], hooks: &Hooks) -> f64 {
    let seq: Vec<u32> = prompt.iter().chain(cont).copied().collect();
    let mut h = hooks.clone();
    let mut cache = model.new_cache(1, seq.len());
    let logits = model.forward(std::slice::from_ref(&seq), &[vec![true; seq.len()]], &mut cache, &mut h, LogitsAt::All).unwrap();
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
    for hooks in [Hooks::none(), steered(&tc, 7, 2.0, SteerMode::Delta)] {
        for text in ["Once upon a time, was the cat happy? Answer:", "Tom had a ball. Is it red?"] {
            let prompt = model.codec.to_tokens(text).unwrap();
            let got = yes_no_loglik(&model, &prompt, std::slice::from_ref(&hooks)).unwrap().remove(0);
            for answer in ["yes", "no"] {
                let cont = model.codec.tokenizer.encode(&format!(" {answer}")).unwrap();
                assert!(cont.len() > 1, "stories260K spells ` {answer}` with several tokens: the continuation path is tested");
                let want = full_loglik(&model, &prompt, &cont, &hooks);
                assert!((got[answer] - want).abs() < 1e-4, "{text} {answer}: {} vs {want}", got[answer]);
            }
        }
    }
}

/// Greedy tokens the plain way: one prompt at a time, each step through every block from its
/// tokens, stopping after an EOS.
fn greedy(model: &Model, prompt: &[u32], n: usize, hooks: &Hooks) -> Vec<u32> {
    let mut h = hooks.clone();
    let mut cache = model.new_cache(1, prompt.len() + n);
    let mut logits = model.forward(&[prompt.to_vec()], &[vec![true; prompt.len()]], &mut cache, &mut h, LogitsAt::Last).unwrap();
    let mut out = Vec::new();
    while out.len() < n && !out.last().is_some_and(|t| model.info.eos.contains(t)) {
        let t = argmax(&logits).unwrap()[0];
        out.push(t);
        logits = model.forward(&[vec![t]], &[vec![true]], &mut cache, &mut h, LogitsAt::Last).unwrap();
    }
    out
}

/// Configurations generated (or scored) together, the blocks before the first one any of them
/// touches run once for all, give each exactly the tokens it gives the plain way (and the
/// log-likelihoods it gives scored alone): prompts of different lengths (padding) in several
/// batches, a layer steered in the middle (stories260K's transcoder in every mode; a rewritten
/// MLP output in the tiny GPT-2, Gemma-2 and Qwen3), a hook on the embeddings (nothing
/// shared), and no hooks at all (every block shared).
#[test]
fn configurations_sharing_the_early_blocks_equal_each_alone() {
    let Some(shared) = common::shared() else { return };
    let scaled = |point: HookPoint, s: f64| {
        let mut h = Hooks::none();
        h.write(point, Arc::new(move |x: &Tensor| Ok((x * s)?)));
        h
    };
    let (stories, tc) = stories(&shared);
    let steered = |s: f64, mode: SteerMode| steered(&tc, 3, s, mode);
    let modes = vec![Hooks::none(), steered(0.5, SteerMode::Replace), steered(2.0, SteerMode::SeedCompat)];
    let mut models = vec![(stories, [steered(0.5, SteerMode::Delta), steered(3.0, SteerMode::Delta)], Some(modes))];
    for name in ["tiny-gpt2", "tiny-gemma2", "tiny-qwen3"] {
        let model = Model::load(shared.join("fixtures").join(name).to_str().unwrap(), &LoadOptions::default()).unwrap();
        let middle = HookPoint::MlpOut(model.info.n_layers / 2);
        models.push((model, [scaled(middle, 0.5), scaled(middle, 3.0)], None));
    }
    let opts = GenerateOptions { max_new_tokens: 12, batch_size: 3, ..Default::default() };
    for (model, [weak, strong], modes) in models {
        let prompts: Vec<Vec<u32>> = ["Once upon a time", "Tom had a big red ball and a", "The sun", "Lily saw"]
            .iter()
            .map(|t| model.codec.to_tokens(t).unwrap())
            .collect();
        let embed = scaled(HookPoint::Embed, 1.5);
        let sets = [vec![Hooks::none(), weak, strong.clone()], vec![strong, embed], vec![Hooks::none(), Hooks::none()]];
        for set in sets.into_iter().chain(modes) {
            let together = generate_each(&model, &prompts, &opts, &set).unwrap();
            let logliks = yes_no_loglik(&model, &prompts[1], &set).unwrap();
            for ((hooks, got), loglik) in set.iter().zip(&together).zip(&logliks) {
                for (prompt, got) in prompts.iter().zip(got) {
                    assert_eq!(got, &greedy(&model, prompt, opts.max_new_tokens, hooks), "{}", model.info.source);
                }
                assert_eq!(loglik, &yes_no_loglik(&model, &prompts[1], std::slice::from_ref(hooks)).unwrap()[0], "{}", model.info.source);
            }
            assert!(set.len() < 3 || together[2] != together[0], "{}: steering changes nothing", model.info.source);
        }
    }
}

/// Greedy generations run from several threads at once, steered and not, each equal the same
/// run alone: their decode steps run on the shared thread pool, where one caller's step may run
/// inside another's parallel op.
#[test]
fn generations_from_several_threads_at_once_equal_each_alone() {
    let Some(shared) = common::shared() else { return };
    let (model, tc) = stories(&shared);
    let steered = steered(&tc, 3, 2.0, SteerMode::Delta);
    let plain = Hooks::none();
    let jobs: Vec<(Vec<u32>, &Hooks)> = ["Once upon a time", "Tom had a big red ball and a", "The sun", "Lily saw"]
        .iter()
        .flat_map(|t| {
            let prompt = model.codec.to_tokens(t).unwrap();
            [(prompt.clone(), &plain), (prompt, &steered)]
        })
        .collect();
    let alone: Vec<Vec<u32>> = jobs.iter().map(|(p, h)| greedy(&model, p, 16, h)).collect();
    for _ in 0..4 {
        let together: Vec<Vec<u32>> = std::thread::scope(|s| {
            let threads: Vec<_> = jobs.iter().map(|(p, h)| s.spawn(|| greedy(&model, p, 16, h))).collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(together, alone);
    }
}

/// A steering edit reads a prefill of 600 positions (on the CPU, in chunks of 256) and gives
/// every position, in every mode, what that position gets read alone.
#[test]
fn steering_a_long_prefill_equals_each_position_alone() {
    let Some(shared) = common::shared() else { return };
    let (_, tc) = stories(&shared);
    let (batch, seq, d) = (2, 300, tc.meta.d_in);
    let x = Tensor::randn(0f32, 1f32, (batch, seq, d), &Device::Cpu).unwrap();
    for (mode, strength) in [(SteerMode::Delta, 2.0), (SteerMode::Replace, 0.5), (SteerMode::SeedCompat, 2.0)] {
        let steering = Steering::new(tc.clone(), (0..512).step_by(3).collect(), strength, mode).unwrap();
        let point = steering.reads()[0];
        let one_of = |(kept, rewritten): (Option<Tensor>, Option<Tensor>)| {
            assert!(kept.is_some() != rewritten.is_some(), "{mode}: one result per read");
            kept.or(rewritten).unwrap()
        };
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let whole = one_of(steering.read(point, &x).unwrap());
        let n = whole.dim(2).unwrap();
        assert_eq!(whole.dims(), [batch, seq, n], "{mode}");
        for b in 0..batch {
            for t in 0..seq {
                let alone = one_of(steering.read(point, &x.narrow(0, b, 1).unwrap().narrow(1, t, 1).unwrap()).unwrap());
                let got = whole.narrow(0, b, 1).unwrap().narrow(1, t, 1).unwrap();
                let d = common::max_abs_diff(&flat(&got), &flat(&alone));
                assert!(d <= 1e-5, "{mode}: position {t} of sequence {b} differs by {d}");
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

/// A run killed between writing the results and the meta file (or before the first results)
/// resumes and ends with files byte-identical to an uninterrupted run; a live lock holder keeps
/// a second run off the output, a stale lock is taken over.
#[test]
fn resumes_after_a_kill_between_the_two_writes() {
    let Some(shared) = common::shared() else { return };
    let (model, tc) = stories(&shared);
    let splice = neurosteer::transcoder::splice::Splice::new(tc);
    let long = format!("Question: {}?\nAnswer:", "is it so ".repeat(200));
    let items: Vec<SteerItem> = ["Is the sky blue?", "Can a dog fly?", &long, "Do cats sleep?", "Is ice cold?"]
        .iter()
        .enumerate()
        .map(|(i, q)| SteerItem { id: i.to_string(), prompt: if q.starts_with("Question") { q.to_string() } else { format!("Question: {q}\nAnswer:") }, ground_truth: "True".into() })
        .collect();
    let settings = SteerSettings {
        model: "stories260K".into(),
        transcoder: "layer 2".into(),
        layer: 2,
        mode: SteerMode::Delta,
        max_new_tokens: 6,
        batch_size: 2,
        score: "generate".into(),
        dataset: "inline".into(),
        seed: 0,
        configs: parse_configs("Base,Strengthen=3.0").unwrap(),
        feature_sets: BTreeMap::from([("reasoning".to_string(), (0..512).step_by(5).collect())]),
        items,
    };
    let dir = std::env::temp_dir().join(format!("neurosteer-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("results.json");
    let meta = dir.join("results.json.meta.json");
    run_steer(&model, &splice, settings.clone(), &out).unwrap();
    let (want_results, want_meta) = (std::fs::read(&out).unwrap(), std::fs::read(&meta).unwrap());
    let full: serde_json::Value = serde_json::from_slice(&want_results).unwrap();
    let full_meta: serde_json::Value = serde_json::from_slice(&want_meta).unwrap();
    assert_eq!(full_meta["skipped"], serde_json::json!(["2"]), "the long prompt is skipped");

    // Killed after batch k's results were written, before its meta file (k = 0: after the
    // first meta file, before any results).
    for k in 0..=3usize {
        let through = (k * 2).min(5);
        let before = k.saturating_sub(1) * 2;
        let records: Vec<neurosteer::steer::SteerRecord> = full
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["id"].as_u64().unwrap() < through as u64)
            .map(|r| serde_json::from_value(r.clone()).unwrap())
            .collect();
        let mut m = full_meta.clone();
        m["completed"] = before.into();
        m["skipped"] = if before > 2 { serde_json::json!(["2"]) } else { serde_json::json!([]) };
        std::fs::write(&meta, serde_json::to_string_pretty(&m).unwrap()).unwrap();
        if k == 0 {
            std::fs::remove_file(&out).unwrap();
        } else {
            std::fs::write(&out, serde_json::to_string_pretty(&records).unwrap()).unwrap();
        }
        run_steer(&model, &splice, settings.clone(), &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), want_results, "results after a kill at batch {k}");
        assert_eq!(std::fs::read(&meta).unwrap(), want_meta, "meta file after a kill at batch {k}");
    }

    // A live process holds the lock: a clear error. A dead one: taken over.
    let lock = dir.join("results.json.lock");
    std::fs::write(&lock, std::process::id().to_string()).unwrap();
    let e = run_steer(&model, &splice, settings.clone(), &out).unwrap_err().to_string();
    assert!(e.contains("another neurosteer process"), "{e}");
    std::fs::write(&lock, "999999999").unwrap();
    run_steer(&model, &splice, settings.clone(), &out).unwrap();
    assert!(!lock.exists(), "the lock is removed at the end");

    // Tampered results are refused on resume, naming the file.
    type Change = fn(&mut Vec<serde_json::Value>);
    let good: Vec<serde_json::Value> = serde_json::from_slice(&want_results).unwrap();
    let tampered: [(&str, Change); 5] = [
        ("not an item", |r| r[0]["id"] = 99.into()),
        ("prompt and ground truth", |r| r[0]["ground_truth"] = "Banana".into()),
        ("configurations", |r| {
            r[1]["generations"].as_object_mut().unwrap().remove("Strengthen");
        }),
        ("fits the context", |r| {
            r.remove(1);
        }),
        ("outside the vocabulary", |r| r[0]["new_tokens"]["Base"][0] = 1_000_000.into()),
    ];
    for (needle, change) in tampered {
        let mut recs = good.clone();
        change(&mut recs);
        std::fs::write(&out, serde_json::to_string(&recs).unwrap()).unwrap();
        std::fs::write(&meta, &want_meta).unwrap();
        let e = format!("{:#}", run_steer(&model, &splice, settings.clone(), &out).unwrap_err());
        assert!(e.contains("results.json") && e.contains(needle), "{needle}: {e}");
    }
    // evaluate refuses results that are not one experiment.
    let evaluated: [(&str, Change); 3] = [
        ("more than one record", |r| r.push(r[0].clone())),
        ("holds configurations", |r| {
            r[1]["generations"].as_object_mut().unwrap().remove("Strengthen");
        }),
        ("no records", |r| r.clear()),
    ];
    for (needle, change) in evaluated {
        let mut recs = good.clone();
        change(&mut recs);
        std::fs::write(&out, serde_json::to_string(&recs).unwrap()).unwrap();
        let e = format!("{:#}", neurosteer::evaluate::evaluate_file(&out, &dir.join("eval"), None).unwrap_err());
        assert!(e.contains("results.json") && e.contains(needle), "{needle}: {e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
