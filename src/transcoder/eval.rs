//! How faithfully a transcoder stands for its MLP, on held-out text, and how often each
//! feature fires.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::ops::log_softmax;
use serde::Serialize;

use super::splice::{SteerMode, Steering};
use super::Transcoder;
use crate::hooks::{Hooks, ZeroAblation};
use crate::model::{LogitsAt, Model};

/// Fidelity numbers.
#[derive(Debug, Clone, Serialize)]
pub struct FidelityReport {
    pub texts: usize,
    pub tokens: usize,
    /// Fraction of the MLP output's variance explained.
    pub fve: f64,
    /// Mean active features per token.
    pub l0: f64,
    /// Features that never fired on this text.
    pub dead: usize,
    /// Mean next-token cross-entropy (nats) of the model, with the transcoder spliced in
    /// (replace, s = 1), and with the MLP zero-ablated.
    pub ce_base: f64,
    pub ce_spliced: f64,
    pub ce_zero_ablated: f64,
    /// (CE_zero − CE_spliced) / (CE_zero − CE_base).
    pub ce_loss_recovered: f64,
    /// Mean KL(base ‖ spliced) of the next-token distributions.
    pub kl_to_base: f64,
}

/// Log-probabilities at every position of `ids` under `hooks`, `[seq, vocab]`.
fn log_probs(model: &Model, ids: &[u32], hooks: &Hooks) -> Result<Tensor> {
    let mut h = hooks.clone();
    let mut cache = model.new_cache(1, ids.len());
    let logits = model.forward(&[ids.to_vec()], &[vec![true; ids.len()]], &mut cache, &mut h, LogitsAt::All)?;
    Ok(log_softmax(&logits.squeeze(0)?, D::Minus1)?)
}

/// Mean negative log-likelihood of each next token.
fn cross_entropy(lp: &Tensor, ids: &[u32]) -> Result<(f64, usize)> {
    let n = ids.len() - 1;
    let targets = Tensor::from_vec(ids[1..].to_vec(), (n, 1), lp.device())?;
    let picked = lp.narrow(0, 0, n)?.gather(&targets, 1)?;
    Ok((-(picked.sum_all()?.to_scalar::<f32>()? as f64), n))
}

fn prepare(model: &Model, text: &str) -> Result<Vec<u32>> {
    let mut ids = model.codec.to_tokens(text)?;
    ids.truncate(model.info.n_ctx);
    Ok(ids)
}

/// Evaluates `tc` on `texts`.
pub fn evaluate(model: &Model, tc: &Arc<Transcoder>, texts: &[String]) -> Result<FidelityReport> {
    if tc.is_cross_layer() {
        bail!("transcoder eval measures single-layer transcoders; this is one source layer of a cross-layer transcoder");
    }
    let layer = tc.meta.layer;
    let (input, output) = tc.meta.points()?;
    let mut spliced = Hooks::none();
    spliced.edit(Arc::new(Steering::new(tc.clone(), Vec::new(), 1.0, SteerMode::Replace)?));
    let mut ablated = Hooks::none();
    ablated.edit(Arc::new(ZeroAblation(layer)));
    let (mut err, mut sum_y, mut sum_y2, mut l0) = (0f64, vec![0f64; tc.meta.d_out], 0f64, 0f64);
    let mut fired = vec![false; tc.meta.d_sae];
    let (mut ce, mut ce_s, mut ce_z, mut kl, mut n_tok, mut n_pos, mut used) = (0f64, 0f64, 0f64, 0f64, 0usize, 0usize, 0usize);
    for text in texts {
        let ids = prepare(model, text)?;
        if ids.len() < 2 {
            continue;
        }
        used += 1;
        let mut base = Hooks::none();
        base.record(input);
        base.record(output);
        let mut cache = model.new_cache(1, ids.len());
        let logits = model.forward(std::slice::from_ref(&ids), &[vec![true; ids.len()]], &mut cache, &mut base, LogitsAt::All)?;
        let lp = log_softmax(&logits.squeeze(0)?, D::Minus1)?;
        let x = base.recorded(input).expect("recorded").squeeze(0)?;
        let y = base.recorded(output).expect("recorded").squeeze(0)?;
        let f = tc.encode(&x)?;
        let y_hat = tc.forward(&x)?;
        err += (y_hat - &y)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        for (s, v) in sum_y.iter_mut().zip(y.sum(0)?.to_vec1::<f32>()?) {
            *s += v as f64;
        }
        sum_y2 += y.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let active = f.ne(0f32)?.to_dtype(DType::F32)?;
        l0 += active.sum_all()?.to_scalar::<f32>()? as f64;
        for (i, c) in active.sum(0)?.to_vec1::<f32>()?.iter().enumerate() {
            fired[i] |= *c > 0.0;
        }
        n_pos += ids.len();
        let lp_s = log_probs(model, &ids, &spliced)?;
        let lp_z = log_probs(model, &ids, &ablated)?;
        let (a, n) = cross_entropy(&lp, &ids)?;
        ce += a;
        ce_s += cross_entropy(&lp_s, &ids)?.0;
        ce_z += cross_entropy(&lp_z, &ids)?.0;
        n_tok += n;
        kl += (lp.exp()? * (&lp - &lp_s)?)?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    if n_tok == 0 {
        bail!("no text with at least two tokens to evaluate on");
    }
    let mean_sq: f64 = sum_y.iter().map(|s| s * s).sum::<f64>() / n_pos as f64;
    let total_var = sum_y2 - mean_sq;
    let (ce, ce_s, ce_z) = (ce / n_tok as f64, ce_s / n_tok as f64, ce_z / n_tok as f64);
    Ok(FidelityReport {
        texts: used,
        tokens: n_pos,
        fve: 1.0 - err / total_var.max(1e-12),
        l0: l0 / n_pos as f64,
        dead: fired.iter().filter(|f| !**f).count(),
        ce_base: ce,
        ce_spliced: ce_s,
        ce_zero_ablated: ce_z,
        ce_loss_recovered: (ce_z - ce_s) / (ce_z - ce),
        kl_to_base: kl / n_pos as f64,
    })
}

/// `log10(firing frequency + 1e-10)` of every feature over up to `n_tokens` positions of
/// `texts` (the same expression as the original training code).
pub fn log_frequency(model: &Model, tc: &Transcoder, texts: &[String], n_tokens: usize) -> Result<Vec<f32>> {
    let input = tc.meta.points()?.0;
    let mut counts = vec![0f64; tc.meta.d_sae];
    let mut seen = 0usize;
    for text in texts {
        if seen >= n_tokens {
            break;
        }
        let ids = prepare(model, text)?;
        if ids.is_empty() {
            continue;
        }
        let mut hooks = Hooks::none();
        hooks.record(input);
        let mut cache = model.new_cache(1, ids.len());
        model.forward(std::slice::from_ref(&ids), &[vec![true; ids.len()]], &mut cache, &mut hooks, LogitsAt::Last)?;
        let take = ids.len().min(n_tokens - seen);
        let x = hooks.recorded(input).expect("recorded").squeeze(0)?.narrow(0, 0, take)?;
        let active = tc.encode(&x)?.ne(0f32)?.to_dtype(DType::F32)?.sum(0)?.to_vec1::<f32>()?;
        for (c, a) in counts.iter_mut().zip(active) {
            *c += a as f64;
        }
        seen += take;
    }
    if seen == 0 {
        bail!("no tokens to count features over");
    }
    Ok(counts.iter().map(|c| ((c / seen as f64) + 1e-10).log10() as f32).collect())
}
