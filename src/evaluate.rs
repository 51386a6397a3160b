//! Scoring a steering results file: accuracy with Wilson intervals, exact McNemar tests against
//! Base and Original on the same items, and the random-feature controls beside the real set.
//!
//! The answer of a generation is its first word among yes/no/true/false (case-insensitive);
//! a generation with none is "unparsed" and counts as wrong (its rate is reported apart).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::report::{self, Series, Table};
use crate::stats::{mcnemar_exact, wilson_interval};
use crate::steer::{SteerRecord, SteerMeta};

/// A parsed answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Everything `evaluate` computes.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub n_items: usize,
    pub configs: Vec<ConfigScore>,
}

fn truth(record: &SteerRecord) -> Result<bool> {
    match record.ground_truth.to_lowercase().as_str() {
        "true" | "yes" => Ok(true),
        "false" | "no" => Ok(false),
        other => bail!("item {}: ground_truth `{other}` is not True/False", record.id),
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
        records
            .iter()
            .zip(&truths)
            .map(|(r, &t)| {
                r.generations.get(name).map(|g| match parse_answer(g) {
                    Answer::Yes => t,
                    Answer::No => !t,
                    Answer::Unparsed => false,
                })
            })
            .collect()
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
    let find = |target: &str| names.iter().find(|n| n.eq_ignore_ascii_case(target)).map(|n| correct_of(n));
    let base = find("base");
    let original = find("original");
    let mut configs = Vec::new();
    for name in &names {
        let cor = correct_of(name);
        let n = cor.iter().filter(|c| c.is_some()).count();
        let correct = cor.iter().filter(|c| **c == Some(true)).count();
        let unparsed = records.iter().filter(|r| r.generations.get(name).is_some_and(|g| parse_answer(g) == Answer::Unparsed)).count();
        let (lo, hi) = wilson_interval(correct as u64, n as u64, 1.959964);
        let cfg = meta.and_then(|m| m.settings.configs.iter().find(|c| &c.name == name));
        let loglik: Vec<bool> = records
            .iter()
            .zip(&truths)
            .filter_map(|(r, &t)| r.loglik.get(name).map(|l| (l.get("yes") > l.get("no")) == t))
            .collect();
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
    Ok(Evaluation { n_items: records.len(), configs })
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

/// Reads a results file, evaluates it and writes `evaluation.json`, `.md`, `.csv` and the
/// accuracy-vs-strength plot into `out_dir`. Returns the evaluation and the written paths.
pub fn evaluate_file(results: &Path, out_dir: &Path) -> Result<(Evaluation, Vec<PathBuf>)> {
    let text = std::fs::read_to_string(results).with_context(|| format!("{}: cannot read", results.display()))?;
    let records: Vec<SteerRecord> =
        serde_json::from_str(&text).with_context(|| format!("{}: not a steering results file", results.display()))?;
    let meta = crate::steer::read_meta(results)?;
    let e = evaluate(&records, meta.as_ref())?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let t = table(&e);
    let mut written = Vec::new();
    for (name, body) in [
        ("evaluation.json", serde_json::to_string_pretty(&e)?),
        ("evaluation.md", t.to_markdown()),
        ("evaluation.csv", t.to_csv()),
    ] {
        let p = out_dir.join(name);
        report::write_atomic(&p, body.as_bytes())?;
        written.push(p);
    }
    // Accuracy against strength, one series per feature set; Base as a flat reference line.
    let mut sets: Vec<String> = Vec::new();
    for c in e.configs.iter().filter(|c| c.strength.is_some()) {
        if !sets.contains(&c.feature_set) {
            sets.push(c.feature_set.clone());
        }
    }
    let mut series: Vec<Series> = sets
        .iter()
        .map(|set| {
            let mut pts: Vec<(f64, f64, (f64, f64))> = e
                .configs
                .iter()
                .filter(|c| &c.feature_set == set && c.strength.is_some() && c.n > 0)
                .map(|c| (c.strength.unwrap_or(f64::NAN), c.accuracy, (c.ci_low, c.ci_high)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                name: set.clone(),
                points: pts.iter().map(|p| (p.0, p.1)).collect(),
                errors: Some(pts.iter().map(|p| p.2).collect()),
            }
        })
        .collect();
    if let Some(base) = e.configs.iter().find(|c| c.strength.is_none() && c.n > 0) {
        let xs: Vec<f64> = e.configs.iter().filter_map(|c| c.strength).collect();
        let (lo, hi) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        if lo.is_finite() {
            series.push(Series { name: format!("{} (no steering)", base.name), points: vec![(lo, base.accuracy), (hi, base.accuracy)], errors: None });
        }
    }
    if !series.is_empty() {
        written.extend(report::line_chart(&out_dir.join("accuracy_vs_strength"), "Accuracy against steering strength", "strength", "accuracy", &series)?);
    }
    Ok((e, written))
}
