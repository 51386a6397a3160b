//! The torch.save reader against the shared fixtures, plus corrupted inputs.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use neurosteer::pickle::{self, parse_pickle, Value};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("neurosteer-pickle-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a stored zip with the given entries.
fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        z.start_file(*name, opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn seed_traces_match_expected() {
    let Some(shared) = common::shared() else { return };
    let dir = shared.join("fixtures/seed-traces");
    let expected = common::json(&dir.join("expected.json"));
    for ty in ["basic", "0shot", "fewshot"] {
        let mut sum = vec![0f64; 512];
        let mut first = vec![0f64; 512];
        let mut last = vec![0f64; 512];
        let (mut n_vectors, mut n_texts) = (0usize, 0usize);
        for file in expected["files"][ty].as_array().unwrap() {
            let traces = pickle::read_seed_traces(dir.join(file.as_str().unwrap())).unwrap();
            assert_eq!(traces.len(), 16);
            for (_, steps) in &traces {
                n_texts += 1;
                let keys: Vec<i64> = steps.iter().map(|s| s.0).collect();
                assert_eq!(keys, (0..steps.len() as i64).collect::<Vec<_>>(), "insertion order");
                for (_, v) in steps {
                    assert_eq!(v.len(), 512);
                    n_vectors += 1;
                    for (s, x) in sum.iter_mut().zip(v) {
                        *s += *x as f64;
                    }
                }
                for (s, x) in first.iter_mut().zip(&steps[0].1) {
                    *s += *x as f64;
                }
                for (s, x) in last.iter_mut().zip(&steps[steps.len() - 1].1) {
                    *s += *x as f64;
                }
            }
        }
        assert_eq!(n_vectors as u64, expected["n_vectors"][ty].as_u64().unwrap(), "{ty}");
        assert_eq!(n_texts as u64, expected["n_texts"][ty].as_u64().unwrap(), "{ty}");
        let f = |v: &[f64], n: usize| v.iter().map(|x| (x / n as f64) as f32).collect::<Vec<f32>>();
        let m = &expected["means"][ty];
        let d = common::max_abs_diff(&f(&sum, n_vectors), &common::f32s(&m["mean"]));
        assert!(d <= 1e-6, "{ty} mean differs by {d}");
        let d = common::max_abs_diff(&f(&first, n_texts), &common::f32s(&m["first"]));
        assert!(d <= 1e-6, "{ty} first differs by {d}");
        let d = common::max_abs_diff(&f(&last, n_texts), &common::f32s(&m["last"]));
        assert!(d <= 1e-6, "{ty} last differs by {d}");
    }
}

#[test]
fn batch1_shares_one_storage_with_offsets() {
    let Some(shared) = common::shared() else { return };
    let pt = pickle::load_pt(shared.join("fixtures/seed-traces/basic/1_basic_feature_traces.pt")).unwrap();
    let (_, steps) = &pt.root.as_dict().unwrap()[0];
    let refs: Vec<_> = steps.as_dict().unwrap().iter().map(|(_, t)| t.as_tensor().unwrap().clone()).collect();
    assert!(refs.len() >= 3);
    for (k, r) in refs.iter().enumerate() {
        assert_eq!(r.storage_key, refs[0].storage_key);
        assert_eq!(r.offset, k * 512);
        assert_eq!(r.shape, vec![512]);
    }
}

#[test]
fn log_feature_sparsity_files() {
    let Some(shared) = common::shared() else { return };
    let (v, shape) = pickle::read_bare_tensor(shared.join("fixtures/seed-traces/log_feature_sparsity.pt")).unwrap();
    assert_eq!(shape, vec![512]);
    assert_eq!(v[295], -6.0);
    assert_eq!(v[497], -6.001f32);
    assert_eq!(v[389], -5.999f32);
    let expected = common::json(&shared.join("fixtures/seed-traces/expected.json"));
    let alive = v.iter().filter(|&&x| x > -6.0).count();
    assert_eq!(alive as u64, expected["n_alive"].as_u64().unwrap());

    let t = shared.join("fixtures/transcoders/tiny-gpt2/layer_01/tiny-gpt2_blocks.1.ln2.hook_normalized_256_log_feature_sparsity.pt");
    let (v, shape) = pickle::read_bare_tensor(t).unwrap();
    assert_eq!(shape, vec![256]);
    assert_eq!(v.iter().filter(|&&x| x == -10.0).count(), 16);
    assert_eq!(v.iter().filter(|&&x| x > -6.0).count(), 240);
}

#[test]
fn transcoder_pt_cfg_fields() {
    let Some(shared) = common::shared() else { return };
    let pt = pickle::load_pt(
        shared.join("fixtures/transcoders/stories260K/layer_02/stories260K_blocks.2.ln2.hook_normalized_512.pt"),
    )
    .unwrap();
    let cfg = pt.root.get("cfg").unwrap();
    let Value::Build { obj, .. } = cfg else { panic!("cfg is not a Build: {cfg:?}") };
    let Value::Reduce { callable, .. } = &**obj else { panic!() };
    assert_eq!(
        **callable,
        Value::Global { module: "sae_training.config".into(), name: "LanguageModelSAERunnerConfig".into() }
    );
    assert_eq!(cfg.get("model_name").unwrap().as_str(), Some("stories260K"));
    assert_eq!(cfg.get("hook_point").unwrap().as_str(), Some("blocks.2.ln2.hook_normalized"));
    assert_eq!(cfg.get("out_hook_point").unwrap().as_str(), Some("blocks.2.hook_mlp_out"));
    assert_eq!(cfg.get("hook_point_layer").unwrap().as_int(), Some(2));
    assert_eq!(cfg.get("d_in").unwrap().as_int(), Some(64));
    assert_eq!(cfg.get("d_sae").unwrap().as_int(), Some(512));
    assert_eq!(cfg.get("is_transcoder").unwrap().as_bool(), Some(true));
    assert_eq!(cfg.get("l1_coefficient").unwrap().as_f64(), Some(0.05));
    assert_eq!(cfg.get("dtype").unwrap(), &Value::Global { module: "torch".into(), name: "float32".into() });
    let sd = pt.root.get("state_dict").unwrap().as_dict().unwrap();
    let keys: Vec<_> = sd.iter().map(|(k, _)| k.as_str().unwrap()).collect();
    assert_eq!(keys, ["W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out"]);
    let (w, shape) = pt.named_tensor(Some("state_dict"), "W_enc").unwrap();
    assert_eq!(shape, vec![64, 512]);
    assert_eq!(w.len(), 64 * 512);
}

fn assert_clean_err<T>(r: anyhow::Result<T>, path: &Path, needle: &str) {
    let Err(e) = r else { panic!("expected an error for {}", path.display()) };
    let msg = format!("{e:#}");
    assert!(msg.contains(&path.display().to_string()), "error does not name the file: {msg}");
    assert!(msg.contains(needle), "error {msg:?} lacks {needle:?}");
}

#[test]
fn corrupt_files_give_errors() {
    let Some(shared) = common::shared() else { return };
    let src = shared.join("fixtures/seed-traces/basic/1_basic_feature_traces.pt");
    let bytes = std::fs::read(&src).unwrap();
    let dir = tmpdir("corrupt");

    // Truncated at many points: never a panic, always an error naming the file.
    for cut in [3, 4, 30, 100, bytes.len() / 2, bytes.len() - 30, bytes.len() - 1] {
        let p = dir.join(format!("trunc_{cut}.pt"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert_clean_err(pickle::read_seed_traces(&p), &p, "");
    }
    // Garbage.
    let p = dir.join("garbage.pt");
    std::fs::write(&p, b"this is not a zip file at all").unwrap();
    assert_clean_err(pickle::load_pt(&p), &p, "not a torch.save zip");
    // Legacy pickle (starts with PROTO).
    let p = dir.join("legacy.pt");
    std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
    assert_clean_err(pickle::load_pt(&p), &p, "legacy");
    // Zip magic followed by garbage.
    let p = dir.join("badzip.pt");
    std::fs::write(&p, b"PK\x03\x04garbage garbage garbage").unwrap();
    assert_clean_err(pickle::load_pt(&p), &p, "");
    // A zip without data.pkl.
    let p = dir.join("nopkl.pt");
    write_zip(&p, &[("a/other", b"x")]);
    assert_clean_err(pickle::load_pt(&p), &p, "data.pkl");
    // Unknown opcode (0x53 = 'S', STRING, protocol 0).
    let p = dir.join("opcode.pt");
    write_zip(&p, &[("a/data.pkl", b"\x80\x02}q\x00S'x'\n.")]);
    assert_clean_err(pickle::load_pt(&p), &p, "unsupported pickle opcode 0x53 at byte 5");
    // Storage too small for the tensor.
    let pkl = std::fs::read(shared.join("fixtures/seed-traces/log_feature_sparsity.pt")).unwrap();
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(pkl)).unwrap();
    let name = z.file_names().find(|n| n.ends_with("data.pkl")).unwrap().to_string();
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut z.by_name(&name).unwrap(), &mut data).unwrap();
    let p = dir.join("short_storage.pt");
    let storage = name.replace("data.pkl", "data/0");
    write_zip(&p, &[(name.as_str(), data.as_slice()), (storage.as_str(), &[0u8; 16][..])]);
    assert_clean_err(pickle::read_bare_tensor(&p), &p, "storage");
    // Every single-byte flip of the trace pickle parses or errors, never panics.
    let mut flipped = 0;
    let pkl_bytes = {
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes.clone())).unwrap();
        let name = z.file_names().find(|n| n.ends_with("data.pkl")).unwrap().to_string();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut z.by_name(&name).unwrap(), &mut v).unwrap();
        v
    };
    for i in (0..pkl_bytes.len()).step_by(7) {
        let mut b = pkl_bytes.clone();
        b[i] ^= 0x5a;
        if parse_pickle(&b).is_err() {
            flipped += 1;
        }
        let _ = parse_pickle(&pkl_bytes[..i]);
    }
    assert!(flipped > 0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn pickle_machine_semantics() {
    // Memo shares the object: an empty dict memoised, filled, then fetched again is filled.
    // PROTO 2; EMPTY_LIST; BINPUT 0; EMPTY_DICT; BINPUT 1; 'k'; 1; SETITEM; APPEND; BINGET 1; APPEND; STOP
    let p = b"\x80\x02]q\x00}q\x01X\x01\x00\x00\x00kK\x01sah\x01a.";
    let v = parse_pickle(p).unwrap();
    let Value::List(items) = v else { panic!() };
    assert_eq!(items[0], items[1]);
    assert_eq!(items[1].get("k"), Some(&Value::Int(1)));
    // LONG1 negative, BINFLOAT, protocol-4 bits.
    let p = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00(\x8a\x02\x00\xffG?\xf0\x00\x00\x00\x00\x00\x00\x8c\x01a\x94\x8c\x01b\x93t.";
    let v = parse_pickle(p).unwrap();
    assert_eq!(
        v,
        Value::Tuple(vec![
            Value::Int(-256),
            Value::Float(1.0),
            Value::Global { module: "a".into(), name: "b".into() }
        ])
    );
    // Self-reference and deep nesting: errors, no stack overflow.
    assert!(parse_pickle(b"]q\x00h\x00a.").is_err());
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 200_000));
    deep.extend(std::iter::repeat_n(b'a', 199_999));
    deep.push(b'.');
    assert!(parse_pickle(&deep).is_err());
    // Stack underflow, missing memo, no STOP.
    assert!(parse_pickle(b"\x80\x02t.").is_err());
    assert!(parse_pickle(b"\x80\x02h\x05.").is_err());
    assert!(parse_pickle(b"\x80\x02N").is_err());
    assert!(parse_pickle(b"").is_err());
}

/// Small hostile pickles stop with an error instead of exhausting memory: megabytes of NONE
/// opcodes, and a "billion laughs" of tuples that each hold the previous one ten times.
#[test]
fn hostile_pickles_are_bounded() {
    let mut nones = vec![0x80, 2];
    nones.extend(std::iter::repeat_n(b'N', 5_000_000));
    nones.push(b'.');
    let e = neurosteer::pickle::parse_pickle(&nones).unwrap_err().to_string();
    assert!(e.contains("more than"), "{e}");

    // PROTO 2; ] BINPUT 0; then per level: MARK, 10 × BINGET prev, TUPLE, BINPUT next; STOP.
    let mut laughs = vec![0x80, 2, b']', b'q', 0];
    for level in 1..=12u8 {
        laughs.push(b'(');
        for _ in 0..10 {
            laughs.extend([b'h', level - 1]);
        }
        laughs.extend([b't', b'q', level]);
    }
    laughs.push(b'.');
    assert!(laughs.len() < 400);
    let e = neurosteer::pickle::parse_pickle(&laughs).unwrap_err().to_string();
    assert!(e.contains("more than"), "{e}");
}
