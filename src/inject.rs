//! The token-injection control (after Ma et al., arXiv 2601.05679): does a "reasoning" feature
//! need reasoning, or do a few of its favourite tokens make it fire in any text?
//!
//! For each tested feature f:
//! 1. **Its tokens.** Over every position of the CoT styles' traces (every traced style except
//!    `basic`; a position is one recorded step, whose token is the one read there), the mean
//!    activation of f at each token id, `A_cot(t)` = Σ f over positions holding t / number of
//!    positions holding t (positions where f is 0 count). Tokens seen fewer than
//!    [`MIN_OCCURRENCES`] times are left out (a single occurrence is too noisy to rank on).
//!    The top tokens are the `top_tokens` ids with the largest `A_cot(t) > 0` (ties: smaller id).
//! 2. **Injection.** Each base text (the `basic` style's prompts from the traces, or the lines of
//!    a neutral text file; the first `n_texts`) is tokenized as the model tokenizes prompts, and
//!    f's top tokens are appended after it, in rank order (each feature on its own copy of the
//!    text); `A_inj(t)` = mean over texts of f's activation at the appended position holding t,
//!    read at the transcoder's input hook. Texts that do not fit the context with the tokens are
//!    skipped.
//! 3. **Ratio** = mean over the top tokens of `A_inj(t)` / mean over them of `A_cot(t)`. A ratio
//!    of 1 means the tokens alone, in text without reasoning, reproduce the activation they get
//!    in chain of thought; f is **lexical** when ratio ≥ `threshold`.
//!
//! A feature with no token seen [`MIN_OCCURRENCES`] times with a nonzero mean is untested: it has
//! no ratio and is not called lexical. Everything but `A_inj` is recomputable from the trace
//! shards; the result keeps every token's id, text, count, `A_cot` and `A_inj`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::hooks::Hooks;
use crate::model::{LogitsAt, Model};
use crate::trace;
use crate::transcoder::Transcoder;

/// A token must occur this often in the CoT traces to be one of a feature's top tokens.
pub const MIN_OCCURRENCES: usize = 2;
/// Default number of top tokens injected per feature.
pub const DEFAULT_TOP_TOKENS: usize = 5;
/// Default ratio from which a feature is lexical.
pub const DEFAULT_THRESHOLD: f64 = 0.5;
/// Default number of base texts.
pub const DEFAULT_TEXTS: usize = 16;
/// Sequences per forward pass.
const BATCH: usize = 32;

/// The control's settings (`[classify.inject]` in an experiment file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectJob {
    #[serde(default = "default_top_tokens")]
    pub top_tokens: usize,
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// A neutral text file (one text per non-empty line) instead of the basic prompts.
    #[serde(default)]
    pub text: Option<PathBuf>,
    #[serde(default = "default_texts")]
    pub n_texts: usize,
}

fn default_top_tokens() -> usize {
    DEFAULT_TOP_TOKENS
}
fn default_threshold() -> f64 {
    DEFAULT_THRESHOLD
}
fn default_texts() -> usize {
    DEFAULT_TEXTS
}

/// One injected token of a feature.
#[derive(Debug, Clone, Serialize)]
pub struct TokenResult {
    pub id: u32,
    pub text: String,
    /// Positions holding this token in the CoT traces.
    pub cot_count: usize,
    pub cot_mean: f64,
    pub injected_mean: f64,
}

/// One tested feature.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureResult {
    pub index: usize,
    pub tokens: Vec<TokenResult>,
    /// Mean over the tokens of `cot_mean` and of `injected_mean`.
    pub cot_activation: f64,
    pub injected_activation: f64,
    pub ratio: f64,
    pub lexical: bool,
}

/// The control's result, as stored in neurons.json under `injection`.
#[derive(Debug, Clone, Serialize)]
pub struct Injection {
    pub top_tokens: usize,
    pub threshold: f64,
    pub min_occurrences: usize,
    pub cot_styles: Vec<String>,
    /// `basic prompts` or the text file.
    pub text_source: String,
    pub n_texts: usize,
    pub features: Vec<FeatureResult>,
    /// Tested features without a usable token.
    pub untested: Vec<usize>,
}

/// Per feature of `features`, per token id, Σ activation over the CoT positions; the count of
/// CoT positions per token id; the token texts.
type TokenSums = (Vec<HashMap<u32, f64>>, HashMap<u32, usize>, HashMap<u32, String>);

fn cot_token_sums(traces: &Path, cot_styles: &[String], features: &[usize]) -> Result<TokenSums> {
    let slot: HashMap<usize, usize> = features.iter().enumerate().map(|(k, &f)| (f, k)).collect();
    let mut sums = vec![HashMap::new(); features.len()];
    let mut counts: HashMap<u32, usize> = HashMap::new();
    let mut texts = HashMap::new();
    for style in cot_styles {
        let shards = trace::shard_files(&traces.join(style))?;
        if shards.is_empty() {
            bail!("{}: the injection control needs neurosteer trace shards (they keep the tokens)", traces.join(style).display());
        }
        for path in shards {
            let s = trace::read_shard(&path)?;
            for (r, &(_, _, token)) in s.rows.iter().enumerate() {
                *counts.entry(token).or_default() += 1;
                for j in s.offsets[r]..s.offsets[r + 1] {
                    if let Some(&k) = slot.get(&(s.features[j] as usize)) {
                        *sums[k].entry(token).or_default() += s.values[j] as f64;
                    }
                }
            }
            texts.extend(s.token_text);
        }
    }
    Ok((sums, counts, texts))
}

/// The base texts: the basic prompts of the traces or the lines of `file`, the first `n`.
fn base_texts(traces: &Path, file: Option<&Path>, n: usize) -> Result<Vec<String>> {
    let texts: Vec<String> = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("{}: cannot read the injection text", f.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => {
            let mut out = Vec::new();
            for path in trace::shard_files(&traces.join("basic"))? {
                out.extend(trace::read_shard(&path)?.texts.into_iter().map(|t| t.prompt));
            }
            out
        }
    };
    let source = file.map_or_else(|| traces.join("basic").display().to_string(), |f| f.display().to_string());
    if texts.is_empty() {
        bail!("{source}: no texts to inject into");
    }
    Ok(texts.into_iter().take(n.max(1)).collect())
}

/// Runs the control on `features` (the reasoning set) with the traces in `traces`.
pub fn run(model: &Model, tc: &Transcoder, traces: &Path, cot_styles: &[String], features: &[usize], job: &InjectJob) -> Result<Injection> {
    if job.top_tokens == 0 {
        bail!("--top-tokens must be at least 1");
    }
    if job.threshold.is_nan() || job.threshold <= 0.0 {
        bail!("--lexical-threshold must be above 0, not {}", job.threshold);
    }
    if cot_styles.is_empty() {
        bail!("{}: the injection control needs CoT-style traces besides `basic`", traces.display());
    }
    let (sums, counts, token_text) = cot_token_sums(traces, cot_styles, features)?;
    let texts = base_texts(traces, job.text.as_deref(), job.n_texts)?;
    let bases: Vec<Vec<u32>> = texts.iter().map(|t| model.codec.to_tokens(t)).collect::<Result<_>>()?;
    // Each feature's top tokens with their CoT means.
    let mut plans: Vec<(usize, Vec<(u32, f64)>)> = Vec::new();
    let mut untested = Vec::new();
    for (k, &f) in features.iter().enumerate() {
        let mut toks: Vec<(u32, f64)> = sums[k]
            .iter()
            .filter(|(t, _)| counts[t] >= MIN_OCCURRENCES)
            .map(|(&t, &s)| (t, s / counts[&t] as f64))
            .filter(|(_, m)| *m > 0.0)
            .collect();
        toks.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        toks.truncate(job.top_tokens);
        if toks.is_empty() { untested.push(f) } else { plans.push((f, toks)) }
    }
    // The traces keep each token's text: under another model's tokenizer the same ids are other
    // tokens, and injecting them would test other words.
    for &(t, _) in plans.iter().flat_map(|(_, toks)| toks) {
        let (traced, here) = (token_text.get(&t).map_or("", String::as_str), model.codec.decode(&[t])?);
        if traced != here {
            bail!(
                "{}: token {t} was `{traced}` when traced but is `{here}` for {}: the traces come from another model's tokenizer",
                traces.display(),
                model.info.source
            );
        }
    }
    // Per base text: one prefill of BATCH copies of it, then each chunk of features continues
    // from that cache with its tokens (right-padded by repeating the last one, which causality
    // keeps from touching the positions read) and the cache is cut back.
    let point = tc.meta.points()?.0;
    let width = plans.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
    let mut injected: Vec<Vec<f64>> = plans.iter().map(|(_, t)| vec![0.0; t.len()]).collect();
    let mut used = 0usize;
    for base in bases.iter().filter(|b| !plans.is_empty() && b.len() + width <= model.info.n_ctx) {
        used += 1;
        let rows = BATCH.min(plans.len());
        let mut cache = model.new_cache(rows, base.len() + width);
        model.forward(&vec![base.clone(); rows], &vec![vec![true; base.len()]; rows], &mut cache, &mut Hooks::none(), LogitsAt::Last)?;
        for (c, chunk) in plans.chunks(rows).enumerate() {
            let tokens: Vec<Vec<u32>> = (0..rows)
                .map(|r| {
                    let toks = &chunk[r.min(chunk.len() - 1)].1;
                    (0..width).map(|j| toks[j.min(toks.len() - 1)].0).collect()
                })
                .collect();
            let mut hooks = Hooks::none();
            hooks.record(point);
            model.forward(&tokens, &vec![vec![true; width]; rows], &mut cache, &mut hooks, LogitsAt::Last)?;
            cache.truncate(base.len());
            let x = hooks.recorded(point).context("the transcoder's input hook was not reached")?;
            for (r, (f, toks)) in chunk.iter().enumerate() {
                let acts = tc.encode(&x.get(r)?.narrow(0, 0, toks.len())?)?.narrow(1, *f, 1)?.flatten_all()?.to_vec1::<f32>()?;
                for (slot, v) in injected[c * rows + r].iter_mut().zip(acts) {
                    *slot += v as f64;
                }
            }
        }
    }
    if used == 0 && !plans.is_empty() {
        bail!("no base text fits the context of {} with {width} tokens appended", model.info.n_ctx);
    }
    let mut results = Vec::new();
    for (p, (f, toks)) in plans.into_iter().enumerate() {
        let tokens: Vec<TokenResult> = toks
            .iter()
            .zip(&injected[p])
            .map(|(&(id, cot_mean), &sum)| TokenResult {
                id,
                text: token_text.get(&id).cloned().unwrap_or_default(),
                cot_count: counts[&id],
                cot_mean,
                injected_mean: sum / used as f64,
            })
            .collect();
        let n = tokens.len() as f64;
        let cot_activation = tokens.iter().map(|t| t.cot_mean).sum::<f64>() / n;
        let injected_activation = tokens.iter().map(|t| t.injected_mean).sum::<f64>() / n;
        let ratio = injected_activation / cot_activation;
        results.push(FeatureResult { index: f, tokens, cot_activation, injected_activation, ratio, lexical: ratio >= job.threshold });
    }
    Ok(Injection {
        top_tokens: job.top_tokens,
        threshold: job.threshold,
        min_occurrences: MIN_OCCURRENCES,
        cot_styles: cot_styles.to_vec(),
        text_source: job.text.as_ref().map_or_else(|| "basic prompts".to_string(), |p| p.display().to_string()),
        n_texts: used,
        features: results,
        untested,
    })
}
