//! Tracing: generate under each prompt style and record every transcoder feature's activation
//! at each generation step.
//!
//! Step 0 is the last prompt position (it predicts the first new token); step t is the position
//! of the t-th generated token, so N new tokens give N + 1 steps (the last token is fed once
//! more to read its features).
//!
//! Layout of a trace folder:
//! ```text
//! DIR/trace.json                      what was traced (refuses to mix runs)
//! DIR/{style}/shard-00000.safetensors one per batch of texts, written atomically, never rewritten
//! DIR/{style}/summary.safetensors     mean over all (text, step) vectors, mean first, mean last step
//! ```
//! A shard holds the nonzero activations only: `row_text`, `row_step`, `row_token` (one entry per
//! (text, step)), `row_offsets` into `feature` (u32) and `value` (f32); its metadata holds the texts
//! (`id`, `prompt`, `generated`). A shard is complete when it parses; a half-written one never has
//! its final name (temporary file + rename), so a rerun redoes exactly the missing shards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressStyle;
use serde::{Deserialize, Serialize};

use crate::generate::{generate, GenerateOptions};
use crate::hooks::{HookPoint, Hooks};
use crate::model::Model;
use crate::transcoder::Transcoder;

/// One text to trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceText {
    pub id: String,
    pub prompt: String,
}

/// What a trace folder holds; a rerun must ask for the same.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceManifest {
    pub model: String,
    pub transcoder: String,
    pub layer: usize,
    pub hook_point: String,
    pub d_sae: usize,
    pub max_new_tokens: usize,
    pub shard_size: usize,
    /// Cut prompts that do not fit the context from the left (else they are skipped).
    pub truncate_left: bool,
    /// Style name -> its texts, in order.
    pub styles: Vec<(String, Vec<TraceText>)>,
}

/// The texts of one shard and their sparse activations.
pub struct Shard {
    pub texts: Vec<ShardText>,
    /// Per (text, step) row: index into `texts`, step, token at that position.
    pub rows: Vec<(usize, usize, u32)>,
    /// Row r's activations are `features[offsets[r]..offsets[r+1]]`.
    pub offsets: Vec<usize>,
    pub features: Vec<u32>,
    pub values: Vec<f32>,
    /// The decoded text of every token id in `rows`.
    pub token_text: HashMap<u32, String>,
}

/// A traced text: its id, prompt and generated continuation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardText {
    pub id: String,
    pub prompt: String,
    pub generated: String,
}

/// Per-style summary: the seed notebook's three views.
pub struct Summary {
    pub mean: Vec<f32>,
    pub first: Vec<f32>,
    pub last: Vec<f32>,
    pub n_texts: usize,
    pub n_vectors: usize,
}

/// Traces every style's texts into `dir`, resuming what an earlier run left. The folder is locked
/// (`{dir}.lock`) while this runs: a second process tracing into it gets a clear error.
pub fn run_trace(
    model: &Model,
    transcoder: Arc<Transcoder>,
    manifest: &TraceManifest,
    batch_size: usize,
    dir: &Path,
) -> Result<()> {
    let _lock = crate::report::OutputLock::acquire(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let manifest_path = dir.join("trace.json");
    if manifest_path.exists() {
        let old: TraceManifest = serde_json::from_str(&std::fs::read_to_string(&manifest_path)?)
            .with_context(|| format!("{}: not a trace manifest", manifest_path.display()))?;
        if &old != manifest {
            bail!(
                "{}: holds a trace made with other arguments (model, transcoder, texts or steps); \
                 use another --out folder or delete it",
                dir.display()
            );
        }
    } else {
        crate::report::write_atomic(&manifest_path, serde_json::to_string_pretty(manifest)?.as_bytes())?;
    }
    let point: HookPoint = manifest.hook_point.parse()?;
    let mut hooks = Hooks::none();
    hooks.record(point);
    let opts = GenerateOptions {
        max_new_tokens: manifest.max_new_tokens,
        batch_size,
        stop_at_eos: true,
        truncate_left: manifest.truncate_left,
        feed_last: true,
    };
    let total: usize = manifest.styles.iter().map(|(_, t)| t.len()).sum();
    let mut skipped: Vec<(&str, usize)> = Vec::new();
    let bar = crate::progress::bar(total as u64).with_style(
        ProgressStyle::with_template("trace {msg:>8} [{bar:30}] {pos}/{len} texts, {elapsed} elapsed, eta {eta}")
            .expect("valid template"),
    );
    for (style, texts) in &manifest.styles {
        bar.set_message(style.clone());
        skipped.push((style, 0));
        let style_dir = dir.join(style);
        std::fs::create_dir_all(&style_dir)?;
        for (k, chunk) in texts.chunks(manifest.shard_size).enumerate() {
            let path = shard_path(&style_dir, k);
            if path.exists() && read_shard(&path).is_ok() {
                bar.inc(chunk.len() as u64);
                continue;
            }
            // Texts that do not fit the context are cut from the left when asked, else skipped.
            let mut kept: Vec<&TraceText> = Vec::new();
            let mut ids: Vec<Vec<u32>> = Vec::new();
            for t in chunk {
                let toks = model.codec.to_tokens(&t.prompt)?;
                match crate::generate::fit_prompt(model, toks, &opts) {
                    Ok(toks) => {
                        kept.push(t);
                        ids.push(toks);
                    }
                    Err(_) if !opts.truncate_left => skipped.last_mut().expect("this style's count").1 += 1,
                    Err(e) => return Err(e),
                }
            }
            let chunk = kept;
            // Per text, (step, its nonzero (feature, value) pairs).
            type Steps = Vec<(usize, Vec<(u32, f32)>)>;
            let mut rows: Vec<Steps> = vec![Vec::new(); chunk.len()];
            let generated = if ids.is_empty() { Vec::new() } else { generate(model, &ids, &opts, &hooks, |view| {
                let x = view.values.get(&point).context("hook not recorded")?;
                let f = transcoder.encode(x)?.to_vec2::<f32>()?;
                for (b, &(text, has)) in view.rows.iter().enumerate() {
                    if has {
                        let sparse = f[b].iter().enumerate().filter(|(_, &v)| v != 0.0).map(|(i, &v)| (i as u32, v)).collect();
                        rows[text].push((view.step, sparse));
                    }
                }
                Ok(())
            })? };
            // The token at each step's position: the last prompt token, then the generated ones.
            let mut shard = Shard {
                texts: Vec::new(),
                rows: Vec::new(),
                offsets: vec![0],
                features: Vec::new(),
                values: Vec::new(),
                token_text: HashMap::new(),
            };
            for (i, t) in chunk.iter().enumerate() {
                shard.texts.push(ShardText { id: t.id.clone(), prompt: t.prompt.clone(), generated: model.codec.decode(&generated[i])? });
                for (step, sparse) in &rows[i] {
                    let token = if *step == 0 { *ids[i].last().unwrap_or(&0) } else { generated[i][step - 1] };
                    shard.rows.push((i, *step, token));
                    if let std::collections::hash_map::Entry::Vacant(e) = shard.token_text.entry(token) {
                        e.insert(model.codec.decode(&[token])?);
                    }
                    for &(f, v) in sparse {
                        shard.features.push(f);
                        shard.values.push(v);
                    }
                    shard.offsets.push(shard.features.len());
                }
            }
            write_shard(&path, &shard)?;
            bar.inc(manifest.shard_size.min(texts.len() - k * manifest.shard_size) as u64);
        }
        let summary = summarize(&style_dir, manifest.d_sae)?;
        write_summary(&style_dir.join("summary.safetensors"), &summary)?;
    }
    bar.finish_and_clear();
    if skipped.iter().any(|&(_, n)| n > 0) {
        let per_style: Vec<String> = skipped.iter().map(|(style, n)| format!("{style} {n}")).collect();
        eprintln!(
            "skipped texts whose prompt plus {} new tokens exceed the context of {} ({}; --truncate-left cuts them instead)",
            manifest.max_new_tokens,
            model.info.n_ctx,
            per_style.join(", ")
        );
    }
    Ok(())
}

fn shard_path(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("shard-{k:05}.safetensors"))
}

/// The shard files of a style folder, in order.
pub fn shard_files(style_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(style_dir)
        .with_context(|| format!("{}: cannot read", style_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("shard-") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn write_shard(path: &Path, s: &Shard) -> Result<()> {
    let dev = Device::Cpu;
    let n = s.rows.len();
    let col = |f: &dyn Fn(&(usize, usize, u32)) -> i64| -> Result<Tensor> {
        Ok(Tensor::from_vec(s.rows.iter().map(f).collect::<Vec<i64>>(), n, &dev)?)
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("row_text".into(), col(&|r| r.0 as i64)?);
    t.insert("row_step".into(), col(&|r| r.1 as i64)?);
    t.insert("row_token".into(), col(&|r| r.2 as i64)?);
    t.insert("row_offsets".into(), Tensor::from_vec(s.offsets.iter().map(|&o| o as i64).collect::<Vec<_>>(), n + 1, &dev)?);
    t.insert("feature".into(), Tensor::from_vec(s.features.clone(), s.features.len(), &dev)?);
    t.insert("value".into(), Tensor::from_vec(s.values.clone(), s.values.len(), &dev)?);
    let tokens: std::collections::BTreeMap<&u32, &String> = s.token_text.iter().collect();
    let meta = HashMap::from([(
        "neurosteer_trace".to_string(),
        serde_json::to_string(&serde_json::json!({"texts": s.texts, "tokens": tokens}))?,
    )]);
    let views: Vec<(String, Tensor)> = t.into_iter().collect();
    let bytes = safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| anyhow::anyhow!("{}: cannot serialize shard: {e}", path.display()))?;
    crate::report::write_atomic(path, &bytes)
}

/// Reads a shard; fails on a half-written or corrupt one.
pub fn read_shard(path: &Path) -> Result<Shard> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: corrupt trace shard: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: corrupt trace shard: {e}", path.display()))?;
    #[derive(Deserialize)]
    struct ShardMeta {
        texts: Vec<ShardText>,
        tokens: HashMap<u32, String>,
    }
    let ShardMeta { texts, tokens: token_text } = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("neurosteer_trace"))
        .map(|t| serde_json::from_str(t))
        .transpose()
        .with_context(|| format!("{}: corrupt trace shard metadata", path.display()))?
        .with_context(|| format!("{}: trace shard has no metadata", path.display()))?;
    let get = |name: &str, dtype: DType| -> Result<Tensor> {
        let v = st.tensor(name).map_err(|e| anyhow::anyhow!("{}: trace shard lacks `{name}`: {e}", path.display()))?;
        let t = candle_core::safetensors::Load::load(&v, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: trace shard tensor `{name}`: {e}", path.display()))?;
        if t.dtype() != dtype || t.rank() != 1 {
            bail!("{}: trace shard tensor `{name}` is {:?} {:?}, expected a {dtype:?} vector", path.display(), t.dtype(), t.dims());
        }
        Ok(t)
    };
    let i64s = |name: &str| -> Result<Vec<i64>> { Ok(get(name, DType::I64)?.to_vec1::<i64>()?) };
    let (text, step, token, offsets) = (i64s("row_text")?, i64s("row_step")?, i64s("row_token")?, i64s("row_offsets")?);
    let features = get("feature", DType::U32)?.to_vec1::<u32>()?;
    let values = get("value", DType::F32)?.to_vec1::<f32>()?;
    let bad = |what: &str| anyhow::anyhow!("{}: inconsistent trace shard: {what}", path.display());
    if text.len() != step.len() || text.len() != token.len() || offsets.len() != text.len() + 1 || features.len() != values.len() {
        return Err(bad("its tensors' lengths disagree"));
    }
    if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[1] < w[0]) || offsets.last().copied() != Some(features.len() as i64) {
        return Err(bad("row_offsets must rise from 0 to the number of features"));
    }
    if text.iter().any(|&t| t < 0 || t as usize >= texts.len()) {
        return Err(bad("a row_text is outside its texts"));
    }
    if step.iter().any(|&t| t < 0) || token.iter().any(|&t| !(0..=u32::MAX as i64).contains(&t)) {
        return Err(bad("a row_step or row_token is negative or too large"));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(bad("a feature value is NaN or infinite"));
    }
    Ok(Shard {
        texts,
        rows: text.iter().zip(&step).zip(&token).map(|((&a, &b), &c)| (a as usize, b as usize, c as u32)).collect(),
        offsets: offsets.iter().map(|&o| o as usize).collect(),
        features,
        values,
        token_text,
    })
}

/// Computes a style's summary from its shards (f64 accumulation, so it does not depend on how
/// the work was split or resumed).
pub fn summarize(style_dir: &Path, d_sae: usize) -> Result<Summary> {
    let mut sum = vec![0f64; d_sae];
    let mut first = vec![0f64; d_sae];
    let mut last = vec![0f64; d_sae];
    let (mut n_texts, mut n_vectors) = (0usize, 0usize);
    for path in shard_files(style_dir)? {
        let s = read_shard(&path)?;
        // The last step of each text.
        let mut last_step: HashMap<usize, usize> = HashMap::new();
        for &(t, step, _) in &s.rows {
            let e = last_step.entry(t).or_insert(step);
            *e = (*e).max(step);
        }
        n_texts += s.texts.len();
        for (r, &(t, step, _)) in s.rows.iter().enumerate() {
            n_vectors += 1;
            for j in s.offsets[r]..s.offsets[r + 1] {
                let (f, v) = (s.features[j] as usize, s.values[j] as f64);
                if f >= d_sae {
                    bail!("{}: feature {f} out of range {d_sae}", path.display());
                }
                sum[f] += v;
                if step == 0 {
                    first[f] += v;
                }
                if last_step.get(&t) == Some(&step) {
                    last[f] += v;
                }
            }
        }
    }
    let div = |v: Vec<f64>, n: usize| -> Vec<f32> { v.into_iter().map(|x| (x / n.max(1) as f64) as f32).collect() };
    Ok(Summary { mean: div(sum, n_vectors), first: div(first, n_texts), last: div(last, n_texts), n_texts, n_vectors })
}

fn write_summary(path: &Path, s: &Summary) -> Result<()> {
    let dev = Device::Cpu;
    let n = s.mean.len();
    let views = [
        ("mean", Tensor::from_vec(s.mean.clone(), n, &dev)?),
        ("first", Tensor::from_vec(s.first.clone(), n, &dev)?),
        ("last", Tensor::from_vec(s.last.clone(), n, &dev)?),
        ("n_texts", Tensor::new(&[s.n_texts as i64], &dev)?),
        ("n_vectors", Tensor::new(&[s.n_vectors as i64], &dev)?),
    ];
    let bytes = safetensors::serialize(views.iter().map(|(k, v)| (*k, v)), None)
        .map_err(|e| anyhow::anyhow!("{}: cannot serialize summary: {e}", path.display()))?;
    crate::report::write_atomic(path, &bytes)
}
