//! Shared helpers for the integration tests: where `../shared` is, and reading its references.
#![allow(dead_code)]

use std::path::PathBuf;

/// The shared folder (`NEUROSTEER_SHARED`, default `../shared` beside the checkout), or `None`
/// after printing loudly that the test is skipped.
pub fn shared() -> Option<PathBuf> {
    let dir = std::env::var_os("NEUROSTEER_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if dir.join("fixtures").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "\n*** SKIPPED: shared test data not found at {} (set NEUROSTEER_SHARED) ***\n",
            dir.display()
        );
        None
    }
}

/// Reads a JSON file.
pub fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A JSON array of numbers as f32.
pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// A JSON array of ints as u32.
pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Subtracts the mean (TransformerLens's centred logits).
pub fn centred(v: &[f32]) -> Vec<f32> {
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    v.iter().map(|&x| x - m as f32).collect()
}

/// The neurosteer binary built for the tests.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_neurosteer"))
}

/// Final-position logits of one prompt (no hooks), as f32.
pub fn final_logits(model: &neurosteer::model::Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(1, ids.len());
    let logits = model
        .forward(&[ids.to_vec()], &[vec![true; ids.len()]], &mut cache, &mut neurosteer::hooks::Hooks::none(), neurosteer::model::LogitsAt::Last)
        .unwrap();
    logits.flatten_all().unwrap().to_vec1().unwrap()
}
