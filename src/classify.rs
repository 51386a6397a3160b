//! Classification of features into *reasoning* and *memory* from traces.
//!
//! The original rule: alive = log10 frequency > `alive_threshold` (-6); reasoning = alive and
//! (0shot − basic > t or fewshot − basic > t) on the chosen statistic (the mean over all
//! (text, step) vectors by default); memory = alive and not reasoning. Beyond it, each feature
//! gets, per CoT style, a Welch t-test across texts (per-text mean activation, CoT style vs
//! basic), Hedges' g and a Benjamini–Hochberg q-value, so the reasoning set can be chosen by
//! evidence ([`Selection`]) rather than by a fixed threshold.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::trace;
use crate::transcoder::formats;

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

/// A step's nonzero activations: (feature, value) pairs.
type SparseVector = Vec<(usize, f32)>;

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
    fn add_text(&mut self, steps: &[SparseVector], tokens: &[Option<String>]) {
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
            // Per text, its steps' sparse vectors and tokens.
            let mut per_text: Vec<(Vec<SparseVector>, Vec<Option<String>>)> = vec![(Vec::new(), Vec::new()); s.texts.len()];
            for (r, &(t, _step, token)) in s.rows.iter().enumerate() {
                let v: SparseVector = (s.offsets[r]..s.offsets[r + 1])
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
            let sparse: Vec<SparseVector> = sorted
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
/// [`formats::read_frequency_values`]), or a transcoder (its own frequencies); checked by
/// [`formats::check_log_frequency`].
pub fn read_frequency(path: &Path) -> Result<Vec<f32>> {
    if path.extension().is_some_and(|e| e == "json") {
        let v: Vec<f32> = serde_json::from_str(&std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?)
            .with_context(|| format!("{}: expected a JSON list of numbers", path.display()))?;
        return formats::check_log_frequency(path, v);
    }
    if path.is_file() {
        if let Ok(v) = formats::read_frequency_values(path) {
            return formats::check_log_frequency(path, v);
        }
    }
    let tc = crate::transcoder::Transcoder::load(path, None)?;
    tc.log_frequency.with_context(|| format!("{}: this transcoder carries no feature frequencies", path.display()))
}

/// How the reasoning set is chosen among the alive features.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// The original rule: a CoT style exceeds basic by more than the diff threshold.
    Threshold,
    /// Some CoT style is higher than basic (t > 0) with a q-value of at most Q.
    Fdr(f64),
    /// The K features with the smallest q-value among the styles where they are higher than
    /// basic (ties: larger Hedges' g).
    Top(usize),
}

impl std::str::FromStr for Selection {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || anyhow::anyhow!("--select: `{s}` is not threshold, fdr:Q (0 < Q <= 1) or top:K (K >= 1)");
        match s.split_once(':') {
            None if s == "threshold" => Ok(Self::Threshold),
            Some(("fdr", q)) => {
                let q: f64 = q.parse().map_err(|_| bad())?;
                if q > 0.0 && q <= 1.0 { Ok(Self::Fdr(q)) } else { Err(bad()) }
            }
            Some(("top", k)) => match k.parse() {
                Ok(k) if k >= 1 => Ok(Self::Top(k)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Threshold => write!(f, "threshold"),
            Self::Fdr(q) => write!(f, "fdr:{q}"),
            Self::Top(k) => write!(f, "top:{k}"),
        }
    }
}

impl Serialize for Selection {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Selection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The rule's settings.
#[derive(Debug, Clone, Serialize)]
pub struct Thresholds {
    pub alive: f64,
    pub diff: f64,
    pub statistic: Statistic,
    pub select: Selection,
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
    /// Hedges' g of the per-text means, CoT style vs basic.
    pub g_0shot: f64,
    pub g_fewshot: f64,
    /// Benjamini–Hochberg q-values (over every alive feature's tests, both styles together).
    pub q_0shot: f64,
    pub q_fewshot: f64,
    /// The style with the smaller q-value: its q and g (what the volcano plot shows).
    pub q: f64,
    pub g: f64,
    /// The injection ratio, for the features the token-injection control tested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injection_ratio: Option<f64>,
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
    /// From the token-injection control ([`crate::inject`]), when it ran: the tested features
    /// whose activation injection reproduces, and the reasoning features that are not lexical.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lexical: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_nonlexical: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injection: Option<crate::inject::Injection>,
    pub features: Vec<FeatureRow>,
}

/// Mean and sample variance from (Σm, Σm², n).
fn moments((s, sq, n): (f64, f64, usize)) -> (f64, f64, f64) {
    let n = n as f64;
    let m = s / n;
    let var = if n > 1.0 { ((sq - n * m * m) / (n - 1.0)).max(0.0) } else { 0.0 };
    (m, var, n)
}

/// Hedges' g from per-text sums (Σm, Σm², n) of two groups.
fn hedges(a: (f64, f64, usize), b: (f64, f64, usize)) -> f64 {
    let ((ma, va, _), (mb, vb, _)) = (moments(a), moments(b));
    crate::stats::hedges_g(ma, va, a.2, mb, vb, b.2)
}

/// Welch's t statistic and two-sided p from per-text sums (Σm, Σm², n) of two groups.
fn welch(a: (f64, f64, usize), b: (f64, f64, usize)) -> (f64, f64) {
    let (ma, va, na) = moments(a);
    let (mb, vb, nb) = moments(b);
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
    // A style whose every text was skipped (its prompts too long for the context) has no means
    // to compare: it counts as absent.
    let get = |name: &str| styles.iter().find(|(n, s)| n == name && s.n_texts > 0).map(|(_, s)| s);
    for (name, _) in styles.iter().filter(|(_, s)| s.n_texts == 0) {
        eprintln!("warning: style `{name}` has no traced texts (were they all skipped?): it takes no part in the classification");
    }
    let basic = get("basic").context("classification needs traced texts of the `basic` style")?;
    let zero = get("0shot");
    let few = get("fewshot");
    if zero.is_none() && few.is_none() {
        bail!("classification needs traced texts of `0shot` or `fewshot` besides `basic`");
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
    let sums = |s: &StyleStats, i: usize| (s.text_sum[i], s.text_sqsum[i], s.n_texts);
    let test = |s: Option<&StyleStats>, i: usize| s.map_or((f64::NAN, f64::NAN), |s| welch(sums(s, i), sums(basic, i)));
    let effect = |s: Option<&StyleStats>, i: usize| s.map_or(f64::NAN, |s| hedges(sums(s, i), sums(basic, i)));
    let is_alive = |i: usize| (log_frequency[i] as f64) > th.alive;
    let mut features = Vec::with_capacity(d);
    for (i, &lf) in log_frequency.iter().enumerate() {
        let (t0, p0) = test(zero, i);
        let (tf, pf) = test(few, i);
        features.push(FeatureRow {
            index: i,
            log_frequency: lf,
            alive: is_alive(i),
            label: "dead",
            values: styles.iter().map(|(n, s)| (n.clone(), [s.mean[i], s.first[i], s.last[i]])).collect(),
            diff_0shot: diff(zero, i),
            diff_fewshot: diff(few, i),
            t_0shot: t0,
            p_0shot: p0,
            t_fewshot: tf,
            p_fewshot: pf,
            g_0shot: effect(zero, i),
            g_fewshot: effect(few, i),
            q_0shot: f64::NAN,
            q_fewshot: f64::NAN,
            q: f64::NAN,
            g: f64::NAN,
            injection_ratio: None,
        });
    }
    // One family of tests: both styles' tests of every alive feature.
    let alive: Vec<usize> = (0..d).filter(|&i| is_alive(i)).collect();
    let ps: Vec<f64> = alive.iter().flat_map(|&i| [features[i].p_0shot, features[i].p_fewshot]).collect();
    let qs = crate::stats::benjamini_hochberg(&ps);
    for (k, &i) in alive.iter().enumerate() {
        let f = &mut features[i];
        (f.q_0shot, f.q_fewshot) = (qs[2 * k], qs[2 * k + 1]);
        (f.q, f.g) = if f.q_fewshot < f.q_0shot || f.q_0shot.is_nan() { (f.q_fewshot, f.g_fewshot) } else { (f.q_0shot, f.g_0shot) };
    }
    let reasoning = select(&features, &alive, &th);
    let memory: Vec<usize> = alive.iter().copied().filter(|i| reasoning.binary_search(i).is_err()).collect();
    for &i in &alive {
        features[i].label = if reasoning.binary_search(&i).is_ok() { "reasoning" } else { "memory" };
    }
    Ok(Classification {
        n_alive: alive.len(),
        n_reasoning: reasoning.len(),
        n_memory: memory.len(),
        reasoning,
        memory,
        alive,
        thresholds: th,
        lexical: None,
        reasoning_nonlexical: None,
        injection: None,
        features,
    })
}

/// The reasoning set (sorted) among `alive` under `th.select`.
fn select(features: &[FeatureRow], alive: &[usize], th: &Thresholds) -> Vec<usize> {
    // A feature's smallest q-value among the styles where it is higher than basic, and its g.
    let evidence = |f: &FeatureRow| {
        [(f.t_0shot, f.q_0shot, f.g_0shot), (f.t_fewshot, f.q_fewshot, f.g_fewshot)]
            .into_iter()
            .filter(|(t, q, _)| *t > 0.0 && !q.is_nan())
            .min_by(|a, b| a.1.total_cmp(&b.1).then(b.2.total_cmp(&a.2)))
            .map(|(_, q, g)| (q, g))
    };
    let mut out: Vec<usize> = match th.select {
        Selection::Threshold => {
            alive.iter().copied().filter(|&i| features[i].diff_0shot > th.diff || features[i].diff_fewshot > th.diff).collect()
        }
        Selection::Fdr(level) => alive.iter().copied().filter(|&i| evidence(&features[i]).is_some_and(|(q, _)| q <= level)).collect(),
        Selection::Top(k) => {
            let mut ranked: Vec<(usize, (f64, f64))> = alive.iter().filter_map(|&i| Some((i, evidence(&features[i])?))).collect();
            ranked.sort_by(|a, b| a.1 .0.total_cmp(&b.1 .0).then(b.1 .1.total_cmp(&a.1 .1)).then(a.0.cmp(&b.0)));
            ranked.into_iter().take(k).map(|(i, _)| i).collect()
        }
    };
    out.sort_unstable();
    out
}

/// Splits a feature spec into a JSON file and the list named in it: `neurons.json` is the
/// `reasoning` list, `neurons.json:LIST` the list `LIST` (`lexical`, `reasoning_nonlexical`,
/// `memory`, `alive`, ...). None when the spec names no existing file (an index list).
pub fn features_file(spec: &str) -> Option<(&Path, &str)> {
    if Path::new(spec).is_file() {
        return Some((Path::new(spec), "reasoning"));
    }
    let (file, list) = spec.rsplit_once(':')?;
    (Path::new(file).is_file() && !list.is_empty()).then_some((Path::new(file), list))
}

/// Reads a feature list: `1,5,9`, a JSON file holding a list of ints, or an object with a
/// `"reasoning"` list (what `classify` writes), or `FILE:LIST` for another list of that object.
pub fn parse_features(spec: &str) -> Result<Vec<usize>> {
    if let Some((path, name)) = features_file(spec) {
        let file = path.display();
        let text = std::fs::read_to_string(path).with_context(|| format!("{file}: cannot read"))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{file}: not valid JSON"))?;
        let list = match &v {
            serde_json::Value::Array(_) if name == "reasoning" && !spec.ends_with(":reasoning") => &v,
            serde_json::Value::Object(o) => o.get(name).with_context(|| {
                let lists: Vec<&String> = o.iter().filter(|(_, x)| x.is_array()).map(|(k, _)| k).collect();
                format!("{file}: no \"{name}\" list (lists: {lists:?}; `lexical` and `reasoning_nonlexical` come from classify --inject)")
            })?,
            _ => bail!("{file}: expected a list of feature indices or an object with \"{name}\""),
        };
        let list = list.as_array().with_context(|| format!("{file}: \"{name}\" is not a list"))?;
        if list.is_empty() {
            bail!("{file}: the \"{name}\" list is empty: there is nothing to steer");
        }
        return list
            .iter()
            .map(|x| x.as_u64().map(|u| u as usize).with_context(|| format!("{file}: {x} is not a feature index")))
            .collect();
    }
    if spec.trim().is_empty() {
        bail!("--features: no feature given");
    }
    spec.split(',')
        .map(|s| s.trim().parse::<usize>().with_context(|| format!("--features: `{s}` is not a feature index or a file")))
        .collect()
}

/// [`parse_features`] for steering `tc` from the command line: a classification file made for
/// it ([`check_made_for`]), every index in range, none twice (errors name `--features`).
pub fn features_for(spec: &str, tc: &crate::transcoder::TranscoderMeta) -> Result<Vec<usize>> {
    let features = parse_features(spec)?;
    check_made_for(spec, tc)?;
    crate::transcoder::splice::check_features(&features, tc.d_sae).with_context(|| format!("--features {spec}"))?;
    Ok(features)
}

/// Refuses a classification file (what `classify` writes) made for a transcoder other than `tc`:
/// another layer, input hook point or number of features (its indices mean other features).
/// Other feature specs, and files that do not record these, pass.
pub fn check_made_for(spec: &str, tc: &crate::transcoder::TranscoderMeta) -> Result<()> {
    if let Some((path, _)) = features_file(spec) {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let made_for = (v["layer"].as_u64(), v["hook_point"].as_str(), v["features"].as_array().map(Vec::len));
        if let (Some(layer), Some(hook), Some(d_sae)) = made_for {
            if (layer as usize, hook, d_sae) != (tc.layer, tc.hook_in.as_str(), tc.d_sae) {
                bail!(
                    "{}: classifies the {d_sae} features of a transcoder at layer {layer} reading {hook}, not the steered one \
                     ({} features at layer {} reading {})",
                    path.display(),
                    tc.d_sae,
                    tc.layer,
                    tc.hook_in
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feature lists: inline, a JSON list, an object's list; empty ones are refused (a steering
    /// run of nothing would look like a real one), as is `--select top:0`.
    #[test]
    fn feature_lists_and_selections() {
        let dir = std::env::temp_dir().join(format!("neurosteer-features-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(parse_features("3, 1,2").unwrap(), [3, 1, 2]);
        let list = dir.join("list.json");
        std::fs::write(&list, "[5, 7]").unwrap();
        assert_eq!(parse_features(list.to_str().unwrap()).unwrap(), [5, 7]);
        let neurons = dir.join("neurons.json");
        std::fs::write(&neurons, r#"{"reasoning": [], "memory": [4]}"#).unwrap();
        let e = parse_features(neurons.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("neurons.json") && e.contains("empty"), "{e}");
        assert_eq!(parse_features(&format!("{}:memory", neurons.display())).unwrap(), [4]);
        assert!(parse_features(" ").unwrap_err().to_string().contains("no feature"));
        assert!("top:0".parse::<Selection>().is_err());
        assert!(matches!("top:3".parse::<Selection>(), Ok(Selection::Top(3))));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A style with no traced texts (all skipped) takes no part: without basic texts there is
    /// nothing to compare with; an empty few-shot style changes nothing.
    #[test]
    fn styles_without_texts_take_no_part() {
        let style = |texts: &[Vec<SparseVector>]| {
            let mut s = StyleStats::new(3);
            for steps in texts {
                s.add_text(steps, &vec![None; steps.len()]);
            }
            s.finish();
            s
        };
        let basic = style(&[vec![vec![(0, 1.0)]], vec![vec![(1, 1.0)]]]);
        let zero = style(&[vec![vec![(0, 1.0), (2, 1.0)]], vec![vec![(0, 1.0), (2, 1.0)]]]);
        let th = Thresholds { alive: -6.0, diff: 1e-3, statistic: Statistic::Mean, select: Selection::Threshold };
        let freq = [-2.0f32; 3];
        let run = |styles: Vec<(&str, &StyleStats)>| classify(&styles.into_iter().map(|(n, s)| (n.to_string(), s.clone())).collect::<Vec<_>>(), &freq, th.clone());
        let alone = run(vec![("basic", &basic), ("0shot", &zero)]).unwrap();
        assert_eq!(alone.reasoning, [0, 2]);
        let with_empty = run(vec![("basic", &basic), ("0shot", &zero), ("fewshot", &style(&[]))]).unwrap();
        assert_eq!(with_empty.reasoning, alone.reasoning);
        let e = run(vec![("basic", &style(&[])), ("0shot", &zero)]).unwrap_err().to_string();
        assert!(e.contains("`basic`"), "{e}");
        assert!(run(vec![("basic", &basic), ("0shot", &style(&[]))]).is_err());
    }

    /// A classification steers only the transcoder it classified: same layer, input hook point
    /// and number of features; a bare list is only range-checked.
    #[test]
    fn classifications_of_another_transcoder_are_refused() {
        let dir = std::env::temp_dir().join(format!("neurosteer-made-for-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let neurons = dir.join("neurons.json");
        let hook = "blocks.1.ln2.hook_normalized";
        std::fs::write(&neurons, format!(r#"{{"layer": 1, "hook_point": "{hook}", "features": [{{}}, {{}}, {{}}, {{}}], "reasoning": [0, 2]}}"#)).unwrap();
        let meta = |layer: usize, hook_in: &str, d_sae: usize| crate::transcoder::TranscoderMeta {
            layer,
            hook_in: hook_in.into(),
            hook_out: format!("blocks.{layer}.hook_mlp_out"),
            d_in: 8,
            d_sae,
            d_out: 8,
            format: "neurosteer".into(),
            activation: Default::default(),
            model_name: None,
            extra: Default::default(),
        };
        let spec = neurons.to_str().unwrap();
        assert_eq!(features_for(spec, &meta(1, hook, 4)).unwrap(), [0, 2]);
        for other in [meta(2, "blocks.2.ln2.hook_normalized", 4), meta(1, "blocks.1.mlp.hook_in", 4), meta(1, hook, 8)] {
            let e = features_for(spec, &other).unwrap_err().to_string();
            assert!(e.contains("neurons.json") && e.contains("not the steered one"), "{e}");
        }
        let e = format!("{:#}", features_for("1,3", &meta(1, hook, 3)).unwrap_err());
        assert!(e.contains("feature 3 is out of range"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
