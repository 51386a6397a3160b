//! The steering experiment: answer questions while scaling a feature set, under several
//! configurations, with random feature sets of the same size as controls.
//!
//! Output: a JSON array in the original notebook's schema, one record per item:
//! `{"id", "prompt", "ground_truth": "True"|"False", "generations": {config: text}}`, plus
//! `"new_tokens": {config: [ids]}` and, with `--score loglik`, `"loglik": {config: {"yes", "no"}}`.
//! Beside it, `{out}.meta.json` holds the run's settings, the configurations and the skipped
//! items. Both are rewritten atomically after every batch; a rerun with the same settings resumes
//! and ends with byte-identical files, a rerun with other settings is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_nn::ops::log_softmax;
use indicatif::ProgressStyle;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::generate::{generate_each, prefill_each, GenerateOptions};
use crate::hooks::Hooks;
use crate::model::{LogitsAt, Model};
use crate::report::write_atomic;
use crate::transcoder::splice::{Splice, SteerMode};

/// One configuration: a name, a strength (None = the untouched model) and the feature set it
/// scales (`reasoning` or `control{k}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SteerConfig {
    pub name: String,
    pub strength: Option<f64>,
    pub feature_set: String,
}

/// Parses `Base,Original=1.0,Suppressed=0.5` into configurations on the reasoning set.
pub fn parse_configs(spec: &str) -> Result<Vec<SteerConfig>> {
    let mut out: Vec<SteerConfig> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, strength) = match part.split_once('=') {
            None if part.eq_ignore_ascii_case("base") => (part.to_string(), None),
            None => bail!("--configs: `{part}` needs a strength (`Name=0.5`), or is `Base`"),
            Some((n, s)) => {
                let v: f64 = s.trim().parse().with_context(|| format!("--configs: `{s}` is not a number"))?;
                if !v.is_finite() {
                    bail!("--configs: strength `{s}` is not finite");
                }
                (n.trim().to_string(), Some(v))
            }
        };
        if name.is_empty() || out.iter().any(|c| c.name == name) {
            bail!("--configs: empty or repeated name `{name}`");
        }
        out.push(SteerConfig { name, strength, feature_set: "reasoning".into() });
    }
    if out.is_empty() {
        bail!("--configs: no configuration");
    }
    Ok(out)
}

/// The original work's configurations.
pub const DEFAULT_CONFIGS: &str = "Base,Original=1.0,Suppressed=0.5,Strengthen=2.0";

/// One item to answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SteerItem {
    pub id: String,
    pub prompt: String,
    pub ground_truth: String,
}

/// Everything that determines the results; a rerun must match it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SteerSettings {
    pub model: String,
    pub transcoder: String,
    pub layer: usize,
    pub mode: SteerMode,
    pub max_new_tokens: usize,
    pub batch_size: usize,
    pub score: String,
    pub dataset: String,
    pub seed: u64,
    pub configs: Vec<SteerConfig>,
    /// Feature sets by name: `reasoning`, `control1`, ...
    pub feature_sets: BTreeMap<String, Vec<usize>>,
    pub items: Vec<SteerItem>,
}

/// The sidecar file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SteerMeta {
    pub settings: SteerSettings,
    /// Items skipped because prompt plus new tokens exceed the context.
    pub skipped: Vec<String>,
    pub completed: usize,
    /// Configurations that are another one by construction (in `delta` mode strength 1 is the
    /// base model), mapped to it: they were computed once and recorded under both names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identical: BTreeMap<String, String>,
}

/// Which configurations equal an earlier one by construction: in `delta` mode, strength 1 adds
/// nothing and is the untouched model, as is `Base`.
pub fn identical_configs(configs: &[SteerConfig], mode: SteerMode) -> BTreeMap<String, String> {
    let is_base = |c: &SteerConfig| c.strength.is_none() || (mode == SteerMode::Delta && c.strength == Some(1.0));
    let mut out = BTreeMap::new();
    if let Some(first) = configs.iter().find(|c| is_base(c)) {
        for c in configs.iter().filter(|c| is_base(c) && c.name != first.name) {
            out.insert(c.name.clone(), first.name.clone());
        }
    }
    out
}

/// One result record (the original schema plus extras).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SteerRecord {
    pub id: serde_json::Value,
    pub prompt: String,
    pub ground_truth: String,
    pub generations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub new_tokens: BTreeMap<String, Vec<u32>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub loglik: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Draws `k` control sets of `size` features from `pool` (seeded, without replacement inside a
/// set).
pub fn random_controls(pool: &[usize], size: usize, k: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    if k > 0 && pool.len() < size {
        bail!("--random-controls: only {} alive non-reasoning features to draw {size} from", pool.len());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Ok((0..k)
        .map(|_| {
            let mut s: Vec<usize> = pool.choose_multiple(&mut rng, size).copied().collect();
            s.sort_unstable();
            s
        })
        .collect())
}

/// Adds, for each control set, a copy of every steered configuration whose strength is not 1.
pub fn with_controls(configs: &[SteerConfig], n_controls: usize) -> Vec<SteerConfig> {
    let mut out = configs.to_vec();
    for k in 1..=n_controls {
        for c in configs {
            if let Some(s) = c.strength {
                if s != 1.0 {
                    out.push(SteerConfig { name: format!("{}@control{k}", c.name), strength: Some(s), feature_set: format!("control{k}") });
                }
            }
        }
    }
    out
}

fn meta_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".meta.json");
    PathBuf::from(s)
}

/// The id a record carries for `item` (its id parsed as JSON when it is JSON, else the string).
fn record_id(item: &SteerItem) -> serde_json::Value {
    serde_json::from_str(&item.id).unwrap_or(serde_json::Value::String(item.id.clone()))
}

/// Runs (or resumes) the experiment and writes `out` and its sidecar.
///
/// The meta file is written first, then after every batch the results and the meta file, each
/// atomically. A run killed at any instant resumes: the results file is the record of what was
/// done (the batches up to its last item), and the meta file's count and skipped list are
/// recomputed from it. A lock file `{out}.lock` keeps a second process off the same output.
pub fn run_steer(model: &Model, splice: &Splice, settings: SteerSettings, out: &Path) -> Result<Vec<SteerRecord>> {
    if out.is_dir() {
        bail!("{}: is a folder; --out takes the path of the results file", out.display());
    }
    let _lock = crate::report::OutputLock::acquire(out)?;
    let meta_file = meta_path(out);
    if settings.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let chunk_size = settings.batch_size;
    let mut records: Vec<SteerRecord> = Vec::new();
    let mut done = 0;
    if meta_file.exists() {
        let old: SteerMeta = serde_json::from_str(&std::fs::read_to_string(&meta_file).with_context(|| format!("{}: cannot read", meta_file.display()))?)
            .with_context(|| format!("{}: not a steer meta file", meta_file.display()))?;
        if old.settings != settings {
            bail!(
                "{}: {} was made with other arguments (model, transcoder, features, items, configs or mode); \
                 pass another --out or delete both",
                meta_file.display(),
                out.display()
            );
        }
        if out.exists() {
            records = serde_json::from_str(&std::fs::read_to_string(out).with_context(|| format!("{}: cannot read", out.display()))?)
                .with_context(|| format!("{}: not a results file", out.display()))?;
        }
        // Batches are saved whole: the results reach to the end of their last item's batch, and
        // an item there without a record was skipped (it does not fit the context); the meta
        // file's count is not trusted beyond that (skipped batches are cheap to redo).
        done = check_records(model, out, &settings, &records)?;
    } else if out.exists() {
        bail!("{}: results exist without their meta file {}; delete the results to start over", out.display(), meta_file.display());
    }
    let answered: std::collections::HashSet<String> = records.iter().map(|r| r.id.to_string()).collect();
    let mut skipped: Vec<String> =
        settings.items[..done].iter().filter(|it| !answered.contains(&record_id(it).to_string())).map(|it| it.id.clone()).collect();
    let identical = identical_configs(&settings.configs, settings.mode);
    let meta_for = |completed: usize, skipped: &[String]| SteerMeta {
        settings: settings.clone(),
        skipped: skipped.to_vec(),
        completed,
        identical: identical.clone(),
    };
    // Nothing is written for a run where no item fits.
    let tokens: Vec<Vec<u32>> = settings.items[done..].iter().map(|it| model.codec.to_tokens(&it.prompt)).collect::<Result<_>>()?;
    let fits = |toks: &Vec<u32>| toks.len() + settings.max_new_tokens <= model.info.n_ctx;
    if records.is_empty() && !tokens.iter().any(fits) {
        bail!(
            "none of the {} items fits the model's context of {} with {} new tokens: nothing to steer (lower --max-new-tokens)",
            tokens.len(),
            model.info.n_ctx,
            settings.max_new_tokens
        );
    }
    if !meta_file.exists() {
        write_atomic(&meta_file, serde_json::to_string_pretty(&meta_for(0, &[]))?.as_bytes())?;
    }
    // Results, then the meta file that vouches for them, each written atomically.
    let save = |records: &[SteerRecord], completed: usize, skipped: &[String]| -> Result<()> {
        write_atomic(out, serde_json::to_string_pretty(records)?.as_bytes())?;
        write_atomic(&meta_file, serde_json::to_string_pretty(&meta_for(completed, skipped))?.as_bytes())
    };
    let opts = GenerateOptions {
        max_new_tokens: settings.max_new_tokens,
        batch_size: settings.batch_size,
        stop_at_eos: true,
        truncate_left: false,
        feed_last: false,
    };
    // Every configuration's hooks are built (which checks its feature set); each one not
    // identical to another is computed (the others copy it), all at once: the blocks before the
    // steered layer run once for all of them.
    let (computed, hooks): (Vec<&SteerConfig>, Vec<Hooks>) = settings
        .configs
        .iter()
        .map(|c| -> Result<(&SteerConfig, Hooks)> {
            let mut hooks = Hooks::none();
            if let Some(s) = c.strength {
                let features = settings.feature_sets.get(&c.feature_set).with_context(|| format!("no feature set `{}`", c.feature_set))?;
                let edit = splice.steering(features.clone(), s, settings.mode)?;
                hooks.edit(Arc::new(edit));
            }
            Ok((c, hooks))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|(c, _)| !identical.contains_key(&c.name))
        .unzip();

    let bar = crate::progress::bar(settings.items.len() as u64)
        .with_style(ProgressStyle::with_template("steer [{bar:30}] {pos}/{len} items, {elapsed} elapsed, eta {eta}").expect("valid template"));
    bar.set_position(done as u64);
    let resumed_at = done;
    for (chunk, chunk_tokens) in settings.items[done..].chunks(chunk_size).zip(tokens.chunks(chunk_size)) {
        let mut kept = Vec::new();
        let mut ids = Vec::new();
        for (item, toks) in chunk.iter().zip(chunk_tokens) {
            if !fits(toks) {
                skipped.push(item.id.clone());
            } else {
                kept.push(item);
                ids.push(toks.clone());
            }
        }
        let mut recs: Vec<SteerRecord> = kept
            .iter()
            .map(|it| SteerRecord {
                id: record_id(it),
                prompt: it.prompt.clone(),
                ground_truth: it.ground_truth.clone(),
                generations: BTreeMap::new(),
                new_tokens: BTreeMap::new(),
                loglik: BTreeMap::new(),
            })
            .collect();
        if !ids.is_empty() {
            if settings.score != "loglik" {
                for (c, outs) in computed.iter().zip(generate_each(model, &ids, &opts, &hooks)?) {
                    for (r, new) in recs.iter_mut().zip(outs) {
                        r.generations.insert(c.name.clone(), model.codec.decode(&new)?);
                        r.new_tokens.insert(c.name.clone(), new);
                    }
                }
            }
            if settings.score != "generate" {
                for (r, toks) in recs.iter_mut().zip(&ids) {
                    for (c, loglik) in computed.iter().zip(yes_no_loglik(model, toks, &hooks)?) {
                        r.loglik.insert(c.name.clone(), loglik);
                    }
                }
            }
            for (name, same) in &identical {
                for r in recs.iter_mut() {
                    copy_entry(&mut r.generations, same, name);
                    copy_entry(&mut r.new_tokens, same, name);
                    copy_entry(&mut r.loglik, same, name);
                }
            }
        }
        records.extend(recs);
        done += chunk.len();
        save(&records, done, &skipped)?;
        bar.inc(chunk.len() as u64);
    }
    if done == resumed_at {
        // No batch ran: make sure both files exist and the meta file is up to date.
        save(&records, done, &skipped)?;
    }
    bar.finish_and_clear();
    if !skipped.is_empty() {
        eprintln!("skipped {} items whose prompt plus {} new tokens exceed the context of {}", skipped.len(), settings.max_new_tokens, model.info.n_ctx);
    }
    Ok(records)
}

/// Checks the records of a results file being resumed against `settings`: each is an item of
/// the experiment, in order, with the item's prompt and ground truth, every configuration's
/// result and token ids inside the vocabulary; an item before the last record's batch end with
/// no record must be one that does not fit the context. Returns how many items the records
/// cover (to the end of the last record's batch).
fn check_records(model: &Model, out: &Path, settings: &SteerSettings, records: &[SteerRecord]) -> Result<usize> {
    let bad = |what: String| anyhow::anyhow!("{}: {what}; delete it and its meta file to start over", out.display());
    let names: std::collections::BTreeSet<&String> = settings.configs.iter().map(|c| &c.name).collect();
    let mut next = 0;
    let mut answered = std::collections::HashSet::new();
    for r in records {
        let i = settings.items[next..]
            .iter()
            .position(|it| record_id(it) == r.id)
            .map(|p| next + p)
            .ok_or_else(|| bad(format!("record {} is not an item of this experiment, or is out of order or repeated", r.id)))?;
        let item = &settings.items[i];
        if r.prompt != item.prompt || r.ground_truth != item.ground_truth {
            return Err(bad(format!("record {} does not hold its item's prompt and ground truth", r.id)));
        }
        let has_all = |keys: Vec<&String>| keys.len() == names.len() && keys.iter().all(|k| names.contains(k));
        let generated = settings.score != "loglik";
        if (generated && (!has_all(r.generations.keys().collect()) || !has_all(r.new_tokens.keys().collect())))
            || (settings.score != "generate" && !has_all(r.loglik.keys().collect()))
        {
            return Err(bad(format!("record {} does not hold exactly the configurations {names:?}", r.id)));
        }
        if r.new_tokens.values().flatten().any(|&t| t as usize >= model.info.vocab_size) {
            return Err(bad(format!("record {} holds token ids outside the vocabulary", r.id)));
        }
        answered.insert(i);
        next = i + 1;
    }
    let chunk = settings.batch_size;
    let done = if records.is_empty() { 0 } else { (next - 1) / chunk * chunk + chunk }.min(settings.items.len());
    for (_, item) in settings.items[..done].iter().enumerate().filter(|(i, _)| !answered.contains(i)) {
        if model.codec.to_tokens(&item.prompt)?.len() + settings.max_new_tokens <= model.info.n_ctx {
            return Err(bad(format!("item {} has no record, but it fits the context", item.id)));
        }
    }
    Ok(done)
}

fn copy_entry<V: Clone>(map: &mut BTreeMap<String, V>, from: &str, to: &str) {
    if let Some(v) = map.get(from).cloned() {
        map.insert(to.to_string(), v);
    }
}

/// Reads the sidecar of a results file, if there is one.
pub fn read_meta(out: &Path) -> Result<Option<SteerMeta>> {
    let p = meta_path(out);
    if !p.exists() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&std::fs::read_to_string(&p)?).with_context(|| format!("{}: not a steer meta file", p.display()))?))
}

/// Next-token log-probabilities of the answers " yes" and " no" after the prompt (summed over
/// their tokens when they take several), as lm-eval scores BoolQ, under each of `hooks`. The
/// prompt is run once per hooks, its first blocks once for all (see [`prefill_each`]); an answer
/// of several tokens continues from its cache, which is then cut back for the next one.
pub fn yes_no_loglik(model: &Model, prompt: &[u32], hooks: &[Hooks]) -> Result<Vec<BTreeMap<String, f64>>> {
    let answers: Vec<(&str, Vec<u32>)> =
        ["yes", "no"].into_iter().map(|a| Ok((a, model.codec.tokenizer.encode(&format!(" {a}"))?))).collect::<Result<_>>()?;
    let longest = answers.iter().map(|(_, c)| c.len()).max().unwrap_or(1);
    let mut outs = Vec::with_capacity(hooks.len());
    prefill_each(model, &[prompt.to_vec()], &[vec![true; prompt.len()]], prompt.len() + longest, hooks, |_, mut h, mut cache, last| {
        let first = log_softmax(&last.flatten_all()?, 0)?;
        let mut out = BTreeMap::new();
        for (answer, cont) in &answers {
            let Some((&head, rest)) = cont.split_first() else { bail!("the answer `{answer}` encodes to no token") };
            let mut total = first.get(head as usize)?.to_scalar::<f32>()? as f64;
            if !rest.is_empty() {
                let feed = &cont[..cont.len() - 1];
                let logits = model.forward(&[feed.to_vec()], &[vec![true; feed.len()]], &mut cache, &mut h, LogitsAt::All)?;
                let lp = log_softmax(&logits.squeeze(0)?, 1)?;
                for (j, &tok) in rest.iter().enumerate() {
                    total += lp.get(j)?.get(tok as usize)?.to_scalar::<f32>()? as f64;
                }
                cache.truncate(prompt.len());
            }
            out.insert(answer.to_string(), total);
        }
        outs.push(out);
        Ok(())
    })?;
    Ok(outs)
}
