//! Scoring a steering results file: accuracy with Wilson intervals, exact McNemar tests against
//! Base and Original on the same items, and every steered configuration against Base: the
//! accuracy change with a paired bootstrap interval, the items whose answer flipped, and for the
//! steered set the random-feature controls at the same strength as a distribution.
//!
//! The answer of a generation is its first word among yes/no/true/false (case-insensitive);
//! a generation with none is "unparsed" and counts as wrong (its rate is reported apart). With
//! `--score loglik` the answer is yes when log p(" yes") > log p(" no"), else no; both scores are
//! compared against Base when both were recorded.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::report::{self, Series, Table};
use crate::stats::{mcnemar_exact, paired_bootstrap_ci, wilson_interval, Z95};
use crate::steer::{SteerRecord, SteerMeta};

/// Bootstrap resamples of the items for each interval of an accuracy change.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;
/// The bootstrap's seed (every comparison uses the same resampled item lists).
pub const BOOTSTRAP_SEED: u64 = 0;
/// Fewer random controls than this get a warning: their spread says little.
pub const RECOMMENDED_CONTROLS: usize = 5;

/// A parsed answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Yes,
    No,
    Unparsed,
}

/// The first yes/no/true/false word of `text`.
pub fn parse_answer(text: &str) -> Answer {
    for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        match word.to_lowercase().as_str() {
            "yes" | "true" => return Answer::Yes,
            "no" | "false" => return Answer::No,
            _ => {}
        }
    }
    Answer::Unparsed
}

/// One configuration's scores.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigScore {
    pub name: String,
    pub feature_set: String,
    pub strength: Option<f64>,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub unparsed: usize,
    pub unparsed_rate: f64,
    /// Exact McNemar p-value against Base / Original on the same items.
    pub p_vs_base: Option<f64>,
    pub p_vs_original: Option<f64>,
    /// Accuracy of the log-likelihood score (yes vs no), when recorded.
    pub loglik_accuracy: Option<f64>,
}

/// The random controls at one strength, beside the steered set's change.
#[derive(Debug, Clone, Serialize)]
pub struct ControlDistribution {
    pub k: usize,
    /// Each control's accuracy change against Base.
    pub deltas: Vec<f64>,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Percent of controls whose change is below the set's (ties count half).
    pub percentile: f64,
    /// (1 + number of controls whose |change| is at least the set's) / (k + 1).
    pub p_empirical: f64,
}

/// One steered configuration against Base, on one score.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// `generate` or `loglik`.
    pub score: String,
    pub config: String,
    pub feature_set: String,
    pub strength: Option<f64>,
    /// Items answered under both this configuration and Base.
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub wilson_low: f64,
    pub wilson_high: f64,
    pub base_accuracy: f64,
    /// accuracy − base_accuracy, and its paired bootstrap 95% interval.
    pub delta: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// Exact McNemar test against Base.
    pub p_mcnemar: f64,
    /// Items whose answer differs from Base's; of them, wrong → right and right → wrong.
    pub changed: usize,
    pub to_correct: usize,
    pub to_wrong: usize,
    /// For a non-control set: the controls at the same strength and score.
    pub controls: Option<ControlDistribution>,
}

/// An item whose answer under a configuration differs from its answer under Base.
#[derive(Debug, Clone, Serialize)]
pub struct Flip {
    pub score: String,
    pub config: String,
    pub id: serde_json::Value,
    pub ground_truth: bool,
    pub base_answer: Answer,
    pub answer: Answer,
}

/// How the intervals of the changes were computed.
#[derive(Debug, Clone, Serialize)]
pub struct BootstrapSettings {
    pub resamples: usize,
    pub seed: u64,
    pub level: f64,
}

/// Everything `evaluate` computes.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub n_items: usize,
    pub configs: Vec<ConfigScore>,
    /// The configuration every change is measured against.
    pub base: Option<String>,
    /// Random control sets found.
    pub n_controls: usize,
    pub bootstrap: BootstrapSettings,
    pub comparisons: Vec<Comparison>,
    pub flips: Vec<Flip>,
    pub warnings: Vec<String>,
}

fn truth(record: &SteerRecord) -> Result<bool> {
    match record.ground_truth.to_lowercase().as_str() {
        "true" | "yes" => Ok(true),
        "false" | "no" => Ok(false),
        other => bail!("item {}: ground_truth `{other}` is not True/False", record.id),
    }
}

/// Per record, the answer of configuration `name` under `score` (None when not recorded).
fn answers(records: &[SteerRecord], name: &str, score: &str) -> Vec<Option<Answer>> {
    records
        .iter()
        .map(|r| match score {
            "loglik" => r.loglik.get(name).map(|l| match (l.get("yes"), l.get("no")) {
                (Some(y), Some(n)) if y > n => Answer::Yes,
                (Some(_), Some(_)) => Answer::No,
                _ => Answer::Unparsed,
            }),
            _ => r.generations.get(name).map(|g| parse_answer(g)),
        })
        .collect()
}

fn is_correct(a: Answer, truth: bool) -> bool {
    match a {
        Answer::Yes => truth,
        Answer::No => !truth,
        Answer::Unparsed => false,
    }
}

/// Scores every configuration found in the records.
pub fn evaluate(records: &[SteerRecord], meta: Option<&SteerMeta>) -> Result<Evaluation> {
    let mut names: Vec<String> = Vec::new();
    for r in records {
        for k in r.generations.keys().chain(r.loglik.keys()) {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    // Keep the run's order when the meta file is there.
    if let Some(m) = meta {
        names.sort_by_key(|n| m.settings.configs.iter().position(|c| &c.name == n).unwrap_or(usize::MAX));
    }
    let truths: Vec<bool> = records.iter().map(truth).collect::<Result<_>>()?;
    let correct_of = |name: &str| -> Vec<Option<bool>> {
        answers(records, name, "generate").iter().zip(&truths).map(|(a, &t)| a.map(|a| is_correct(a, t))).collect()
    };
    let mcnemar = |a: &[Option<bool>], b: &[Option<bool>]| -> Option<f64> {
        let (mut only_a, mut only_b, mut n) = (0u64, 0u64, 0);
        for (x, y) in a.iter().zip(b) {
            if let (Some(x), Some(y)) = (x, y) {
                n += 1;
                match (x, y) {
                    (true, false) => only_a += 1,
                    (false, true) => only_b += 1,
                    _ => {}
                }
            }
        }
        (n > 0).then(|| mcnemar_exact(only_a, only_b))
    };
    let cfg_of = |name: &str| meta.and_then(|m| m.settings.configs.iter().find(|c| c.name == name));
    let find = |target: &str| names.iter().find(|n| n.eq_ignore_ascii_case(target)).map(|n| correct_of(n));
    let base = find("base");
    let original = find("original");
    let mut configs = Vec::new();
    for name in &names {
        let cor = correct_of(name);
        let n = cor.iter().filter(|c| c.is_some()).count();
        let correct = cor.iter().filter(|c| **c == Some(true)).count();
        let unparsed = records.iter().filter(|r| r.generations.get(name).is_some_and(|g| parse_answer(g) == Answer::Unparsed)).count();
        let (lo, hi) = wilson_interval(correct as u64, n as u64, Z95);
        let cfg = cfg_of(name);
        let loglik: Vec<bool> =
            answers(records, name, "loglik").iter().zip(&truths).filter_map(|(a, &t)| a.map(|a| is_correct(a, t))).collect();
        configs.push(ConfigScore {
            name: name.clone(),
            feature_set: cfg.map_or_else(|| "reasoning".to_string(), |c| c.feature_set.clone()),
            strength: cfg.and_then(|c| c.strength),
            n,
            correct,
            accuracy: if n > 0 { correct as f64 / n as f64 } else { f64::NAN },
            ci_low: lo,
            ci_high: hi,
            unparsed,
            unparsed_rate: if n > 0 { unparsed as f64 / n as f64 } else { f64::NAN },
            p_vs_base: base.as_ref().filter(|_| !name.eq_ignore_ascii_case("base")).and_then(|b| mcnemar(&cor, b)),
            p_vs_original: original.as_ref().filter(|_| !name.eq_ignore_ascii_case("original")).and_then(|o| mcnemar(&cor, o)),
            loglik_accuracy: (!loglik.is_empty()).then(|| loglik.iter().filter(|&&c| c).count() as f64 / loglik.len() as f64),
        });
    }

    // Against Base: the unsteered configuration of the run (else the one named Base).
    let base_name = meta
        .and_then(|m| m.settings.configs.iter().find(|c| c.strength.is_none()).map(|c| c.name.clone()))
        .filter(|n| names.contains(n))
        .or_else(|| names.iter().find(|n| n.eq_ignore_ascii_case("base")).cloned());
    let identical = meta.map(|m| m.identical.clone()).unwrap_or_default();
    let is_control = |set: &str| set.starts_with("control");
    let n_controls = meta.map_or(0, |m| m.settings.feature_sets.keys().filter(|k| is_control(k)).count());
    let mut comparisons = Vec::new();
    let mut flips = Vec::new();
    let mut warnings = Vec::new();
    if let Some(base_name) = &base_name {
        for score in ["generate", "loglik"] {
            let base_answers = answers(records, base_name, score);
            if base_answers.iter().all(Option::is_none) {
                continue;
            }
            for name in names.iter().filter(|n| *n != base_name && !identical.contains_key(*n)) {
                let ans = answers(records, name, score);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let (mut changed, mut to_correct, mut to_wrong) = (0, 0, 0);
                for (i, (x, y)) in ans.iter().zip(&base_answers).enumerate() {
                    let (Some(x), Some(y)) = (*x, *y) else { continue };
                    let (cx, cy) = (is_correct(x, truths[i]), is_correct(y, truths[i]));
                    a.push(cx as u8 as f64);
                    b.push(cy as u8 as f64);
                    if x != y {
                        changed += 1;
                        to_correct += (cx && !cy) as usize;
                        to_wrong += (cy && !cx) as usize;
                        flips.push(Flip {
                            score: score.into(),
                            config: name.clone(),
                            id: records[i].id.clone(),
                            ground_truth: truths[i],
                            base_answer: y,
                            answer: x,
                        });
                    }
                }
                if a.is_empty() {
                    continue;
                }
                let n = a.len();
                let correct = a.iter().sum::<f64>() as usize;
                let (accuracy, base_accuracy) = (correct as f64 / n as f64, crate::stats::mean(&b));
                let (ci_low, ci_high) = paired_bootstrap_ci(&a, &b, BOOTSTRAP_RESAMPLES, 0.05, BOOTSTRAP_SEED);
                let (wilson_low, wilson_high) = wilson_interval(correct as u64, n as u64, Z95);
                let cfg = cfg_of(name);
                comparisons.push(Comparison {
                    score: score.into(),
                    config: name.clone(),
                    feature_set: cfg.map_or_else(|| "reasoning".to_string(), |c| c.feature_set.clone()),
                    strength: cfg.and_then(|c| c.strength),
                    n,
                    correct,
                    accuracy,
                    wilson_low,
                    wilson_high,
                    base_accuracy,
                    delta: accuracy - base_accuracy,
                    ci_low,
                    ci_high,
                    p_mcnemar: mcnemar_exact(to_correct as u64, to_wrong as u64),
                    changed,
                    to_correct,
                    to_wrong,
                    controls: None,
                });
            }
        }
        // Each non-control configuration beside the controls at its strength and score.
        let snapshot = comparisons.clone();
        for c in comparisons.iter_mut().filter(|c| !is_control(&c.feature_set) && c.strength.is_some()) {
            let deltas: Vec<f64> = snapshot
                .iter()
                .filter(|o| is_control(&o.feature_set) && o.strength == c.strength && o.score == c.score)
                .map(|o| o.delta)
                .collect();
            if deltas.is_empty() {
                continue;
            }
            let k = deltas.len();
            let below = deltas.iter().filter(|&&d| d < c.delta).count() as f64;
            let ties = deltas.iter().filter(|&&d| d == c.delta).count() as f64;
            let as_far = deltas.iter().filter(|&&d| d.abs() >= c.delta.abs()).count() as f64;
            c.controls = Some(ControlDistribution {
                k,
                mean: crate::stats::mean(&deltas),
                min: deltas.iter().copied().fold(f64::INFINITY, f64::min),
                max: deltas.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                percentile: 100.0 * (below + 0.5 * ties) / k as f64,
                p_empirical: (1.0 + as_far) / (k as f64 + 1.0),
                deltas,
            });
        }
    } else if names.len() > 1 {
        warnings.push("no Base configuration: no changes against Base, no flips, no control comparison".to_string());
    }
    if n_controls == 0 {
        warnings.push("no random controls (steer --random-controls K): nothing shows whether the set's effect stands out from random features".to_string());
    } else {
        if n_controls < RECOMMENDED_CONTROLS {
            warnings.push(format!("only {n_controls} random controls: at least {RECOMMENDED_CONTROLS} are recommended to judge the set against them"));
        }
        warnings.push(format!(
            "with {n_controls} controls the smallest possible empirical p is 1/{} = {:.3}",
            n_controls + 1,
            1.0 / (n_controls as f64 + 1.0)
        ));
    }
    Ok(Evaluation {
        n_items: records.len(),
        configs,
        base: base_name,
        n_controls,
        bootstrap: BootstrapSettings { resamples: BOOTSTRAP_RESAMPLES, seed: BOOTSTRAP_SEED, level: 0.95 },
        comparisons,
        flips,
        warnings,
    })
}

/// The evaluation as a table.
pub fn table(e: &Evaluation) -> Table {
    let fmt_p = |p: Option<f64>| p.map_or("-".to_string(), |p| format!("{p:.4}"));
    Table {
        headers: ["config", "features", "strength", "n", "accuracy", "95% CI", "unparsed", "p vs Base", "p vs Original", "loglik acc"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        rows: e
            .configs
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    if c.strength.is_none() { "-".into() } else { c.feature_set.clone() },
                    c.strength.map_or("-".into(), |s| format!("{s}")),
                    c.n.to_string(),
                    format!("{:.3}", c.accuracy),
                    format!("[{:.3}, {:.3}]", c.ci_low, c.ci_high),
                    format!("{} ({:.1}%)", c.unparsed, 100.0 * c.unparsed_rate),
                    fmt_p(c.p_vs_base),
                    fmt_p(c.p_vs_original),
                    c.loglik_accuracy.map_or("-".into(), |a| format!("{a:.3}")),
                ]
            })
            .collect(),
    }
}

/// The changes against Base as a table.
pub fn comparison_table(e: &Evaluation) -> Table {
    let f3 = |x: f64| format!("{x:.3}");
    let signed = |x: f64| format!("{x:+.3}");
    Table {
        headers: ["score", "config", "features", "strength", "n", "accuracy", "Base", "change", "95% CI (paired bootstrap)", "McNemar p",
            "changed (+right/-right)", "controls: mean [min, max]", "percentile", "empirical p"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        rows: e
            .comparisons
            .iter()
            .map(|c| {
                let (ctl, pct, pe) = match &c.controls {
                    Some(d) => (format!("{} [{}, {}] (k={})", signed(d.mean), signed(d.min), signed(d.max), d.k), format!("{:.0}", d.percentile), format!("{:.3}", d.p_empirical)),
                    None => ("-".into(), "-".into(), "-".into()),
                };
                vec![
                    c.score.clone(),
                    c.config.clone(),
                    c.feature_set.clone(),
                    c.strength.map_or("-".into(), |s| format!("{s}")),
                    c.n.to_string(),
                    f3(c.accuracy),
                    f3(c.base_accuracy),
                    signed(c.delta),
                    format!("[{}, {}]", signed(c.ci_low), signed(c.ci_high)),
                    format!("{:.4}", c.p_mcnemar),
                    format!("{} (+{}/-{})", c.changed, c.to_correct, c.to_wrong),
                    ctl,
                    pct,
                    pe,
                ]
            })
            .collect(),
    }
}

/// Every flip as a table.
pub fn flips_table(e: &Evaluation) -> Table {
    let word = |a: Answer| format!("{a:?}").to_lowercase();
    Table {
        headers: ["score", "config", "id", "ground_truth", "base_answer", "answer", "now"].iter().map(|s| s.to_string()).collect(),
        rows: e
            .flips
            .iter()
            .map(|f| {
                let now = if is_correct(f.answer, f.ground_truth) { "right" } else if is_correct(f.base_answer, f.ground_truth) { "wrong" } else { "still wrong" };
                let id = f.id.as_str().map_or_else(|| f.id.to_string(), str::to_string);
                vec![f.score.clone(), f.config.clone(), id, f.ground_truth.to_string(), word(f.base_answer), word(f.answer), now.to_string()]
            })
            .collect(),
    }
}

/// Refuses results that cannot be scored as one experiment: no records, repeated ids, records
/// whose configurations differ (from each other, or from the meta file's), a meta file with no
/// configurations, or a configuration whose feature set it does not hold.
fn check_results(records: &[SteerRecord], meta: Option<&SteerMeta>) -> Result<()> {
    if records.is_empty() {
        bail!("no records to evaluate");
    }
    let mut ids = std::collections::HashSet::new();
    if let Some(r) = records.iter().find(|r| !ids.insert(r.id.to_string())) {
        bail!("item {} has more than one record", r.id);
    }
    let keys = |r: &SteerRecord| -> Vec<String> {
        let mut k: Vec<String> = r.generations.keys().chain(r.loglik.keys()).cloned().collect();
        k.sort();
        k.dedup();
        k
    };
    let want = match meta {
        Some(m) => {
            if m.settings.configs.is_empty() {
                bail!("its meta file lists no configurations");
            }
            if let Some(c) = m.settings.configs.iter().find(|c| c.strength.is_some() && !m.settings.feature_sets.contains_key(&c.feature_set)) {
                bail!("its meta file has no feature set `{}` (configuration {})", c.feature_set, c.name);
            }
            let mut names: Vec<String> = m.settings.configs.iter().map(|c| c.name.clone()).collect();
            names.sort();
            names
        }
        None => keys(&records[0]),
    };
    if let Some(r) = records.iter().find(|r| keys(r) != want) {
        bail!("item {} holds configurations {:?}, expected {want:?}", r.id, keys(r));
    }
    Ok(())
}

/// Reads a results file, evaluates it and writes into `out_dir`: `evaluation.json`, `.md`,
/// `.csv`, `comparisons.{md,csv}`, `flips.csv`, the accuracy-vs-strength plot and `report.html`
/// (which also shows the classification in `neurons`, when given). Returns the evaluation and
/// the written paths.
pub fn evaluate_file(results: &Path, out_dir: &Path, neurons: Option<&Path>) -> Result<(Evaluation, Vec<PathBuf>)> {
    let text = std::fs::read_to_string(results).with_context(|| format!("{}: cannot read", results.display()))?;
    let records: Vec<SteerRecord> =
        serde_json::from_str(&text).with_context(|| format!("{}: not a steering results file", results.display()))?;
    let meta = crate::steer::read_meta(results)?;
    let neurons_json: Option<serde_json::Value> = neurons
        .map(|p| -> Result<serde_json::Value> {
            let t = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read (--neurons)", p.display()))?;
            serde_json::from_str(&t).with_context(|| format!("{}: not a neurons.json (--neurons)", p.display()))
        })
        .transpose()?;
    check_results(&records, meta.as_ref()).with_context(|| format!("{}", results.display()))?;
    let e = evaluate(&records, meta.as_ref()).with_context(|| format!("{}", results.display()))?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let (t, ct, ft) = (table(&e), comparison_table(&e), flips_table(&e));
    let mut written = Vec::new();
    for (name, body) in [
        ("evaluation.json", serde_json::to_string_pretty(&e)?),
        ("evaluation.md", t.to_markdown()),
        ("evaluation.csv", t.to_csv()),
        ("comparisons.md", ct.to_markdown()),
        ("comparisons.csv", ct.to_csv()),
        ("flips.csv", ft.to_csv()),
    ] {
        let p = out_dir.join(name);
        report::write_atomic(&p, body.as_bytes())?;
        written.push(p);
    }
    let plot = accuracy_plot(&e, &out_dir.join("accuracy_vs_strength"))?;
    written.extend(plot.iter().cloned());
    let html = html_report(&e, &records, meta.as_ref(), results, neurons.zip(neurons_json.as_ref()), plot.iter().find(|p| p.extension().is_some_and(|x| x == "svg")))?;
    let p = out_dir.join("report.html");
    report::write_atomic(&p, html.as_bytes())?;
    written.push(p);
    Ok((e, written))
}

/// The score the plot and the examples use: generations when recorded, else log-likelihoods.
fn primary_score(e: &Evaluation) -> &str {
    if e.comparisons.iter().any(|c| c.score == "generate") { "generate" } else { "loglik" }
}

/// Accuracy against strength on the primary score: one line per steered (non-control) set with
/// Wilson intervals, the controls as their mean with a min–max bar, Base as a flat line.
fn accuracy_plot(e: &Evaluation, stem: &Path) -> Result<Vec<PathBuf>> {
    let score = primary_score(e);
    let steered: Vec<&Comparison> = e.comparisons.iter().filter(|c| c.score == score && c.strength.is_some()).collect();
    let mut sets: Vec<&str> = Vec::new();
    for c in steered.iter().filter(|c| !c.feature_set.starts_with("control")) {
        if !sets.contains(&c.feature_set.as_str()) {
            sets.push(&c.feature_set);
        }
    }
    let sorted = |mut pts: Vec<(f64, f64, (f64, f64))>| {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        pts
    };
    let mut series: Vec<Series> = sets
        .iter()
        .map(|set| {
            let pts = sorted(
                steered.iter().filter(|c| c.feature_set == *set).map(|c| (c.strength.unwrap_or(f64::NAN), c.accuracy, (c.wilson_low, c.wilson_high))).collect(),
            );
            Series { name: format!("{set} (95% Wilson)"), points: pts.iter().map(|p| (p.0, p.1)).collect(), errors: Some(pts.iter().map(|p| p.2).collect()) }
        })
        .collect();
    // The controls at each strength, from any steered set's distribution there.
    let mut band: Vec<(f64, f64, (f64, f64))> = Vec::new();
    for c in &steered {
        if let (Some(d), Some(s)) = (&c.controls, c.strength) {
            if !band.iter().any(|b| b.0 == s) {
                band.push((s, c.base_accuracy + d.mean, (c.base_accuracy + d.min, c.base_accuracy + d.max)));
            }
        }
    }
    if !band.is_empty() {
        let band = sorted(band);
        series.push(Series {
            name: format!("random controls (mean, min-max of {})", e.n_controls),
            points: band.iter().map(|p| (p.0, p.1)).collect(),
            errors: Some(band.iter().map(|p| p.2).collect()),
        });
    }
    if let Some(c) = steered.first() {
        let (lo, hi) = steered.iter().filter_map(|c| c.strength).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        series.push(Series { name: format!("{} (no steering)", e.base.as_deref().unwrap_or("Base")), points: vec![(lo, c.base_accuracy), (hi, c.base_accuracy)], errors: None });
    }
    if series.is_empty() {
        return Ok(Vec::new());
    }
    let title = format!("Accuracy against steering strength ({score})");
    report::line_chart(stem, &title, "strength", "accuracy", &series)
}

/// The one-page report of an experiment (self-contained: plots are inlined SVG).
fn html_report(
    e: &Evaluation,
    records: &[SteerRecord],
    meta: Option<&SteerMeta>,
    results: &Path,
    neurons: Option<(&Path, &serde_json::Value)>,
    accuracy_svg: Option<&PathBuf>,
) -> Result<String> {
    let mut h = report::Html::new(&format!("neurosteer report: {}", results.display()));
    h.h2("Settings");
    let mut settings = vec![("results".to_string(), results.display().to_string()), ("items".to_string(), e.n_items.to_string())];
    if let Some(m) = meta {
        let s = &m.settings;
        settings.extend([
            ("model".to_string(), s.model.clone()),
            ("transcoder".to_string(), format!("{} (layer {})", s.transcoder, s.layer)),
            ("steering mode".to_string(), s.mode.to_string()),
            ("score".to_string(), s.score.clone()),
            ("dataset".to_string(), s.dataset.clone()),
            ("max new tokens".to_string(), s.max_new_tokens.to_string()),
            ("seed".to_string(), s.seed.to_string()),
            ("skipped items (too long)".to_string(), m.skipped.len().to_string()),
            (
                "configurations".to_string(),
                s.configs.iter().filter(|c| !c.feature_set.starts_with("control")).map(|c| format!("{}={}", c.name, c.strength.map_or("none".into(), |x| x.to_string()))).collect::<Vec<_>>().join(", "),
            ),
            ("steered features".to_string(), s.feature_sets.get("reasoning").map_or("-".into(), |f| f.len().to_string())),
        ]);
    }
    settings.push(("random controls".to_string(), e.n_controls.to_string()));
    settings.push((
        "bootstrap".to_string(),
        format!("{} paired resamples of the items, seed {}, percentile {}% intervals", e.bootstrap.resamples, e.bootstrap.seed, 100.0 * e.bootstrap.level),
    ));
    h.pairs(&settings);
    for w in &e.warnings {
        h.warning(w);
    }

    h.h2("Features");
    match neurons {
        None => h.p("No classification given (evaluate --neurons neurons.json adds it here)."),
        Some((path, n)) => {
            let count = |k: &str| n.get(k).and_then(|v| v.as_array()).map(|a| a.len());
            let lists: Vec<(String, String)> = ["alive", "reasoning", "memory", "lexical", "reasoning_nonlexical"]
                .iter()
                .filter_map(|k| Some((k.to_string(), count(k)?.to_string())))
                .collect();
            h.p(&format!("{} (selection {}, frequency file {})", path.display(), n["thresholds"]["select"], n.get("frequency_file").map_or("-".into(), |v| v.to_string())));
            h.pairs(&lists);
            let stem = path.with_extension("");
            for (suffix, caption) in [("", "Per-style activations of the alive features"), ("_diff", "CoT minus basic"), ("_volcano", "Volcano: effect against evidence, selected set marked")] {
                let mut svg = stem.as_os_str().to_owned();
                svg.push(format!("{suffix}.svg"));
                let svg = PathBuf::from(svg);
                if svg.exists() {
                    h.figure(&svg, caption)?;
                }
            }
            h.h2("Token-injection control");
            match n.get("injection") {
                None => h.p("Not run (classify --inject)."),
                Some(inj) => {
                    let feats = inj["features"].as_array().cloned().unwrap_or_default();
                    let lexical = feats.iter().filter(|f| f["lexical"] == true).count();
                    h.p(&format!(
                        "{lexical} of {} tested reasoning features are lexical: their top {} CoT tokens appended to {} texts ({}) give at least {} of their CoT activation at those tokens. {} features had no token seen {} times and were not tested.",
                        feats.len(),
                        inj["top_tokens"],
                        inj["n_texts"],
                        inj["text_source"].as_str().unwrap_or("-"),
                        inj["threshold"],
                        inj["untested"].as_array().map_or(0, |a| a.len()),
                        inj["min_occurrences"]
                    ));
                    let mut sorted = feats.clone();
                    sorted.sort_by(|a, b| b["ratio"].as_f64().unwrap_or(0.0).total_cmp(&a["ratio"].as_f64().unwrap_or(0.0)));
                    let rows = sorted
                        .iter()
                        .take(40)
                        .map(|f| {
                            let toks: Vec<String> = f["tokens"].as_array().into_iter().flatten().map(|t| format!("{:?}", t["text"].as_str().unwrap_or(""))).collect();
                            vec![
                                f["index"].to_string(),
                                format!("{:.3}", f["ratio"].as_f64().unwrap_or(f64::NAN)),
                                f["lexical"].to_string(),
                                format!("{:.4}", f["cot_activation"].as_f64().unwrap_or(f64::NAN)),
                                format!("{:.4}", f["injected_activation"].as_f64().unwrap_or(f64::NAN)),
                                toks.join(" "),
                            ]
                        })
                        .collect();
                    h.p(&format!("Highest ratios first ({} of {} shown; all are in neurons.json).", feats.len().min(40), feats.len()));
                    h.table(&Table {
                        headers: ["feature", "ratio", "lexical", "CoT activation", "injected activation", "tokens"].iter().map(|s| s.to_string()).collect(),
                        rows,
                    });
                }
            }
        }
    }

    h.h2("Accuracy");
    h.table(&table(e));
    h.h2("Changes against Base");
    h.p(&format!(
        "Change = accuracy − Base accuracy on the same items, with a paired bootstrap 95% interval. Percentile: where the set's change falls among the random controls' changes at the same strength (ties count half); empirical p = (1 + controls whose |change| is at least the set's) / (k + 1). {} random controls.",
        e.n_controls
    ));
    h.table(&comparison_table(e));
    if let Some(svg) = accuracy_svg {
        h.figure(svg, "Accuracy against strength; the random controls' mean with their min-max range")?;
    }

    h.h2("Items that flip");
    let score = primary_score(e);
    let steered_flips: Vec<&Flip> = e.flips.iter().filter(|f| f.score == score && !cfg_set(meta, &f.config).starts_with("control")).collect();
    h.p(&format!("{} answers ({score}) of the steered set differ from Base ({} flips in all configurations and scores, in flips.csv).", steered_flips.len(), e.flips.len()));
    let ft = flips_table(&Evaluation { flips: steered_flips.iter().take(60).map(|f| (*f).clone()).collect(), ..e.clone() });
    h.table(&ft);
    if score == "generate" && !steered_flips.is_empty() {
        if let Some(base) = &e.base {
            h.h2("Example generations");
            for f in steered_flips.iter().take(6) {
                let Some(r) = records.iter().find(|r| r.id == f.id) else { continue };
                let prompt: String = r.prompt.chars().rev().take(300).collect::<Vec<_>>().into_iter().rev().collect();
                h.side_by_side(
                    &format!("item {} (truth: {}), {}", f.id, r.ground_truth, f.config),
                    &prompt,
                    &[(base.as_str(), r.generations.get(base).map_or("", |s| s.as_str())), (f.config.as_str(), r.generations.get(&f.config).map_or("", |s| s.as_str()))],
                );
            }
        }
    }
    Ok(h.finish())
}

/// The feature set a configuration steers, from the meta file ("reasoning" without one).
fn cfg_set<'a>(meta: Option<&'a SteerMeta>, name: &str) -> &'a str {
    meta.and_then(|m| m.settings.configs.iter().find(|c| c.name == name)).map_or("reasoning", |c| c.feature_set.as_str())
}
