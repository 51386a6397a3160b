//! Training a ReLU transcoder for one layer's MLP, for models with no public transcoder.
//!
//! Objective (as the reference stories260K transcoders were trained):
//! `‖y − ŷ‖² / V + λ · Σᵢ fᵢ‖W_dec[i]‖ / √V`, with `V = E‖y − E y‖²` over the training
//! tokens, x = `blocks.L.ln2.hook_normalized`, y = `blocks.L.hook_mlp_out`. Adam (lr decays
//! linearly over the last 20% of steps), λ warms up over the first 5%, batches are drawn from a
//! shuffled activation buffer, and features that stayed dead for `resample_every` steps are
//! re-initialised towards badly reconstructed tokens during the first half.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::ProgressStyle;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::{Transcoder, TranscoderMeta};
use crate::hooks::{HookPoint, Hooks};
use crate::model::{LogitsAt, Model};

/// Training settings.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    pub layer: usize,
    pub d_sae: usize,
    /// λ, the sparsity coefficient.
    pub l1_coefficient: f64,
    pub lr: f64,
    pub steps: usize,
    pub batch_tokens: usize,
    /// Dead-feature resampling period (0 = never).
    pub resample_every: usize,
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { layer: 0, d_sae: 512, l1_coefficient: 0.05, lr: 1e-3, steps: 3000, batch_tokens: 2048, resample_every: 500, seed: 0 }
    }
}

impl TrainOptions {
    /// Refuses settings training cannot run with.
    pub fn check(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            anyhow::bail!("--lr {} must be a positive number", self.lr);
        }
        if !(self.l1_coefficient.is_finite() && self.l1_coefficient >= 0.0) {
            anyhow::bail!("--l1-coefficient {} must be a non-negative number", self.l1_coefficient);
        }
        for (flag, v) in [("--d-sae", self.d_sae), ("--steps", self.steps), ("--batch-tokens", self.batch_tokens)] {
            if v == 0 {
                anyhow::bail!("{flag} must be at least 1");
            }
        }
        Ok(())
    }
}

/// What training measured on held-out tokens.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub train_tokens: usize,
    pub heldout_tokens: usize,
    /// Fraction of variance of the MLP output explained.
    pub fve: f64,
    /// Mean number of active features per token.
    pub l0: f64,
    pub dead: usize,
    pub resampled: usize,
    pub options: TrainOptions,
}

/// The MLP input and output of `layer` at every real position of `texts` (`[n, d]` each), up
/// to `max_tokens` positions. Texts longer than the context are cut to it.
pub fn collect_activations(model: &Model, texts: &[String], layer: usize, max_tokens: usize) -> Result<(Tensor, Tensor)> {
    if layer >= model.info.n_layers {
        bail!("layer {layer} does not exist (the model has {} layers)", model.info.n_layers);
    }
    let (pin, pout) = (HookPoint::Ln2Normalized(layer), HookPoint::MlpOut(layer));
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    let mut n = 0;
    for text in texts {
        if n >= max_tokens {
            break;
        }
        let mut ids = model.codec.to_tokens(text)?;
        ids.truncate(model.info.n_ctx);
        if ids.is_empty() {
            continue;
        }
        let mut hooks = Hooks::none();
        hooks.record(pin);
        hooks.record(pout);
        let mut cache = model.new_cache(1, ids.len());
        model.forward(&[ids.clone()], &[vec![true; ids.len()]], &mut cache, &mut hooks, LogitsAt::Last)?;
        let take = ids.len().min(max_tokens - n);
        xs.push(hooks.recorded(pin).expect("recorded").squeeze(0)?.narrow(0, 0, take)?);
        ys.push(hooks.recorded(pout).expect("recorded").squeeze(0)?.narrow(0, 0, take)?);
        n += take;
    }
    if xs.is_empty() {
        bail!("no tokens to train on");
    }
    Ok((Tensor::cat(&xs, 0)?, Tensor::cat(&ys, 0)?))
}

/// Trains a transcoder on `(x, y)` activations; the last 10% of tokens are held out.
pub fn train(x: &Tensor, y: &Tensor, opts: &TrainOptions, meta: TranscoderMeta) -> Result<(Transcoder, TrainReport)> {
    let dev = x.device().clone();
    let (n, d_in) = x.dims2()?;
    let d_out = y.dim(1)?;
    let n_held = (n / 10).max(1);
    let n_train = n - n_held;
    if n_train < opts.batch_tokens.min(64) {
        bail!("only {n} tokens: too few to train on");
    }
    let (x_train, y_train) = (x.narrow(0, 0, n_train)?, y.narrow(0, 0, n_train)?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);

    let mean_x = x_train.mean_keepdim(0)?;
    let mean_y = y_train.mean_keepdim(0)?;
    let variance = y_train.broadcast_sub(&mean_y)?.sqr()?.sum_keepdim(1)?.mean_all()?.to_scalar::<f32>()? as f64;
    let variance = variance.max(1e-12);

    // Decoder rows: random unit directions (scaled); encoder: their transpose.
    let w_dec0: Vec<f32> = (0..opts.d_sae * d_out).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
    let w_dec0 = Tensor::from_vec(w_dec0, (opts.d_sae, d_out), &dev)?;
    let w_dec0 = (w_dec0.broadcast_div(&w_dec0.sqr()?.sum_keepdim(1)?.sqrt()?)? * (variance.sqrt() * 0.1))?;
    let w_enc0: Vec<f32> = (0..d_in * opts.d_sae).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
    let w_enc0 = (Tensor::from_vec(w_enc0, (d_in, opts.d_sae), &dev)? * (1.0 / (d_in as f64).sqrt()))?;
    let w_enc = Var::from_tensor(&w_enc0)?;
    let b_enc = Var::from_tensor(&Tensor::zeros(opts.d_sae, DType::F32, &dev)?)?;
    let w_dec = Var::from_tensor(&w_dec0)?;
    let b_dec_in = Var::from_tensor(&mean_x.squeeze(0)?)?;
    let b_dec_out = Var::from_tensor(&mean_y.squeeze(0)?)?;
    let params = ParamsAdamW { lr: opts.lr, weight_decay: 0.0, ..Default::default() };
    let mut adam = AdamW::new(vec![w_enc.clone(), b_enc.clone(), w_dec.clone(), b_dec_in.clone(), b_dec_out.clone()], params)?;

    let bar = crate::progress::bar(opts.steps as u64).with_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} steps, {msg}, eta {eta}").expect("valid template"),
    );
    let mut order: Vec<u32> = (0..n_train as u32).collect();
    order.shuffle(&mut rng);
    let mut cursor = 0;
    let mut fired_since = vec![false; opts.d_sae];
    let mut resampled = 0;
    let batch = opts.batch_tokens.min(n_train);
    for step in 0..opts.steps {
        if cursor + batch > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let idx = Tensor::from_slice(&order[cursor..cursor + batch], batch, &dev)?;
        cursor += batch;
        let xb = x_train.index_select(&idx, 0)?;
        let yb = y_train.index_select(&idx, 0)?;
        let f = xb.broadcast_sub(b_dec_in.as_tensor())?.matmul(w_enc.as_tensor())?.broadcast_add(b_enc.as_tensor())?.relu()?;
        let y_hat = f.matmul(w_dec.as_tensor())?.broadcast_add(b_dec_out.as_tensor())?;
        let mse = (y_hat - &yb)?.sqr()?.sum(1)?.mean_all()?;
        let dec_norms = w_dec.as_tensor().sqr()?.sum(1)?.sqrt()?;
        let sparsity = f.broadcast_mul(&dec_norms)?.sum(1)?.mean_all()?;
        let warm = ((step + 1) as f64 / (opts.steps as f64 * 0.05).max(1.0)).min(1.0);
        let lambda = opts.l1_coefficient * warm;
        let loss = ((mse.clone() / variance)? + (sparsity * (lambda / variance.sqrt()))?)?;
        let decay_start = opts.steps * 4 / 5;
        let lr = if step < decay_start { opts.lr } else { opts.lr * (opts.steps - step) as f64 / (opts.steps - decay_start) as f64 };
        adam.set_learning_rate(lr);
        adam.backward_step(&loss)?;

        let active = f.gt(0f32)?.max(0)?.to_vec1::<u8>()?;
        for (i, a) in active.iter().enumerate() {
            fired_since[i] |= *a != 0;
        }
        if opts.resample_every > 0 && (step + 1) % opts.resample_every == 0 {
            if step < opts.steps / 2 {
                resampled += resample_dead(&fired_since, &xb, &yb, &w_enc, &b_enc, &w_dec, &b_dec_in, &b_dec_out, &mut rng)?;
            }
            fired_since.iter_mut().for_each(|f| *f = false);
        }
        if step % 50 == 0 {
            bar.set_message(format!("mse/var {:.3}", mse.to_scalar::<f32>()? as f64 / variance));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let tc = Transcoder {
        meta,
        w_enc: w_enc.as_tensor().clone(),
        b_enc: b_enc.as_tensor().clone(),
        w_dec: w_dec.as_tensor().clone(),
        w_dec_next: Vec::new(),
        b_dec_in: b_dec_in.as_tensor().clone(),
        b_dec_out: b_dec_out.as_tensor().clone(),
        threshold: None,
        w_skip: None,
        log_frequency: None,
    };
    let (x_held, y_held) = (x.narrow(0, n_train, n_held)?, y.narrow(0, n_train, n_held)?);
    let (fve, l0, freq) = fidelity(&tc, &x_held, &y_held)?;
    let dead = freq.iter().filter(|&&f| f == 0.0).count();
    let tc = Transcoder { log_frequency: Some(freq.iter().map(|&f| (f + 1e-10).log10() as f32).collect()), ..tc };
    let report = TrainReport { train_tokens: n_train, heldout_tokens: n_held, fve, l0, dead, resampled, options: opts.clone() };
    Ok((tc, report))
}

/// Fraction of variance explained, mean L0 and per-feature firing frequency on `(x, y)`.
pub fn fidelity(tc: &Transcoder, x: &Tensor, y: &Tensor) -> Result<(f64, f64, Vec<f64>)> {
    let f = tc.encode(x)?;
    let y_hat = tc.decode(&f)?;
    let err = (y_hat - y)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let total = y.broadcast_sub(&y.mean_keepdim(0)?)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let active = f.gt(0f32)?.to_dtype(DType::F32)?;
    let n = x.dim(0)? as f64;
    let l0 = active.sum(D::Minus1)?.mean_all()?.to_scalar::<f32>()? as f64;
    let freq: Vec<f64> = active.sum(0)?.to_vec1::<f32>()?.into_iter().map(|c| c as f64 / n).collect();
    Ok((1.0 - err / total.max(1e-12), l0, freq))
}

/// Re-initialises features that did not fire: encoder towards the input of a badly
/// reconstructed token, decoder towards its residual error. Returns how many were reset.
#[allow(clippy::too_many_arguments)]
fn resample_dead(
    fired: &[bool],
    xb: &Tensor,
    yb: &Tensor,
    w_enc: &Var,
    b_enc: &Var,
    w_dec: &Var,
    b_dec_in: &Var,
    b_dec_out: &Var,
    rng: &mut rand::rngs::StdRng,
) -> Result<usize> {
    let dead: Vec<usize> = fired.iter().enumerate().filter(|(_, &f)| !f).map(|(i, _)| i).collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let f = xb.broadcast_sub(b_dec_in.as_tensor())?.matmul(w_enc.as_tensor())?.broadcast_add(b_enc.as_tensor())?.relu()?;
    let err = (yb - f.matmul(w_dec.as_tensor())?.broadcast_add(b_dec_out.as_tensor())?)?;
    let loss: Vec<f32> = err.sqr()?.sum(1)?.to_vec1()?;
    let xc = xb.broadcast_sub(b_dec_in.as_tensor())?.to_vec2::<f32>()?;
    let errs = err.to_vec2::<f32>()?;
    let mut we = w_enc.as_tensor().to_vec2::<f32>()?;
    let mut wd = w_dec.as_tensor().to_vec2::<f32>()?;
    let mut be = b_enc.as_tensor().to_vec1::<f32>()?;
    let total: f64 = loss.iter().map(|&l| l as f64).sum();
    let alive_norm = {
        let norms: Vec<f32> = we[0].iter().enumerate().map(|(j, _)| we.iter().map(|r| r[j] * r[j]).sum::<f32>().sqrt()).collect();
        let alive: Vec<f32> = norms.iter().enumerate().filter(|(i, _)| fired[*i]).map(|(_, &n)| n).collect();
        if alive.is_empty() { 1.0 } else { alive.iter().sum::<f32>() / alive.len() as f32 }
    };
    for &i in &dead {
        // Draw a token with probability proportional to its squared error.
        let mut target = rng.gen::<f64>() * total;
        let mut j = 0;
        while j + 1 < loss.len() && target > loss[j] as f64 {
            target -= loss[j] as f64;
            j += 1;
        }
        let xn = xc[j].iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
        for (k, row) in we.iter_mut().enumerate() {
            row[i] = xc[j][k] / xn * alive_norm * 0.2;
        }
        for (k, v) in wd[i].iter_mut().enumerate() {
            *v = errs[j][k] * 0.2;
        }
        be[i] = 0.0;
    }
    let dev = w_enc.device().clone();
    w_enc.set(&Tensor::new(we, &dev)?)?;
    w_dec.set(&Tensor::new(wd, &dev)?)?;
    b_enc.set(&Tensor::new(be, &dev)?)?;
    Ok(dead.len())
}

/// Collects activations of `opts.layer` over `texts`, trains, and saves the transcoder (with
/// its held-out log10 frequencies) to `out` in neurosteer's format (its folder is created first,
/// so that a folder that cannot be made fails before the training, not after).
pub fn train_for_model(model: &Model, texts: &[String], opts: &TrainOptions, max_tokens: usize, out: &std::path::Path) -> Result<TrainReport> {
    opts.check()?;
    if opts.layer >= model.info.n_layers {
        anyhow::bail!("--layer {}: the model has {} layers", opts.layer, model.info.n_layers);
    }
    crate::report::create_parent(out)?;
    eprintln!("collecting activations of layer {} ...", opts.layer);
    let (x, y) = collect_activations(model, texts, opts.layer, max_tokens)?;
    let l = opts.layer;
    let mut extra = serde_json::Map::new();
    extra.insert("l1_coefficient".into(), opts.l1_coefficient.into());
    extra.insert("training_steps".into(), opts.steps.into());
    let meta = TranscoderMeta {
        layer: l,
        hook_in: HookPoint::Ln2Normalized(l).to_string(),
        hook_out: HookPoint::MlpOut(l).to_string(),
        d_in: model.info.d_model,
        d_sae: opts.d_sae,
        d_out: model.info.d_model,
        format: "neurosteer".into(),
        activation: Default::default(),
        model_name: Some(model.info.source.clone()),
        extra,
    };
    let (tc, report) = train(&x, &y, opts, meta)?;
    tc.save(out)?;
    Ok(report)
}
