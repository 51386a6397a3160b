//! Readers and the writer for the on-disk transcoder formats.
//!
//! * **sae_training** `.pt` (transcoder_circuits): `{"cfg": dataclass, "state_dict": {W_enc,
//!   b_enc, W_dec, b_dec (input centring), b_dec_out}}`, with `{stem}_log_feature_sparsity.pt`
//!   beside it.
//! * **SAELens** folder: `cfg.json` + `sae_weights.safetensors` (`b_dec` is the *output* bias,
//!   no input centring), optional `sparsity.safetensors`.
//! * **neurosteer**: one `.safetensors` with `W_enc, b_enc, W_dec, b_dec_in, b_dec_out`
//!   (+ `threshold`, `W_skip`, `log_frequency`) and the [`TranscoderMeta`] as JSON under the
//!   `__metadata__` key [`META_KEY`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value as J};

use super::{file_err, layer_from_hook, Activation, Transcoder, TranscoderMeta};
use crate::pickle::{self, Value};

/// `__metadata__` key holding the JSON meta in neurosteer's own format.
pub const META_KEY: &str = "neurosteer_transcoder";

/// Checks a tensor's shape, with a one-line error naming the file and the tensor.
fn check_shape(file: &Path, name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(file_err(file, format!("tensor {name} has shape {:?}, expected {expected:?}", t.dims())));
    }
    Ok(())
}

/// Checks the shapes of every tensor against the meta.
fn check_all(file: &Path, t: &Transcoder) -> Result<()> {
    let m = &t.meta;
    check_shape(file, "W_enc", &t.w_enc, &[m.d_in, m.d_sae])?;
    check_shape(file, "b_enc", &t.b_enc, &[m.d_sae])?;
    check_shape(file, "W_dec", &t.w_dec, &[m.d_sae, m.d_out])?;
    check_shape(file, "b_dec_in", &t.b_dec_in, &[m.d_in])?;
    check_shape(file, "b_dec_out", &t.b_dec_out, &[m.d_out])?;
    if let Some(th) = &t.threshold {
        check_shape(file, "threshold", th, &[m.d_sae])?;
    }
    let jump = matches!(m.activation, Activation::JumpRelu | Activation::JumpReluNonNegative);
    if jump != t.threshold.is_some() {
        return Err(file_err(file, format!("activation {} {} a threshold tensor", m.activation, if jump { "needs" } else { "takes no" })));
    }
    if let Some(ws) = &t.w_skip {
        check_shape(file, "W_skip", ws, &[m.d_out, m.d_in])?;
    }
    if m.activation == (Activation::TopK { k: 0 }) {
        return Err(file_err(file, "activation TopK with k = 0 keeps no feature (k must be at least 1)"));
    }
    if let Some(lf) = &t.log_frequency {
        if lf.len() != m.d_sae {
            return Err(file_err(file, format!("log_frequency has {} values, expected {}", lf.len(), m.d_sae)));
        }
        check_log_frequency(file, lf.clone())?;
    }
    Ok(())
}

fn usize_of(v: i64, file: &Path, field: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| file_err(file, format!("cfg field {field} = {v} is negative")))
}

// ---------------------------------------------------------------------------------------------
// sae_training .pt

/// cfg fields consumed into [`TranscoderMeta`] (everything else JSON-able goes to `extra`).
const PT_CONSUMED: &[&str] = &[
    "hook_point", "out_hook_point", "hook_point_layer", "d_in", "d_out", "d_sae", "is_transcoder", "model_name",
];

/// Loads a sae_training `.pt` transcoder, plus `{stem}_log_feature_sparsity.pt` when it lies beside it.
pub fn load_sae_training(path: &Path) -> Result<Transcoder> {
    let pt = pickle::load_pt(path)?;
    let cfg = pt.root.get("cfg").ok_or_else(|| file_err(path, "no \"cfg\" at the top level"))?;
    let field = |k: &str| cfg.get(k);
    let int = |k: &str| -> Result<i64> {
        field(k)
            .and_then(Value::as_int)
            .ok_or_else(|| file_err(path, format!("cfg field {k} is missing or not an integer")))
    };
    let string = |k: &str| -> Result<String> {
        field(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| file_err(path, format!("cfg field {k} is missing or not a string")))
    };
    match field("is_transcoder").and_then(Value::as_bool) {
        Some(true) => {}
        _ => return Err(file_err(path, "not a transcoder (cfg.is_transcoder is not True)")),
    }
    let hook_in = string("hook_point")?;
    let hook_out = string("out_hook_point")?;
    let layer = match field("hook_point_layer").and_then(Value::as_int) {
        Some(l) => usize_of(l, path, "hook_point_layer")?,
        None => layer_from_hook(&hook_in)
            .ok_or_else(|| file_err(path, format!("no hook_point_layer and no layer in hook {hook_in:?}")))?,
    };
    let d_in = usize_of(int("d_in")?, path, "d_in")?;
    let d_sae = match field("d_sae").and_then(Value::as_int) {
        Some(d) => usize_of(d, path, "d_sae")?,
        None => d_in * usize_of(int("expansion_factor")?, path, "expansion_factor")?,
    };
    let d_out = match field("d_out").and_then(Value::as_int) {
        Some(d) => usize_of(d, path, "d_out")?,
        None => d_in,
    };
    let model_name = field("model_name").and_then(Value::as_str).map(str::to_string);
    let mut extra = Map::new();
    if let Value::Build { state, .. } = cfg {
        for (k, v) in state.as_dict().unwrap_or(&[]) {
            let Some(k) = k.as_str() else { continue };
            if PT_CONSUMED.contains(&k) {
                continue;
            }
            if let Some(j) = v.to_json() {
                extra.insert(k.to_string(), j);
            }
        }
    }

    let tensor = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let (data, dims) = pt.named_tensor(Some("state_dict"), name)?;
        if dims != shape {
            return Err(file_err(path, format!("tensor {name} has shape {dims:?}, expected {shape:?}")));
        }
        Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
    };
    let mut t = Transcoder {
        w_enc: tensor("W_enc", &[d_in, d_sae])?,
        b_enc: tensor("b_enc", &[d_sae])?,
        w_dec: tensor("W_dec", &[d_sae, d_out])?,
        w_dec_next: Vec::new(),
        b_dec_in: tensor("b_dec", &[d_in])?,
        b_dec_out: tensor("b_dec_out", &[d_out])?,
        threshold: None,
        w_skip: None,
        log_frequency: None,
        meta: TranscoderMeta {
            layer,
            hook_in,
            hook_out,
            d_in,
            d_sae,
            d_out,
            format: "sae_training".into(),
            activation: Activation::Relu,
            model_name,
            extra,
        },
    };
    if let Some(freq) = sparsity_beside(path) {
        t.load_frequency(&freq)?;
    }
    Ok(t)
}

/// `{stem}_log_feature_sparsity.pt` next to a `.pt` file, if it exists.
fn sparsity_beside(path: &Path) -> Option<PathBuf> {
    let stem = path.file_stem()?.to_str()?;
    let p = path.with_file_name(format!("{stem}_log_feature_sparsity.pt"));
    p.is_file().then_some(p)
}

/// Reads a log10 frequency vector from a bare-tensor `.pt` or a `.safetensors` file, checked by
/// [`check_log_frequency`].
pub fn read_frequency(path: &Path) -> Result<Vec<f32>> {
    check_log_frequency(path, read_frequency_values(path)?)
}

/// The vector of a frequency file, unchecked.
pub fn read_frequency_values(path: &Path) -> Result<Vec<f32>> {
    if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        let (tensors, _) = read_safetensors(path)?;
        let t = tensors
            .get("sparsity")
            .or_else(|| tensors.get("log_frequency"))
            .or_else(|| if tensors.len() == 1 { tensors.values().next() } else { None })
            .ok_or_else(|| file_err(path, "no tensor \"sparsity\" or \"log_frequency\""))?;
        if t.rank() != 1 {
            return Err(file_err(path, format!("frequency tensor has shape {:?}, expected [d_sae]", t.dims())));
        }
        return Ok(t.to_vec1::<f32>()?);
    }
    let (data, shape) = pickle::read_bare_tensor(path)?;
    if shape.len() != 1 {
        return Err(file_err(path, format!("frequency tensor has shape {shape:?}, expected [d_sae]")));
    }
    Ok(data)
}

/// Refuses what cannot be a log10 firing frequency: NaN, and values above 0 (a frequency above 1;
/// plain frequencies or densities read as logs would make every feature look alive). `-inf`
/// (never fired) is kept.
pub fn check_log_frequency(path: &Path, v: Vec<f32>) -> Result<Vec<f32>> {
    if let Some(i) = v.iter().position(|x| x.is_nan()) {
        return Err(file_err(path, format!("log10 frequency of feature {i} is NaN")));
    }
    if let Some(i) = v.iter().position(|&x| x > 1e-6) {
        return Err(file_err(
            path,
            format!("log10 frequency of feature {i} is {} (above 0, a frequency above 1): expected log10 frequencies, not frequencies", v[i]),
        ));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// safetensors helpers

/// Reads every tensor (as f32 on CPU) and the `__metadata__` of a safetensors file.
fn read_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| file_err(path, format!("bad safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let raw = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| file_err(path, format!("bad safetensors file: {e}")))?;
    let mut out = HashMap::with_capacity(raw.len());
    for (k, t) in raw {
        if !t.dtype().is_float() {
            return Err(file_err(path, format!("tensor {k} has dtype {:?}; transcoder tensors are floating point", t.dtype())));
        }
        let t = t.to_dtype(DType::F32).map_err(|e| file_err(path, format!("tensor {k}: {e}")))?;
        out.insert(k, t);
    }
    Ok((out, meta))
}

fn take(path: &Path, tensors: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    tensors.remove(name).ok_or_else(|| file_err(path, format!("missing tensor {name}")))
}

// ---------------------------------------------------------------------------------------------
// SAELens folder

/// cfg.json fields consumed into [`TranscoderMeta`] (everything else goes to `extra`).
const SAELENS_CONSUMED: &[&str] = &["d_in", "d_sae", "d_out", "hook_name", "hook_name_out", "model_name"];

/// Loads a SAELens transcoder folder (`cfg.json` + `sae_weights.safetensors`, optional
/// `sparsity.safetensors`).
pub fn load_saelens(dir: &Path) -> Result<Transcoder> {
    let cfg_path = dir.join("cfg.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e))?;
    let cfg: J = serde_json::from_str(&text).map_err(|e| file_err(&cfg_path, format!("bad JSON: {e}")))?;
    let obj = cfg.as_object().ok_or_else(|| file_err(&cfg_path, "not a JSON object"))?;
    let metadata = obj.get("metadata").and_then(J::as_object);
    // A field from `metadata` (SAELens >= 6) or the top level (older files).
    let lookup = |k: &str| metadata.and_then(|m| m.get(k)).or_else(|| obj.get(k));
    let size = |k: &str| -> Result<usize> {
        obj.get(k)
            .and_then(J::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| file_err(&cfg_path, format!("field {k} is missing or not a non-negative integer")))
    };
    let string = |k: &str| -> Result<String> {
        lookup(k)
            .and_then(J::as_str)
            .map(str::to_string)
            .ok_or_else(|| file_err(&cfg_path, format!("field {k} (or metadata.{k}) is missing or not a string")))
    };
    let d_in = size("d_in")?;
    let d_sae = size("d_sae")?;
    let d_out = size("d_out")?;
    let architecture = obj
        .get("architecture")
        .and_then(J::as_str)
        .ok_or_else(|| file_err(&cfg_path, "field architecture is missing or not a string"))?
        .to_string();
    let (jumprelu, skip) = match architecture.as_str() {
        "transcoder" => (false, false),
        "jumprelu_transcoder" => (true, false),
        "skip_transcoder" => (false, true),
        "jumprelu_skip_transcoder" => (true, true),
        other => return Err(file_err(&cfg_path, format!("not a transcoder (architecture {other:?})"))),
    };
    if obj.get("apply_b_dec_to_input").and_then(J::as_bool) == Some(true) {
        return Err(file_err(&cfg_path, "apply_b_dec_to_input is true, which transcoders do not support"));
    }
    let hook_in = string("hook_name")?;
    let hook_out = string("hook_name_out")?;
    let layer = match layer_from_hook(&hook_in) {
        Some(l) => l,
        None => lookup("hook_layer")
            .and_then(J::as_u64)
            .map(|l| l as usize)
            .ok_or_else(|| file_err(&cfg_path, format!("cannot tell the layer from hook {hook_in:?}")))?,
    };
    let model_name = lookup("model_name").and_then(J::as_str).map(str::to_string);
    let mut extra = Map::new();
    for (k, v) in obj {
        if !SAELENS_CONSUMED.contains(&k.as_str()) {
            extra.insert(k.clone(), v.clone());
        }
    }

    let wpath = dir.join("sae_weights.safetensors");
    let (mut w, _) = read_safetensors(&wpath)?;
    let w_enc = take(&wpath, &mut w, "W_enc")?;
    let b_enc = take(&wpath, &mut w, "b_enc")?;
    let w_dec = take(&wpath, &mut w, "W_dec")?;
    let b_dec_out = take(&wpath, &mut w, "b_dec")?;
    let threshold = if jumprelu { Some(take(&wpath, &mut w, "threshold")?) } else { None };
    let w_skip = if skip { Some(take(&wpath, &mut w, "W_skip")?) } else { None };
    if let Some(extra) = w.keys().next() {
        return Err(file_err(&wpath, format!("unexpected tensor {extra} for architecture {architecture}")));
    }
    let activation = if jumprelu { Activation::JumpReluNonNegative } else { Activation::Relu };
    let mut t = Transcoder {
        meta: TranscoderMeta { layer, hook_in, hook_out, d_in, d_sae, d_out, format: "saelens".into(), activation, model_name, extra },
        w_enc,
        b_enc,
        w_dec,
        w_dec_next: Vec::new(),
        b_dec_in: Tensor::zeros(d_in, DType::F32, &Device::Cpu)?,
        b_dec_out,
        threshold,
        w_skip,
        log_frequency: None,
    };
    check_all(&wpath, &t)?;
    let sp = dir.join("sparsity.safetensors");
    if sp.is_file() {
        t.load_frequency(&sp)?;
    }
    Ok(t)
}

// ---------------------------------------------------------------------------------------------
// neurosteer's own format

/// Loads neurosteer's own `.safetensors` transcoder file.
pub fn load_neurosteer(path: &Path) -> Result<Transcoder> {
    let (mut w, meta) = read_safetensors(path)?;
    let json = meta
        .get(META_KEY)
        .ok_or_else(|| file_err(path, format!("not a neurosteer transcoder (no __metadata__ key {META_KEY:?})")))?;
    let mut meta: TranscoderMeta =
        serde_json::from_str(json).map_err(|e| file_err(path, format!("bad {META_KEY} metadata: {e}")))?;
    meta.format = "neurosteer".into();
    let threshold = w.remove("threshold");
    match (threshold.is_some(), meta.activation) {
        // Files written before the activation was recorded applied SAELens's JumpReLU.
        (true, Activation::Relu) => meta.activation = Activation::JumpReluNonNegative,
        (false, Activation::JumpRelu | Activation::JumpReluNonNegative) => {
            return Err(file_err(path, "JumpReLU activation, but no threshold tensor"))
        }
        _ => {}
    }
    let log_frequency = match w.remove("log_frequency") {
        Some(t) => Some(t.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let t = Transcoder {
        w_enc: take(path, &mut w, "W_enc")?,
        b_enc: take(path, &mut w, "b_enc")?,
        w_dec: take(path, &mut w, "W_dec")?,
        w_dec_next: Vec::new(),
        b_dec_in: take(path, &mut w, "b_dec_in")?,
        b_dec_out: take(path, &mut w, "b_dec_out")?,
        threshold,
        w_skip: w.remove("W_skip"),
        log_frequency,
        meta,
    };
    check_all(path, &t)?;
    Ok(t)
}

/// Writes neurosteer's own format atomically: a temp file in the same folder, then a rename.
pub fn save_neurosteer(t: &Transcoder, path: &Path) -> Result<()> {
    check_all(path, t)?;
    if let Some(name) = t.first_non_finite()? {
        return Err(file_err(path, format!("not saved: tensor {name} holds NaN or infinite values")));
    }
    if !t.w_dec_next.is_empty() {
        return Err(file_err(path, "a cross-layer transcoder cannot be saved in neurosteer's single-layer format"));
    }
    let mut meta = t.meta.clone();
    meta.format = "neurosteer".into();
    let mut md = HashMap::new();
    md.insert(META_KEY.to_string(), serde_json::to_string(&meta)?);
    let cpu = |x: &Tensor| -> Result<Tensor> { Ok(x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?) };
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("W_enc".into(), cpu(&t.w_enc)?),
        ("b_enc".into(), cpu(&t.b_enc)?),
        ("W_dec".into(), cpu(&t.w_dec)?),
        ("b_dec_in".into(), cpu(&t.b_dec_in)?),
        ("b_dec_out".into(), cpu(&t.b_dec_out)?),
    ];
    if let Some(th) = &t.threshold {
        tensors.push(("threshold".into(), cpu(th)?));
    }
    if let Some(ws) = &t.w_skip {
        tensors.push(("W_skip".into(), cpu(ws)?));
    }
    if let Some(lf) = &t.log_frequency {
        tensors.push(("log_frequency".into(), Tensor::from_slice(lf.as_slice(), lf.len(), &Device::Cpu)?));
    }
    crate::report::replace_atomic(path, |tmp| {
        safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(md), tmp).map_err(|e| file_err(tmp, format!("cannot write: {e}")))
    })
}
