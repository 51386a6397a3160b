//! Transcoder loading (sae_training .pt, SAELens, own format) against the reference arrays.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use neurosteer::transcoder::Transcoder;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("neurosteer-tc-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn reference(shared: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(shared.join("fixtures/transcoders/reference_arrays.safetensors"), &Device::Cpu)
        .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn stories_l2(shared: &Path) -> PathBuf {
    shared.join("fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt")
}

fn tiny_l1(shared: &Path) -> PathBuf {
    shared.join("fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256.pt")
}

#[test]
fn stories260k_pt_and_saelens_agree_with_reference() {
    let Some(shared) = common::shared() else { return };
    let r = reference(&shared);
    let pt = Transcoder::load(&stories_l2(&shared), None).unwrap();
    let sl = Transcoder::load(&shared.join("fixtures/transcoders/stories260K/layer_02/saelens"), None).unwrap();
    for t in [&pt, &sl] {
        assert_eq!(t.meta.layer, 2);
        assert_eq!(t.meta.hook_in, "blocks.2.ln2.hook_normalized");
        assert_eq!(t.meta.hook_out, "blocks.2.hook_mlp_out");
        assert_eq!((t.meta.d_in, t.meta.d_sae, t.meta.d_out), (64, 512, 64));
        assert_eq!(t.meta.model_name.as_deref(), Some("stories260K"));
    }
    assert_eq!(pt.meta.format, "sae_training");
    assert_eq!(sl.meta.format, "saelens");
    assert_eq!(pt.meta.extra["l1_coefficient"], serde_json::json!(0.05));
    assert_eq!(pt.alive(-6.0).unwrap().len(), 512);
    assert!(sl.log_frequency.is_none());

    let x = &r["stories260K_layer2/ln2_hook_normalized"];
    let f_pt = pt.encode(x).unwrap();
    let f_sl = sl.encode(x).unwrap();
    assert_eq!(f_pt.dims(), &[35, 512]);
    let d = common::max_abs_diff(&flat(&f_pt), &flat(&f_sl));
    assert!(d <= 5e-6, "pt vs saelens features differ by {d}");
    let d = common::max_abs_diff(&flat(&f_pt), &flat(&r["stories260K_layer2/feature_acts"]));
    assert!(d <= 1e-4, "features differ from reference by {d}");
    let want = flat(&r["stories260K_layer2/transcoder_out"]);
    for (name, t, f) in [("pt", &pt, &f_pt), ("saelens", &sl, &f_sl)] {
        let d = common::max_abs_diff(&flat(&t.decode(f).unwrap()), &want);
        assert!(d <= 1e-4, "{name} output differs from reference by {d}");
        let d = common::max_abs_diff(&flat(&t.forward(x).unwrap()), &want);
        assert!(d <= 1e-4, "{name} forward differs from reference by {d}");
    }
    // Leading dims are kept: [1, T, d_in] and [d_in].
    let x3 = x.unsqueeze(0).unwrap();
    assert_eq!(pt.encode(&x3).unwrap().dims(), &[1, 35, 512]);
    let x1 = x.get(3).unwrap();
    let f1 = pt.encode(&x1).unwrap();
    assert_eq!(f1.dims(), &[512]);
    assert_eq!(pt.decode(&f1).unwrap().dims(), &[64]);
    assert!(pt.encode(&f_pt).is_err());
}

#[test]
fn tiny_gpt2_matches_reference() {
    let Some(shared) = common::shared() else { return };
    let r = reference(&shared);
    let t = Transcoder::load(&tiny_l1(&shared), None).unwrap();
    assert_eq!((t.meta.layer, t.meta.d_in, t.meta.d_sae, t.meta.d_out), (1, 64, 256, 64));
    assert_eq!(t.meta.model_name.as_deref(), Some("tiny-gpt2"));
    let alive = t.alive(-6.0).unwrap();
    assert_eq!(alive.len(), 240);
    assert!(alive.iter().all(|&i| i < 240));
    let x = &r["tiny-gpt2_layer1/ln2_hook_normalized"];
    let f = t.encode(x).unwrap();
    let d = common::max_abs_diff(&flat(&f), &flat(&r["tiny-gpt2_layer1/feature_acts"]));
    assert!(d <= 1e-4, "features differ by {d}");
    let d = common::max_abs_diff(&flat(&t.decode(&f).unwrap()), &flat(&r["tiny-gpt2_layer1/transcoder_out"]));
    assert!(d <= 1e-4, "output differs by {d}");
}

#[test]
fn own_format_round_trip_is_exact() {
    let Some(shared) = common::shared() else { return };
    let dir = tmpdir("roundtrip");
    let mut t = Transcoder::load(&tiny_l1(&shared), None).unwrap();
    // Exercise the optional tensors too.
    t.threshold = Some((Tensor::ones(256, candle_core::DType::F32, &Device::Cpu).unwrap() * 0.25).unwrap());
    t.meta.activation = neurosteer::transcoder::Activation::JumpRelu;
    t.w_skip = Some(Tensor::randn(0f32, 1.0, (64, 64), &Device::Cpu).unwrap());
    let p = dir.join("tc.safetensors");
    t.save(&p).unwrap();
    let u = Transcoder::load(&p, None).unwrap();
    assert_eq!(u.meta.format, "neurosteer");
    let mut m = t.meta.clone();
    m.format = "neurosteer".into();
    assert_eq!(u.meta, m);
    let pairs = [
        (&t.w_enc, &u.w_enc),
        (&t.b_enc, &u.b_enc),
        (&t.w_dec, &u.w_dec),
        (&t.b_dec_in, &u.b_dec_in),
        (&t.b_dec_out, &u.b_dec_out),
        (t.threshold.as_ref().unwrap(), u.threshold.as_ref().unwrap()),
        (t.w_skip.as_ref().unwrap(), u.w_skip.as_ref().unwrap()),
    ];
    for (a, b) in pairs {
        assert_eq!(a.dims(), b.dims());
        assert_eq!(flat(a), flat(b));
    }
    assert_eq!(t.log_frequency, u.log_frequency);
    // Saving again over the same path works and leaves no temp file.
    u.save(&p).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(Transcoder::load(&p, None).unwrap().meta, u.meta);
    std::fs::remove_dir_all(&dir).ok();
}

/// What a load would refuse is not saved (NaN weights, TopK with k = 0, a NaN log frequency),
/// and leaves no file; a file whose metadata says TopK with k = 0 is refused at load.
#[test]
fn saving_and_loading_refuse_what_cannot_run() {
    let Some(shared) = common::shared() else { return };
    let dir = tmpdir("refuse");
    let good = Transcoder::load(&tiny_l1(&shared), None).unwrap();
    let p = dir.join("tc.safetensors");
    let save_err = |t: &Transcoder| format!("{:#}", t.save(&p).unwrap_err());
    let mut t = Transcoder::load(&tiny_l1(&shared), None).unwrap();
    t.w_dec = (t.w_dec.clone() / 0.0).unwrap();
    let e = save_err(&t);
    assert!(e.contains("tc.safetensors") && e.contains("not saved") && e.contains("W_dec"), "{e}");
    let mut t = Transcoder::load(&tiny_l1(&shared), None).unwrap();
    t.meta.activation = neurosteer::transcoder::Activation::TopK { k: 0 };
    assert!(save_err(&t).contains("k = 0"));
    let mut t = Transcoder::load(&tiny_l1(&shared), None).unwrap();
    t.log_frequency.as_mut().expect("the fixture has frequencies")[3] = f32::NAN;
    let e = save_err(&t);
    assert!(e.contains("feature 3") && e.contains("NaN"), "{e}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "a refused save left a file");
    // The same file with its metadata edited to TopK, k = 0.
    good.save(&p).unwrap();
    let mut tensors = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = header.metadata().clone().unwrap();
    let key = md.keys().next().unwrap().clone();
    let mut meta: serde_json::Value = serde_json::from_str(&md[&key]).unwrap();
    meta["activation"] = serde_json::json!({"kind": "top_k", "k": 0});
    md.insert(key, meta.to_string());
    let tensors: Vec<(String, Tensor)> = tensors.drain().collect();
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(md), &p).unwrap();
    let e = err_of(Transcoder::load(&p, None));
    assert!(e.contains("tc.safetensors") && e.contains("k = 0"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

fn err_of(r: anyhow::Result<Transcoder>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn corrupt_inputs_give_clean_errors() {
    let Some(shared) = common::shared() else { return };
    let dir = tmpdir("corrupt");

    // Truncated .pt
    let bytes = std::fs::read(stories_l2(&shared)).unwrap();
    let p = dir.join("trunc.pt");
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let e = err_of(Transcoder::load(&p, None));
    assert!(e.contains("trunc.pt"), "{e}");
    assert!(!e.contains('\n'), "{e}");

    // SAELens copy with wrong-shape weights.
    let src = shared.join("fixtures/transcoders/stories260K/layer_02/saelens");
    let sl = dir.join("saelens_bad_shape");
    std::fs::create_dir_all(&sl).unwrap();
    std::fs::copy(src.join("cfg.json"), sl.join("cfg.json")).unwrap();
    let mut w = candle_core::safetensors::load(src.join("sae_weights.safetensors"), &Device::Cpu).unwrap();
    w.insert("W_dec".into(), w["W_dec"].narrow(0, 0, 500).unwrap());
    candle_core::safetensors::save(&w, sl.join("sae_weights.safetensors")).unwrap();
    let e = err_of(Transcoder::load(&sl, None));
    assert!(e.contains("sae_weights.safetensors") && e.contains("W_dec") && e.contains("[500, 64]"), "{e}");

    // cfg.json missing a field.
    let sl2 = dir.join("saelens_no_field");
    std::fs::create_dir_all(&sl2).unwrap();
    std::fs::copy(src.join("sae_weights.safetensors"), sl2.join("sae_weights.safetensors")).unwrap();
    let mut cfg = common::json(&src.join("cfg.json"));
    cfg.as_object_mut().unwrap().remove("d_sae");
    std::fs::write(sl2.join("cfg.json"), cfg.to_string()).unwrap();
    let e = err_of(Transcoder::load(&sl2, None));
    assert!(e.contains("cfg.json") && e.contains("d_sae"), "{e}");

    // cfg.json that says apply_b_dec_to_input.
    cfg["d_sae"] = 512.into();
    cfg["apply_b_dec_to_input"] = true.into();
    std::fs::write(sl2.join("cfg.json"), cfg.to_string()).unwrap();
    let e = err_of(Transcoder::load(&sl2, None));
    assert!(e.contains("apply_b_dec_to_input"), "{e}");

    // Garbage own-format file, and a safetensors file that is not ours.
    let p = dir.join("garbage.safetensors");
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fnope").unwrap();
    let e = err_of(Transcoder::load(&p, None));
    assert!(e.contains("garbage.safetensors"), "{e}");
    let e = err_of(Transcoder::load(&src.join("sae_weights.safetensors"), None));
    assert!(e.contains("not a neurosteer transcoder"), "{e}");

    // Missing file.
    let e = err_of(Transcoder::load(&dir.join("nothing.pt"), None));
    assert!(e.contains("nothing.pt"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Log-frequency files: NaN, and values above 0 (plain frequencies taken for logs would make every
/// feature alive), are refused naming the file; -inf (never fired) is kept.
#[test]
fn bad_log_frequencies_are_refused() {
    let Some(shared) = common::shared() else { return };
    let dir = tmpdir("frequency");
    let mut tc = Transcoder::load(&stories_l2(&shared), None).unwrap();
    let d_sae = tc.meta.d_sae;
    let write = |name: &str, v: Vec<f32>| {
        let p = dir.join(name);
        let t = Tensor::from_vec(v, d_sae, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("sparsity".to_string(), t)]), &p).unwrap();
        p
    };
    let mut logs = vec![-3.0f32; d_sae];
    logs[7] = f32::NEG_INFINITY;
    tc.load_frequency(&write("ok.safetensors", logs.clone())).unwrap();
    assert_eq!(tc.alive(-6.0).unwrap().len(), d_sae - 1);
    let mut nan = logs.clone();
    nan[3] = f32::NAN;
    let e = format!("{:#}", tc.load_frequency(&write("nan.safetensors", nan)).unwrap_err());
    assert!(e.contains("nan.safetensors") && e.contains("feature 3") && e.contains("NaN"), "{e}");
    let plain: Vec<f32> = (0..d_sae).map(|i| (i % 10) as f32 / 10.0).collect();
    let e = format!("{:#}", tc.load_frequency(&write("plain.safetensors", plain)).unwrap_err());
    assert!(e.contains("plain.safetensors") && e.contains("not frequencies"), "{e}");
    // classify's reader: the same checks for a .safetensors and a JSON list.
    let e = format!("{:#}", neurosteer::classify::read_frequency(&dir.join("plain.safetensors")).unwrap_err());
    assert!(e.contains("plain.safetensors") && e.contains("not frequencies"), "{e}");
    std::fs::write(dir.join("plain.json"), "[0.5, 0.25, -3]").unwrap();
    let e = format!("{:#}", neurosteer::classify::read_frequency(&dir.join("plain.json")).unwrap_err());
    assert!(e.contains("plain.json") && e.contains("feature 0"), "{e}");
    assert_eq!(neurosteer::classify::read_frequency(&dir.join("ok.safetensors")).unwrap().len(), d_sae);
    std::fs::remove_dir_all(&dir).ok();
}

/// Activations collected for training (texts in padded batches, the last one cut at the token
/// budget) are those of each text run alone, in the texts' order: exactly with the AVX-512
/// kernels, whose sums do not depend on the number of rows; within 1e-5 of the largest value
/// elsewhere (the other kernels switch to `gemm` above 32 rows).
#[test]
fn collected_activations_are_each_text_alone() {
    let Some(shared) = common::shared() else { return };
    use neurosteer::hooks::{HookPoint, Hooks};
    let model = neurosteer::model::Model::load(shared.join("assets/stories260K/hf").to_str().unwrap(), &neurosteer::model::LoadOptions::default()).unwrap();
    let texts: Vec<String> = ["Once upon a time there was a little dog.", "", "The sun was hot.", "Tom and Lily went to the park to play on the swings and slides.", "She smiled."]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| model.codec.to_tokens(t).unwrap()).collect();
    let layer = 2;
    // The budget ends inside the fourth text.
    let budget = ids[0].len() + ids[1].len() + ids[2].len() + 5;
    let (x, y) = neurosteer::transcoder::train::collect_activations(&model, &texts, layer, budget).unwrap();
    assert_eq!(x.dims(), &[budget, 64]);
    let (mut want_x, mut want_y) = (Vec::new(), Vec::new());
    let mut left = budget;
    for ids in ids.iter().filter(|ids| !ids.is_empty()) {
        let mut hooks = Hooks::none();
        hooks.record(HookPoint::Ln2Normalized(layer));
        hooks.record(HookPoint::MlpOut(layer));
        model.forward(std::slice::from_ref(ids), &[vec![true; ids.len()]], &mut model.new_cache(1, ids.len()), &mut hooks, neurosteer::model::LogitsAt::Last).unwrap();
        let take = ids.len().min(left);
        left -= take;
        want_x.extend(flat(&hooks.recorded(HookPoint::Ln2Normalized(layer)).unwrap().squeeze(0).unwrap().narrow(0, 0, take).unwrap()));
        want_y.extend(flat(&hooks.recorded(HookPoint::MlpOut(layer)).unwrap().squeeze(0).unwrap().narrow(0, 0, take).unwrap()));
    }
    if neurosteer::model::matmul::Packed::supported() {
        assert!(flat(&x) == want_x && flat(&y) == want_y, "batched collection differs from one text at a time");
    } else {
        for (got, want) in [(flat(&x), want_x), (flat(&y), want_y)] {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(common::max_abs_diff(&got, &want) <= 1e-5 * scale, "batched collection differs from one text at a time");
        }
    }
}
