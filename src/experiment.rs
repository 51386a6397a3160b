//! The pipeline's stages as jobs (trace, classify, steer, evaluate), shared by the single
//! commands, `neurosteer run --config experiment.toml` and `neurosteer demo`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::classify::{self, Selection, Statistic, Thresholds};
use crate::data::prompts::PromptSet;
use crate::data::{self, DatasetKind, Item};
use crate::model::{LoadOptions, Model, Placement};
use crate::report::{self, Series};
use crate::steer::{self, SteerItem, SteerSettings};
use crate::trace::{self, TraceManifest, TraceText};
use crate::transcoder::splice::{SteerMode, Splice};
use crate::transcoder::Transcoder;

/// Where a dataset comes from and how to read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// A local `.jsonl`/`.json`/`.parquet` file or a hub dataset id.
    pub path: String,
    #[serde(default = "default_split")]
    pub split: String,
    /// `gsm8k`, `boolq`, `strategyqa`, `arc`, `commonsenseqa`; guessed when absent.
    #[serde(default)]
    pub kind: Option<String>,
    /// For other datasets: the question, answer and passage field names.
    #[serde(default)]
    pub question_field: Option<String>,
    #[serde(default)]
    pub answer_field: Option<String>,
    #[serde(default)]
    pub passage_field: Option<String>,
    /// How many items (after the seeded shuffle).
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "yes")]
    pub shuffle: bool,
}

fn default_split() -> String {
    "validation".into()
}
fn default_seed() -> u64 {
    42
}
fn yes() -> bool {
    true
}

impl DatasetSpec {
    /// Reads, normalises, shuffles and cuts the dataset; `reserve` extra items are returned
    /// apart (few-shot examples come from them, never from the evaluated items).
    pub fn load(&self, reserve: usize) -> Result<(Vec<Item>, Vec<Item>)> {
        let rows = data::load_rows(&self.path, &self.split)?;
        let kind = match (&self.kind, &self.question_field) {
            (_, Some(q)) => DatasetKind::Custom {
                question: q.clone(),
                answer: self.answer_field.clone(),
                passage: self.passage_field.clone(),
            },
            (Some(k), None) => k.parse()?,
            (None, None) => data::detect_kind(&rows),
        };
        let items = data::normalize(rows, kind).with_context(|| self.path.to_string())?;
        let items = data::shuffle_take(items, self.shuffle, self.seed, None);
        let n = self.n.unwrap_or(items.len()).min(items.len());
        let mut items = items;
        let rest = items.split_off(n);
        Ok((items, rest.into_iter().take(reserve).collect()))
    }
}

/// Loads a model and its transcoder (see [`load_transcoder_for`]).
pub fn load_model_and_transcoder(model: &str, options: &LoadOptions, transcoder: &Path, layer: Option<usize>) -> Result<(Model, Arc<Transcoder>)> {
    let model = Model::load(model, options)?;
    let tc = load_transcoder_for(&model, transcoder, layer)?;
    Ok((model, tc))
}

/// Loads a transcoder (`layer` picks one of a set) for `model`: checks that they fit together
/// and places it on the model's device in the model's transcoder dtype ([`place_for`]).
pub fn load_transcoder_for(model: &Model, path: &Path, layer: Option<usize>) -> Result<Arc<Transcoder>> {
    let tc = Transcoder::load(path, layer)?;
    check_fit(model, &tc, path)?;
    place_for(model, Arc::new(tc))
}

/// A transcoder on `model`'s device with its weight matrices in the model's transcoder dtype
/// (`--transcoder-dtype`; as it is when already there).
pub fn place_for(model: &Model, tc: Arc<Transcoder>) -> Result<Arc<Transcoder>> {
    let dtype = model.transcoder_dtype;
    if is_placed_for(model, &tc) {
        return Ok(tc);
    }
    if dtype != candle_core::DType::F32 {
        eprintln!("neurosteer: transcoder weight matrices held in {} (--transcoder-dtype)", dtype.as_str());
    }
    Ok(Arc::new(tc.to(&model.device, dtype)?))
}

/// Whether `tc` is on `model`'s device with its matrices in the model's transcoder dtype.
pub fn is_placed_for(model: &Model, tc: &Transcoder) -> bool {
    tc.w_enc.device().same_device(&model.device) && tc.w_enc.dtype() == model.transcoder_dtype
}

/// What steering in `mode` splices from `path`: the transcoder of `layer`, and for `replace` with
/// a cross-layer transcoder every source layer, each checked against `model` and on its device.
pub fn load_splice_for(model: &Model, path: &Path, layer: Option<usize>, mode: SteerMode) -> Result<Splice> {
    splice_for(model, load_transcoder_for(model, path, layer)?, path, mode)
}

/// [`load_splice_for`] around `tc`, already read from `path` and placed for `model`: the other
/// source layers are read only for `replace` with a cross-layer transcoder.
pub fn splice_for(model: &Model, tc: Arc<Transcoder>, path: &Path, mode: SteerMode) -> Result<Splice> {
    if mode != SteerMode::Replace || !tc.is_cross_layer() {
        return Ok(Splice::new(tc));
    }
    let mut all = Vec::new();
    for t in Transcoder::load_all(path, tc.clone())? {
        check_fit(model, &t, path)?;
        all.push(place_for(model, t)?);
    }
    Splice::cross_layer(all, tc.meta.layer)
}

/// Checks that a transcoder's hooks exist in the model, that it reads an MLP input and writes an
/// MLP output of its layer (and, cross-layer, that the layers it writes exist), and that its
/// widths equal the model's.
pub fn check_fit(model: &Model, tc: &Transcoder, path: &Path) -> Result<()> {
    use crate::hooks::HookPoint::*;
    let m = &tc.meta;
    let hin = model.hook_point(&m.hook_in).with_context(|| format!("{}: input hook", path.display()))?;
    let hout = model.hook_point(&m.hook_out).with_context(|| format!("{}: output hook", path.display()))?;
    let l = m.layer;
    if let Some(at) = [hin.layer(), hout.layer()].into_iter().flatten().find(|&at| at != l) {
        bail!("{}: its layer field says {l}, but it hooks layer {at} (`{}` → `{}`)", path.display(), m.hook_in, m.hook_out);
    }
    if ![ResidMid(l), Ln2Normalized(l), MlpIn(l)].contains(&hin) || ![MlpOut(l), MlpHookOut(l)].contains(&hout) {
        bail!(
            "{}: reads `{}` and writes `{}`; neurosteer splices transcoders that read blocks.L.hook_resid_mid, \
             blocks.L.ln2.hook_normalized or blocks.L.mlp.hook_in and write blocks.L.hook_mlp_out or blocks.L.mlp.hook_out of the same layer L",
            path.display(),
            m.hook_in,
            m.hook_out
        );
    }
    let last = l + tc.w_dec_next.len();
    if last >= model.info.n_layers {
        bail!("{}: writes into layer {last}, but the model has {} layers", path.display(), model.info.n_layers);
    }
    if m.d_in != model.info.d_model || m.d_out != model.info.d_model {
        bail!(
            "{}: d_in {} / d_out {} do not match the model's width {}",
            path.display(),
            m.d_in,
            m.d_out,
            model.info.d_model
        );
    }
    Ok(())
}

/// The trace stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceJob {
    pub dataset: DatasetSpec,
    #[serde(default = "default_styles")]
    pub styles: Vec<String>,
    /// A TOML file overriding the prompt templates.
    #[serde(default)]
    pub templates: Option<PathBuf>,
    /// Wrap prompts in the Llama-3 chat template.
    #[serde(default)]
    pub chat: bool,
    #[serde(default = "default_trace_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Cut prompts that do not fit the context from the left instead of skipping them.
    #[serde(default)]
    pub truncate_left: bool,
}

fn default_styles() -> Vec<String> {
    vec!["basic".into(), "0shot".into(), "fewshot".into()]
}
fn default_trace_tokens() -> usize {
    32
}
fn default_batch() -> usize {
    8
}

/// Renders every style's prompts and traces them into `out`.
pub fn run_trace_job(job: &TraceJob, model: &Model, transcoder: Arc<Transcoder>, transcoder_path: &Path, out: &Path) -> Result<()> {
    if job.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let prompts = match &job.templates {
        Some(p) => PromptSet::from_toml_file(p)?,
        None => PromptSet::builtin(),
    };
    // A style the file adds but nobody traces is most likely a misspelt built-in one.
    let builtin = PromptSet::builtin();
    for name in prompts.style_names().into_iter().filter(|n| !job.styles.contains(n) && builtin.style(n).is_err()) {
        let file = job.templates.as_deref().map_or(String::new(), |p| p.display().to_string());
        eprintln!("warning: {file}: style `{name}` is not among the styles traced ({}): add it to --styles, or check its name", job.styles.join(", "));
    }
    if let Some(dup) = job.styles.iter().enumerate().find(|(i, s)| job.styles[..*i].contains(s)).map(|(_, s)| s) {
        bail!("--styles names `{dup}` twice");
    }
    // Worked examples come from a style's `examples_file`, else from items held out of the dataset.
    let k = job.styles.iter().map(|s| Ok(prompts.style(s)?.k())).collect::<Result<Vec<_>>>()?.into_iter().max().unwrap_or(0);
    let (items, pool) = job.dataset.load(k * 4)?;
    if items.is_empty() {
        bail!("{}: no items to trace", job.dataset.path);
    }
    crate::data::check_unique_ids(&items).with_context(|| job.dataset.path.clone())?;
    let held_out: Vec<Item> = pool.into_iter().filter(|i| i.fields.contains_key("reasoning")).take(k).collect();
    let mut styles = Vec::new();
    for style in &job.styles {
        let from_file = prompts.examples_from_file(style)?;
        let examples = from_file.as_deref().unwrap_or(&held_out);
        let texts = items
            .iter()
            .map(|it| {
                let p = prompts.render(style, it, examples)?;
                let p = if job.chat { crate::data::prompts::llama3_chat(&p) } else { p };
                Ok(TraceText { id: it.id.clone(), prompt: p })
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| job.dataset.path.clone())?;
        styles.push((style.clone(), texts));
    }
    let manifest = TraceManifest {
        model: model.info.source.clone(),
        transcoder: transcoder_path.display().to_string(),
        layer: transcoder.meta.layer,
        hook_point: transcoder.meta.hook_in.clone(),
        d_sae: transcoder.meta.d_sae,
        max_new_tokens: job.max_new_tokens,
        shard_size: job.batch_size,
        truncate_left: job.truncate_left,
        styles,
    };
    trace::run_trace(model, transcoder, &manifest, job.batch_size, out)
}

/// The classify stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyJob {
    /// A file of log10 frequencies (or a transcoder carrying them); the traced transcoder's when
    /// absent.
    #[serde(default)]
    pub frequency: Option<PathBuf>,
    #[serde(default = "default_alive")]
    pub alive_threshold: f64,
    #[serde(default = "default_diff")]
    pub diff_threshold: f64,
    #[serde(default = "default_statistic")]
    pub statistic: Statistic,
    /// `threshold`, `fdr:Q` or `top:K`.
    #[serde(default = "default_select")]
    pub select: Selection,
    /// The token-injection control on the reasoning set (needs the model and transcoder).
    #[serde(default)]
    pub inject: Option<crate::inject::InjectJob>,
}

fn default_alive() -> f64 {
    -6.0
}
fn default_diff() -> f64 {
    1e-3
}
fn default_statistic() -> Statistic {
    Statistic::Mean
}
fn default_select() -> Selection {
    Selection::Threshold
}

/// Classifies the traces in `traces` and writes `out` (neurons.json), a CSV beside it and the
/// plots. Prints the top features. The injection control, when `job.inject` asks for it, runs
/// with `model` (the traced model and transcoder).
pub fn run_classify_job(job: &ClassifyJob, traces: &Path, out: &Path, model: Option<(&Model, &Transcoder)>) -> Result<classify::Classification> {
    for (flag, v) in [("--alive-threshold", job.alive_threshold), ("--diff-threshold", job.diff_threshold)] {
        if !v.is_finite() {
            bail!("{flag} {v} must be a finite number");
        }
    }
    let manifest: Option<TraceManifest> = match std::fs::read_to_string(traces.join("trace.json")) {
        Ok(t) => Some(serde_json::from_str(&t).with_context(|| format!("{}: bad trace manifest", traces.display()))?),
        Err(_) => None,
    };
    let frequency_path = match (&job.frequency, &manifest) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => PathBuf::from(&m.transcoder),
        (None, None) => bail!("{}: seed-layout traces need --frequency", traces.display()),
    };
    let log_frequency = classify::read_frequency(&frequency_path)?;
    let style_names: Vec<String> = match &manifest {
        Some(m) => m.styles.iter().map(|(s, _)| s.clone()).collect(),
        None => ["basic", "0shot", "fewshot"].iter().filter(|s| traces.join(s).is_dir()).map(|s| s.to_string()).collect(),
    };
    let d_sae = manifest.as_ref().map(|m| m.d_sae);
    // The frequencies come from real data (the transcoder or a file): they bound what the
    // manifest may claim before anything is allocated for it.
    if let Some(d) = d_sae.filter(|&d| d != log_frequency.len()) {
        bail!(
            "{}: d_sae {d}, but {} holds {} feature frequencies",
            traces.join("trace.json").display(),
            frequency_path.display(),
            log_frequency.len()
        );
    }
    let styles: Vec<(String, classify::StyleStats)> = style_names
        .iter()
        .map(|s| Ok((s.clone(), classify::load_style(traces, s, d_sae)?)))
        .collect::<Result<_>>()?;
    if let Some((name, s)) = styles.iter().find(|(_, s)| s.mean.len() != log_frequency.len()) {
        bail!(
            "{}: style `{name}` has {} features, but {} holds {} feature frequencies",
            traces.display(),
            s.mean.len(),
            frequency_path.display(),
            log_frequency.len()
        );
    }
    let th = Thresholds { alive: job.alive_threshold, diff: job.diff_threshold, statistic: job.statistic, select: job.select };
    let mut c = classify::classify(&styles, &log_frequency, th)?;
    if let Some(ij) = &job.inject {
        let (model, tc) = model.context("the injection control needs the model and the transcoder (--model, --transcoder)")?;
        if tc.meta.d_sae != c.features.len() {
            bail!("the transcoder has {} features, the traces {}", tc.meta.d_sae, c.features.len());
        }
        let cot: Vec<String> = style_names.iter().filter(|s| *s != "basic").cloned().collect();
        let inj = crate::inject::run(model, tc, traces, &cot, &c.reasoning, ij)?;
        let lexical: Vec<usize> = inj.features.iter().filter(|f| f.lexical).map(|f| f.index).collect();
        for f in &inj.features {
            c.features[f.index].injection_ratio = Some(f.ratio);
        }
        println!(
            "injection: {} of {} reasoning features are lexical (ratio >= {}), {} untested",
            lexical.len(),
            c.reasoning.len(),
            ij.threshold,
            inj.untested.len()
        );
        c.reasoning_nonlexical = Some(c.reasoning.iter().copied().filter(|i| !lexical.contains(i)).collect());
        c.lexical = Some(lexical);
        c.injection = Some(inj);
    }
    let mut json = serde_json::to_value(&c)?;
    if let Some(m) = &manifest {
        json["layer"] = m.layer.into();
        json["hook_point"] = m.hook_point.clone().into();
        json["model"] = m.model.clone().into();
        json["transcoder"] = m.transcoder.clone().into();
    }
    json["frequency_file"] = frequency_path.display().to_string().into();
    json["n_texts"] = styles.iter().map(|(n, s)| (n.clone(), serde_json::Value::from(s.n_texts))).collect::<serde_json::Map<_, _>>().into();
    report::create_parent(out)?;
    report::write_atomic(out, serde_json::to_string_pretty(&json)?.as_bytes())?;
    let csv = out.with_extension("csv");
    report::write_atomic(&csv, classify_table(&c).to_csv().as_bytes())?;
    let stem = out.with_extension("");
    let plots = classify_plots(&styles, &c, &stem)?;
    println!(
        "{} alive, {} reasoning, {} memory features (statistic {:?}, diff > {}, alive: log10 freq > {})",
        c.n_alive, c.n_reasoning, c.n_memory, c.thresholds.statistic, c.thresholds.diff, c.thresholds.alive
    );
    print_top(&styles, &c);
    println!("wrote {}, {} and {}", out.display(), csv.display(), plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(c)
}

fn classify_table(c: &classify::Classification) -> report::Table {
    let styles: Vec<String> = c.features.first().map(|f| f.values.iter().map(|(s, _)| s.clone()).collect()).unwrap_or_default();
    let mut headers: Vec<String> = ["index", "label", "log_frequency"].iter().map(|s| s.to_string()).collect();
    for s in &styles {
        for v in ["mean", "first", "last"] {
            headers.push(format!("{s}_{v}"));
        }
    }
    headers.extend(
        ["diff_0shot", "diff_fewshot", "t_0shot", "p_0shot", "t_fewshot", "p_fewshot", "g_0shot", "g_fewshot", "q_0shot", "q_fewshot", "q", "g", "injection_ratio"]
            .iter()
            .map(|s| s.to_string()),
    );
    let rows = c
        .features
        .iter()
        .map(|f| {
            let mut r = vec![f.index.to_string(), f.label.to_string(), f.log_frequency.to_string()];
            for (_, v) in &f.values {
                r.extend(v.iter().map(|x| x.to_string()));
            }
            r.extend(
                [f.diff_0shot, f.diff_fewshot, f.t_0shot, f.p_0shot, f.t_fewshot, f.p_fewshot, f.g_0shot, f.g_fewshot, f.q_0shot, f.q_fewshot, f.q, f.g]
                    .iter()
                    .map(|x| x.to_string()),
            );
            r.push(f.injection_ratio.map_or(String::new(), |x| x.to_string()));
            r
        })
        .collect();
    report::Table { headers, rows }
}

/// The original work's three views (mean, first step, last step) over the alive features:
/// per-style values, and CoT-minus-basic differences.
fn classify_plots(styles: &[(String, classify::StyleStats)], c: &classify::Classification, stem: &Path) -> Result<Vec<PathBuf>> {
    let views = [(Statistic::Mean, "Mean activation"), (Statistic::First, "First step"), (Statistic::Last, "Last step")];
    let alive = &c.alive;
    let values: Vec<_> = views
        .iter()
        .map(|(stat, title)| {
            let series = styles
                .iter()
                .map(|(name, s)| Series {
                    name: name.clone(),
                    points: alive.iter().enumerate().map(|(x, &i)| (x as f64, s.statistic(*stat)[i])).collect(),
                    errors: None,
                })
                .collect();
            (title.to_string(), "alive feature (index order)".to_string(), "activation".to_string(), series)
        })
        .collect();
    let basic = styles.iter().find(|(n, _)| n == "basic").map(|(_, s)| s);
    let diffs: Vec<_> = views
        .iter()
        .map(|(stat, title)| {
            let series = styles
                .iter()
                .filter(|(n, _)| n != "basic")
                .filter_map(|(name, s)| {
                    let b = basic?;
                    Some(Series {
                        name: format!("{name} - basic"),
                        points: alive.iter().enumerate().map(|(x, &i)| (x as f64, s.statistic(*stat)[i] - b.statistic(*stat)[i])).collect(),
                        errors: None,
                    })
                })
                .collect();
            (format!("{title}: difference"), "alive feature (index order)".to_string(), "CoT - basic".to_string(), series)
        })
        .collect();
    let mut out = report::panels_chart(stem, &values)?;
    let suffixed = |suffix: &str| {
        let mut s = stem.as_os_str().to_owned();
        s.push(suffix);
        PathBuf::from(s)
    };
    out.extend(report::panels_chart(&suffixed("_diff"), &diffs)?);
    // Volcano: each alive feature's g against -log10 q (of its style with the smaller q);
    // q = 0 is drawn at the top of the finite values.
    let y = |q: f64| -q.max(1e-300).log10();
    let points = |selected: bool| -> Vec<(f64, f64)> {
        alive
            .iter()
            .filter(|i| c.reasoning.binary_search(i).is_ok() == selected)
            .map(|&i| (c.features[i].g, y(c.features[i].q)))
            .filter(|(g, _)| g.is_finite())
            .collect()
    };
    let volcano = [
        Series { name: format!("not selected ({})", c.n_memory), points: points(false), errors: None },
        Series { name: format!("selected: {} ({})", c.thresholds.select, c.n_reasoning), points: points(true), errors: None },
    ];
    out.extend(report::scatter_chart(&suffixed("_volcano"), "Volcano: CoT vs basic", "Hedges' g", "-log10 q (BH)", &volcano)?);
    Ok(out)
}

fn print_top(styles: &[(String, classify::StyleStats)], c: &classify::Classification) {
    let mut rows: Vec<&classify::FeatureRow> = c.features.iter().filter(|f| f.alive).collect();
    rows.sort_by(|a, b| b.diff_0shot.max(b.diff_fewshot).total_cmp(&a.diff_0shot.max(a.diff_fewshot)));
    println!("top features by CoT - basic difference:");
    for f in rows.iter().take(10) {
        let tokens: Vec<String> = styles
            .iter()
            .flat_map(|(_, s)| s.top_tokens[f.index].iter().map(|(v, t)| format!("{t:?} {v:.2}")))
            .take(3)
            .collect();
        println!(
            "  #{:<6} {:<9} d0shot {:+.4}  dfewshot {:+.4}  p {:.2e}  fires most on: {}",
            f.index,
            f.label,
            f.diff_0shot,
            f.diff_fewshot,
            f.p_0shot.min(f.p_fewshot),
            if tokens.is_empty() { "-".into() } else { tokens.join(", ") }
        );
    }
}

/// The steer stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerJob {
    pub dataset: DatasetSpec,
    /// Prompt template (`{question}`, `{passage}`, ... are dataset fields, stripped).
    #[serde(default = "default_boolq_template")]
    pub template: String,
    #[serde(default = "default_configs")]
    pub configs: String,
    #[serde(default = "default_mode")]
    pub mode: SteerMode,
    #[serde(default = "default_steer_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default)]
    pub random_controls: usize,
    /// `generate`, `loglik` or `both`.
    #[serde(default = "default_score")]
    pub score: String,
}

fn default_boolq_template() -> String {
    crate::data::prompts::BOOLQ_TEMPLATE.to_string()
}
fn default_configs() -> String {
    steer::DEFAULT_CONFIGS.to_string()
}
fn default_mode() -> SteerMode {
    SteerMode::Delta
}
fn default_steer_tokens() -> usize {
    50
}
fn default_score() -> String {
    "generate".into()
}

/// Most random control sets a steering run takes.
pub const MAX_RANDOM_CONTROLS: usize = 100;

impl SteerJob {
    /// The items to steer, each prompt rendered, after checking the job's settings: what `run`
    /// calls before its first stage, so that a bad steer stage fails before hours of tracing.
    pub fn items(&self) -> Result<Vec<SteerItem>> {
        if !["generate", "loglik", "both"].contains(&self.score.as_str()) {
            bail!("--score must be generate, loglik or both, not `{}`", self.score);
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.template.trim().is_empty() {
            bail!("--template is empty");
        }
        if self.random_controls > MAX_RANDOM_CONTROLS {
            bail!("--random-controls {}: at most {MAX_RANDOM_CONTROLS} (each control set is another full run of every strength)", self.random_controls);
        }
        steer::parse_configs(&self.configs)?;
        let (items, _) = self.dataset.load(0)?;
        if items.is_empty() {
            bail!("{}: no items to steer{}", self.dataset.path, if self.dataset.n == Some(0) { " (--n is 0)" } else { "" });
        }
        crate::data::check_unique_ids(&items).with_context(|| self.dataset.path.clone())?;
        items
            .iter()
            .map(|it| {
                Ok(SteerItem {
                    id: it.id.clone(),
                    prompt: crate::data::prompts::render_template(&self.template, it, "steer")?,
                    ground_truth: it.fields.get("answer").and_then(|a| a.as_str()).unwrap_or("").to_string(),
                })
            })
            .collect()
    }
}

/// Runs the steering experiment with the feature set in `features` (`neurons.json`, a JSON
/// list or `1,5,9`).
pub fn run_steer_job(job: &SteerJob, model: &Model, splice: &Splice, transcoder_path: &Path, features: &str, out: &Path) -> Result<()> {
    let transcoder = splice.transcoder();
    let items = job.items()?;
    let reasoning = classify::features_for(features, &transcoder.meta)?;
    let mut feature_sets = std::collections::BTreeMap::new();
    if job.random_controls > 0 {
        let pool = control_pool(features, &reasoning, transcoder)?;
        for (k, set) in steer::random_controls(&pool, reasoning.len(), job.random_controls, job.dataset.seed)?.into_iter().enumerate() {
            feature_sets.insert(format!("control{}", k + 1), set);
        }
    }
    feature_sets.insert("reasoning".to_string(), reasoning);
    let configs = steer::with_controls(&steer::parse_configs(&job.configs)?, job.random_controls);
    let settings = SteerSettings {
        model: model.info.source.clone(),
        transcoder: transcoder_path.display().to_string(),
        layer: transcoder.meta.layer,
        mode: job.mode,
        max_new_tokens: job.max_new_tokens,
        batch_size: job.batch_size,
        score: job.score.clone(),
        dataset: job.dataset.path.clone(),
        seed: job.dataset.seed,
        configs,
        feature_sets,
        items,
    };
    report::create_parent(out)?;
    let records = steer::run_steer(model, splice, settings, out)?;
    eprintln!("wrote {} ({} items)", out.display(), records.len());
    Ok(())
}

/// The features random controls are drawn from: the alive non-reasoning ones, or every alive
/// feature when there are fewer of those than the reasoning set holds (a warning says so).
/// Alive and memory lists come from `neurons.json`, else from the transcoder's frequencies.
fn control_pool(features: &str, reasoning: &[usize], tc: &Transcoder) -> Result<Vec<usize>> {
    let from_file = classify::features_file(features)
        .and_then(|(path, _)| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| {
            let list = |k: &str| -> Option<Vec<usize>> {
                Some(v.get(k)?.as_array()?.iter().filter_map(|x| x.as_u64().map(|u| u as usize)).collect())
            };
            Some((list("alive")?, list("memory")?))
        });
    let (alive, non_reasoning) = match from_file {
        Some(lists) => lists,
        None => {
            let alive = tc.alive(-6.0).context("--random-controls needs neurons.json (with its memory list) or a transcoder with feature frequencies")?;
            let rest = alive.iter().copied().filter(|i| !reasoning.contains(i)).collect();
            (alive, rest)
        }
    };
    if let Some(&bad) = alive.iter().chain(&non_reasoning).find(|&&i| i >= tc.meta.d_sae) {
        bail!("{features}: alive feature {bad} is out of range: the transcoder has {} features", tc.meta.d_sae);
    }
    if non_reasoning.len() >= reasoning.len() {
        return Ok(non_reasoning);
    }
    eprintln!(
        "warning: only {} alive non-reasoning features for control sets of {}; drawing controls from all {} alive features",
        non_reasoning.len(),
        reasoning.len(),
        alive.len()
    );
    Ok(alive)
}

/// `neurosteer run`'s config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub model: String,
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "Placement::default_device")]
    pub device: String,
    /// `auto`, `f32`, `bf16` or `f16`.
    #[serde(default)]
    pub dtype: crate::model::DTypeChoice,
    /// `f32`, `model`, `bf16` or `f16`: the transcoder's weight matrices.
    #[serde(default)]
    pub transcoder_dtype: crate::model::TranscoderDType,
    pub transcoder: PathBuf,
    /// The layer to load from a transcoder set.
    #[serde(default)]
    pub layer: Option<usize>,
    /// Output folder; each stage's results go below it.
    pub out: PathBuf,
    pub trace: TraceJob,
    #[serde(default = "default_classify")]
    pub classify: ClassifyJob,
    pub steer: SteerJob,
}

fn default_classify() -> ClassifyJob {
    ClassifyJob::default()
}

impl Default for ClassifyJob {
    fn default() -> Self {
        Self {
            frequency: None,
            alive_threshold: default_alive(),
            diff_threshold: default_diff(),
            statistic: default_statistic(),
            select: default_select(),
            inject: None,
        }
    }
}

/// Runs trace, classify, steer and evaluate; each stage resumes or is reused when its outputs
/// exist. Relative paths in the config are taken from the config file's folder.
pub fn run_experiment(config_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(config_path).with_context(|| format!("{}: cannot read", config_path.display()))?;
    let cfg: ExperimentConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", config_path.display(), e.to_string().replace('\n', " ")))?;
    let base = config_path.parent().unwrap_or(Path::new("."));
    run_pipeline(&cfg, base)
}

/// Runs every stage of `cfg`, resolving relative paths against `base`.
pub fn run_pipeline(cfg: &ExperimentConfig, base: &Path) -> Result<()> {
    let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    let resolve_str = |s: &str| {
        let p = base.join(s);
        if !Path::new(s).is_absolute() && p.exists() { p.display().to_string() } else { s.to_string() }
    };
    let out = resolve(&cfg.out);
    let mut sj = cfg.steer.clone();
    sj.dataset.path = resolve_str(&sj.dataset.path);
    sj.items().context("the steer stage (checked before loading the model)")?;
    let transcoder_path = resolve(&cfg.transcoder);
    let placement = Placement { device: cfg.device.clone(), dtype: cfg.dtype, transcoder_dtype: cfg.transcoder_dtype };
    let options = placement.load_options(cfg.tokenizer.as_deref().map(resolve), false)?;
    let model = Model::load(&resolve_str(&cfg.model), &options)?;
    let splice = load_splice_for(&model, &transcoder_path, cfg.layer, cfg.steer.mode)?;
    let tc = splice.transcoder().clone();
    let mut trace_job = cfg.trace.clone();
    trace_job.dataset.path = resolve_str(&trace_job.dataset.path);
    trace_job.templates = trace_job.templates.as_deref().map(resolve);
    let traces = out.join("traces");
    eprintln!("[1/4] trace -> {}", traces.display());
    run_trace_job(&trace_job, &model, tc.clone(), &transcoder_path, &traces)?;
    let neurons = out.join("neurons.json");
    eprintln!("[2/4] classify -> {}", neurons.display());
    let mut cj = cfg.classify.clone();
    cj.frequency = cj.frequency.as_deref().map(resolve);
    if let Some(ij) = cj.inject.as_mut() {
        ij.text = ij.text.as_deref().map(resolve);
    }
    run_classify_job(&cj, &traces, &neurons, Some((&model, &tc)))?;
    let results = out.join("results.json");
    eprintln!("[3/4] steer -> {}", results.display());
    run_steer_job(&sj, &model, &splice, &transcoder_path, &neurons.display().to_string(), &results)?;
    let eval_dir = out.join("evaluation");
    eprintln!("[4/4] evaluate -> {}", eval_dir.display());
    let (e, written) = crate::evaluate::evaluate_file(&results, &eval_dir, Some(&neurons))?;
    println!("{}", crate::evaluate::table(&e).to_text());
    println!("{}", crate::evaluate::comparison_table(&e).to_text());
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example configs parse (unknown keys are refused), with their placements.
    #[test]
    fn example_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        for name in ["llama31_8b.toml", "demo.toml"] {
            let text = std::fs::read_to_string(root.join(name)).unwrap();
            let cfg: ExperimentConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(cfg.transcoder_dtype, crate::model::TranscoderDType::F32, "{name}");
        }
        let text = std::fs::read_to_string(root.join("llama31_8b.toml")).unwrap();
        let bad = text.replace("transcoder_dtype = \"f32\"", "transcoder_dtype = \"f8\"");
        let err = toml::from_str::<ExperimentConfig>(&bad).unwrap_err().to_string();
        assert!(err.contains("f8"), "{err}");
    }
}
