//! Classification of features into *reasoning* and *memory* from traces.
//!
//! The original rule: alive = log10 frequency > `alive_threshold` (-6); reasoning = alive and
//! (0shot − basic > t or fewshot − basic > t) on the chosen statistic (the mean over all
//! (text, step) vectors by default); memory = alive and not reasoning. Beyond it, each feature
//! gets a Welch t-test across texts (per-text mean activation, CoT style vs basic), so features
//! can be ranked by evidence rather than by a fixed threshold.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::trace;

/// Which per-style vector the rule compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Statistic {
    /// Mean over every (text, step) vector.
    Mean,
    /// Mean over texts of the step-0 vector.
    First,
    /// Mean over texts of the last step's vector.
    Last,
}

/// The aggregates of one style.
#[derive(Debug, Clone)]
pub struct StyleStats {
    pub mean: Vec<f64>,
    pub first: Vec<f64>,
    pub last: Vec<f64>,
    pub n_texts: usize,
    pub n_vectors: usize,
    /// Σ over texts of each text's mean activation, and of its square (for the t-test).
    pub text_sum: Vec<f64>,
    pub text_sqsum: Vec<f64>,
    /// Per feature, its strongest activations: (value, token text).
    pub top_tokens: Vec<Vec<(f32, String)>>,
}

impl StyleStats {
    fn new(d: usize) -> Self {
        Self {
            mean: vec![0.0; d],
            first: vec![0.0; d],
            last: vec![0.0; d],
            n_texts: 0,
            n_vectors: 0,
            text_sum: vec![0.0; d],
            text_sqsum: vec![0.0; d],
            top_tokens: vec![Vec::new(); d],
        }
    }

    /// Adds one text's step vectors (sparse: `(feature, value)` lists per step, in step order).
    fn add_text(&mut self, steps: &[Vec<(usize, f32)>], tokens: &[Option<String>]) {
        let n = steps.len();
        if n == 0 {
            return;
        }
        self.n_texts += 1;
        self.n_vectors += n;
        let mut text_total: HashMap<usize, f64> = HashMap::new();
        for (s, vec) in steps.iter().enumerate() {
            for &(f, v) in vec {
                let v64 = v as f64;
                self.mean[f] += v64;
                *text_total.entry(f).or_default() += v64;
                if s == 0 {
                    self.first[f] += v64;
                }
                if s == n - 1 {
                    self.last[f] += v64;
                }
                if let Some(Some(tok)) = tokens.get(s) {
                    let top = &mut self.top_tokens[f];
                    if top.len() < 3 || top.last().is_some_and(|(w, _)| v > *w) {
                        top.push((v, tok.clone()));
                        top.sort_by(|a, b| b.0.total_cmp(&a.0));
                        top.truncate(3);
                    }
                }
            }
        }
        for (f, total) in text_total {
            let m = total / n as f64;
            self.text_sum[f] += m;
            self.text_sqsum[f] += m * m;
        }
    }

    fn finish(&mut self) {
        let (nv, nt) = (self.n_vectors.max(1) as f64, self.n_texts.max(1) as f64);
        self.mean.iter_mut().for_each(|x| *x /= nv);
        self.first.iter_mut().for_each(|x| *x /= nt);
        self.last.iter_mut().for_each(|x| *x /= nt);
    }

    /// The vector the rule compares.
    pub fn statistic(&self, s: Statistic) -> &[f64] {
        match s {
            Statistic::Mean => &self.mean,
            Statistic::First => &self.first,
            Statistic::Last => &self.last,
        }
    }
}

/// Loads one style's traces from `dir/style`: neurosteer shards or the seed notebook's
/// `*_{style}_feature_traces.pt` files.
pub fn load_style(dir: &Path, style: &str, d_sae: Option<usize>) -> Result<StyleStats> {
    let style_dir = dir.join(style);
    if !style_dir.is_dir() {
        bail!("{}: no traces for style `{style}`", style_dir.display());
    }
    let shards = trace::shard_files(&style_dir)?;
    if !shards.is_empty() {
        let d = d_sae.context("neurosteer traces need the manifest's d_sae")?;
        let mut stats = StyleStats::new(d);
        for path in shards {
            let s = trace::read_shard(&path)?;
            let mut per_text: Vec<(Vec<Vec<(usize, f32)>>, Vec<Option<String>>)> = vec![(Vec::new(), Vec::new()); s.texts.len()];
            for (r, &(t, _step, token)) in s.rows.iter().enumerate() {
                let v: Vec<(usize, f32)> = (s.offsets[r]..s.offsets[r + 1])
                    .map(|j| (s.features[j] as usize, s.values[j]))
                    .collect();
                if let Some(&(f, _)) = v.iter().find(|(f, _)| *f >= d) {
                    bail!("{}: feature {f} out of range {d}", path.display());
                }
                per_text[t].0.push(v);
                per_text[t].1.push(s.token_text.get(&token).cloned());
            }
            for (steps, tokens) in per_text {
                stats.add_text(&steps, &tokens);
            }
        }
        stats.finish();
        return Ok(stats);
    }
    // The seed notebook's layout.
    let suffix = format!("_{style}_feature_traces.pt");
    let mut files: Vec<_> = std::fs::read_dir(&style_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(&suffix)))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no trace shards and no *{suffix} files", style_dir.display());
    }
    let mut stats: Option<StyleStats> = None;
    for path in files {
        for (_text, steps) in crate::pickle::read_seed_traces(&path)? {
            let d = steps.first().map_or(0, |(_, v)| v.len());
            let st = stats.get_or_insert_with(|| StyleStats::new(d));
            let mut sorted = steps;
            sorted.sort_by_key(|(k, _)| *k);
            let sparse: Vec<Vec<(usize, f32)>> = sorted
                .iter()
                .map(|(_, v)| v.iter().enumerate().filter(|(_, &x)| x != 0.0).map(|(i, &x)| (i, x)).collect())
                .collect();
            if sorted.iter().any(|(_, v)| v.len() != st.mean.len()) {
                bail!("{}: trace vectors of different lengths", path.display());
            }
            st.add_text(&sparse, &[]);
        }
    }
    let mut stats = stats.context("no texts in the trace files")?;
    stats.finish();
    Ok(stats)
}

/// Reads log10 firing frequencies: a JSON list, a `.pt` bare tensor or `.safetensors` (read by
/// [`crate::transcoder::formats::read_frequency`]), or a transcoder (its own frequencies).
pub fn read_frequency(path: &Path) -> Result<Vec<f32>> {
    if path.extension().is_some_and(|e| e == "json") {
        let v: Vec<f32> = serde_json::from_str(&std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?)
            .with_context(|| format!("{}: expected a JSON list of numbers", path.display()))?;
        return Ok(v);
    }
    if path.is_file() {
        if let Ok(v) = crate::transcoder::formats::read_frequency(path) {
            return Ok(v);
        }
    }
    let tc = crate::transcoder::Transcoder::load(path, None)?;
    tc.log_frequency.with_context(|| format!("{}: this transcoder carries no feature frequencies", path.display()))
}

/// The rule's settings.
#[derive(Debug, Clone, Serialize)]
pub struct Thresholds {
    pub alive: f64,
    pub diff: f64,
    pub statistic: Statistic,
}

/// Per-feature results.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureRow {
    pub index: usize,
    pub log_frequency: f32,
    pub alive: bool,
    pub label: &'static str,
    /// style -> [mean, first, last]
    pub values: Vec<(String, [f64; 3])>,
    pub diff_0shot: f64,
    pub diff_fewshot: f64,
    pub t_0shot: f64,
    pub p_0shot: f64,
    pub t_fewshot: f64,
    pub p_fewshot: f64,
}

/// The classification of every feature.
#[derive(Debug, Clone, Serialize)]
pub struct Classification {
    pub reasoning: Vec<usize>,
    pub memory: Vec<usize>,
    pub alive: Vec<usize>,
    pub thresholds: Thresholds,
    pub n_alive: usize,
    pub n_reasoning: usize,
    pub n_memory: usize,
    pub features: Vec<FeatureRow>,
}

/// Welch's t statistic and two-sided p from per-text sums (Σm, Σm², n) of two groups.
fn welch(a: (f64, f64, usize), b: (f64, f64, usize)) -> (f64, f64) {
    let stats = |(s, sq, n): (f64, f64, usize)| {
        let n = n as f64;
        let m = s / n;
        let var = if n > 1.0 { ((sq - n * m * m) / (n - 1.0)).max(0.0) } else { 0.0 };
        (m, var, n)
    };
    let (ma, va, na) = stats(a);
    let (mb, vb, nb) = stats(b);
    if na < 2.0 || nb < 2.0 {
        return (f64::NAN, f64::NAN);
    }
    let se2 = va / na + vb / nb;
    if se2 <= 0.0 {
        return if ma == mb { (0.0, 1.0) } else { (f64::INFINITY.copysign(ma - mb), 0.0) };
    }
    let t = (ma - mb) / se2.sqrt();
    let df = se2 * se2 / ((va / na).powi(2) / (na - 1.0) + (vb / nb).powi(2) / (nb - 1.0));
    (t, crate::stats::t_two_sided_p(t, df))
}

/// Applies the rule. `styles` must hold `basic`, and `0shot` and/or `fewshot`.
pub fn classify(styles: &[(String, StyleStats)], log_frequency: &[f32], th: Thresholds) -> Result<Classification> {
    let get = |name: &str| styles.iter().find(|(n, _)| n == name).map(|(_, s)| s);
    let basic = get("basic").context("classification needs the `basic` style")?;
    let zero = get("0shot");
    let few = get("fewshot");
    if zero.is_none() && few.is_none() {
        bail!("classification needs `0shot` or `fewshot` traces besides `basic`");
    }
    let d = basic.mean.len();
    for (name, s) in styles {
        if s.mean.len() != d {
            bail!("style `{name}` has {} features, basic has {d}", s.mean.len());
        }
    }
    if log_frequency.len() != d {
        bail!("the frequency file has {} features, the traces {d}", log_frequency.len());
    }
    let b = basic.statistic(th.statistic);
    let diff = |s: Option<&StyleStats>, i: usize| s.map_or(f64::NEG_INFINITY, |s| s.statistic(th.statistic)[i] - b[i]);
    let test = |s: Option<&StyleStats>, i: usize| {
        s.map_or((f64::NAN, f64::NAN), |s| {
            welch((s.text_sum[i], s.text_sqsum[i], s.n_texts), (basic.text_sum[i], basic.text_sqsum[i], basic.n_texts))
        })
    };
    let (mut reasoning, mut memory, mut alive) = (Vec::new(), Vec::new(), Vec::new());
    let mut features = Vec::with_capacity(d);
    for i in 0..d {
        let is_alive = (log_frequency[i] as f64) > th.alive;
        let (d0, df) = (diff(zero, i), diff(few, i));
        let is_reasoning = is_alive && (d0 > th.diff || df > th.diff);
        if is_alive {
            alive.push(i);
            if is_reasoning { reasoning.push(i) } else { memory.push(i) }
        }
        let (t0, p0) = test(zero, i);
        let (tf, pf) = test(few, i);
        features.push(FeatureRow {
            index: i,
            log_frequency: log_frequency[i],
            alive: is_alive,
            label: if !is_alive { "dead" } else if is_reasoning { "reasoning" } else { "memory" },
            values: styles.iter().map(|(n, s)| (n.clone(), [s.mean[i], s.first[i], s.last[i]])).collect(),
            diff_0shot: d0,
            diff_fewshot: df,
            t_0shot: t0,
            p_0shot: p0,
            t_fewshot: tf,
            p_fewshot: pf,
        });
    }
    Ok(Classification {
        n_alive: alive.len(),
        n_reasoning: reasoning.len(),
        n_memory: memory.len(),
        reasoning,
        memory,
        alive,
        thresholds: th,
        features,
    })
}

/// Reads a feature list: `1,5,9`, a JSON file holding a list of ints, or an object with a
/// `"reasoning"` list (what `classify` writes).
pub fn parse_features(spec: &str) -> Result<Vec<usize>> {
    let path = Path::new(spec);
    if path.is_file() {
        let text = std::fs::read_to_string(path).with_context(|| format!("{spec}: cannot read"))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{spec}: not valid JSON"))?;
        let list = match &v {
            serde_json::Value::Array(_) => &v,
            serde_json::Value::Object(o) => o.get("reasoning").with_context(|| format!("{spec}: no \"reasoning\" list"))?,
            _ => bail!("{spec}: expected a list of feature indices or an object with \"reasoning\""),
        };
        let list = list.as_array().with_context(|| format!("{spec}: \"reasoning\" is not a list"))?;
        return list
            .iter()
            .map(|x| x.as_u64().map(|u| u as usize).with_context(|| format!("{spec}: {x} is not a feature index")))
            .collect();
    }
    if spec.trim().is_empty() {
        return Ok(Vec::new());
    }
    spec.split(',')
        .map(|s| s.trim().parse::<usize>().with_context(|| format!("--features: `{s}` is not a feature index or a file")))
        .collect()
}
