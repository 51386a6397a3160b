//! Training a ReLU transcoder for one layer's MLP, for models with no public transcoder.
//!
//! Objective (as the reference stories260K transcoders were trained):
//! `‖y − ŷ‖² / V + λ · Σᵢ fᵢ‖W_dec[i]‖ / √V`, with `V = E‖y − E y‖²` over the training
//! tokens, x = `blocks.L.ln2.hook_normalized`, y = `blocks.L.hook_mlp_out`. Adam (lr decays
//! linearly over the last 20% of steps), λ warms up over the first 5%, batches are drawn from a
//! shuffled activation buffer, and features that stayed dead for `resample_every` steps are
//! re-initialised towards badly reconstructed tokens during the first half.
//!
//! On the CPU a step (forward pass, gradient, Adam) is written out by hand, its batch-sized buffers
//! allocated once; elsewhere (a GPU) it is candle's autograd and `AdamW`, against which the
//! tests check the CPU step.

use anyhow::{bail, Result};
use candle_core::{DType, Layout, Storage, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::ProgressStyle;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;

use super::{Transcoder, TranscoderMeta};
use crate::hooks::{HookPoint, Hooks};
use crate::model::Model;

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
    // Each text's first tokens, up to `max_tokens` in all (attention is causal, so a text's
    // first tokens alone give what they give within the whole text).
    let mut docs: Vec<Vec<u32>> = Vec::new();
    let mut n = 0;
    for text in texts {
        if n >= max_tokens {
            break;
        }
        let mut ids = model.codec.to_tokens(text)?;
        ids.truncate(model.info.n_ctx.min(max_tokens - n));
        if !ids.is_empty() {
            n += ids.len();
            docs.push(ids);
        }
    }
    if docs.is_empty() {
        bail!("no tokens to train on");
    }
    let (pin, pout) = (HookPoint::Ln2Normalized(layer), HookPoint::MlpOut(layer));
    let mut parts: Vec<Option<(Tensor, Tensor)>> = vec![None; docs.len()];
    // Texts of similar lengths run together, left-padded, through the blocks up to the layer's
    // MLP only. A batch gives each text what it gets alone: bit for bit with the AVX-512
    // kernels (whose sums do not depend on the row count), within rounding elsewhere.
    for chunk in crate::generate::batches(&docs, TEXTS_PER_PASS, Some(TOKENS_PER_PASS)) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| docs[i].as_slice()).collect();
        let (tokens, valid) = crate::generate::padded(model, &batch);
        let seq = tokens[0].len();
        let mut hooks = Hooks::none();
        hooks.record(pin);
        hooks.record(pout);
        model.forward_prefix(&tokens, &valid, &mut model.new_cache(batch.len(), seq), &mut hooks, layer + 1)?;
        let (xs, ys) = (hooks.recorded(pin).expect("recorded"), hooks.recorded(pout).expect("recorded"));
        for (row, &i) in chunk.iter().enumerate() {
            let len = docs[i].len();
            parts[i] = Some((xs.get(row)?.narrow(0, seq - len, len)?, ys.get(row)?.narrow(0, seq - len, len)?));
        }
    }
    let (xs, ys): (Vec<Tensor>, Vec<Tensor>) = parts.into_iter().map(|p| p.expect("every text ran")).unzip();
    Ok((Tensor::cat(&xs, 0)?, Tensor::cat(&ys, 0)?))
}

/// Texts, and padded positions, per forward pass when collecting activations (a text longer
/// than `TOKENS_PER_PASS` runs alone).
const TEXTS_PER_PASS: usize = 8;
const TOKENS_PER_PASS: usize = 4096;

/// Trains a transcoder on `(x, y)` activations; the last 10% of tokens are held out.
pub fn train(x: &Tensor, y: &Tensor, opts: &TrainOptions, meta: TranscoderMeta) -> Result<(Transcoder, TrainReport)> {
    opts.check()?;
    let dev = x.device().clone();
    let (n, d_in) = x.dims2()?;
    let d_out = y.dim(1)?;
    for (what, t) in [("inputs", x), ("outputs", y)] {
        if !crate::model::all_finite(t)? {
            bail!("the layer-{} MLP {what} collected from the model hold NaN or infinite values: its forward pass overflows", meta.layer);
        }
    }
    let n_held = (n / 10).max(1);
    let n_train = n - n_held;
    if n_train < opts.batch_tokens.min(64) {
        bail!("only {n} tokens: too few to train on");
    }
    let host = |t: &Tensor| t.narrow(0, 0, n_train)?.to_dtype(DType::F32)?.contiguous();
    let (x_train, y_train) = (host(x)?, host(y)?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);

    let mean_x = x_train.mean_keepdim(0)?;
    let mean_y = y_train.mean_keepdim(0)?;
    let variance = y_train.broadcast_sub(&mean_y)?.sqr()?.sum_keepdim(1)?.mean_all()?.to_scalar::<f32>()? as f64;
    let variance = variance.max(1e-12);
    let shape = Shape { d_in, d_sae: opts.d_sae, d_out };
    let init = Params::init(shape, variance, mean_x.flatten_all()?.to_vec1()?, mean_y.flatten_all()?.to_vec1()?, &mut rng);
    // On the CPU the trainer reads the activations where they lie (no copy).
    let storages = dev.is_cpu().then(|| (x_train.storage_and_layout(), y_train.storage_and_layout()));
    let mut trainer: Box<dyn Trainer + '_> = match &storages {
        Some(((xs, xl), (ys, yl))) => Box::new(CpuTrainer::new(init, shape, cpu_f32(xs, xl, n_train * d_in)?, cpu_f32(ys, yl, n_train * d_out)?, variance)),
        None => Box::new(CandleTrainer::new(&init, shape, x_train.clone(), y_train.clone(), variance)?),
    };

    let resampled = optimise(trainer.as_mut(), shape, n_train, variance, opts, &mut rng)?;

    let p = trainer.params()?;
    let tensor = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &dev);
    let tc = Transcoder {
        meta,
        w_enc: tensor(p.w_enc, &[d_in, opts.d_sae])?,
        b_enc: tensor(p.b_enc, &[opts.d_sae])?,
        w_dec: tensor(p.w_dec, &[opts.d_sae, d_out])?,
        w_dec_next: Vec::new(),
        b_dec_in: tensor(p.b_dec_in, &[d_in])?,
        b_dec_out: tensor(p.b_dec_out, &[d_out])?,
        threshold: None,
        w_skip: None,
        log_frequency: None,
    };
    if let Some(name) = tc.first_non_finite()? {
        bail!("training diverged: {name} holds NaN or infinite values after {} steps (try a lower --lr)", opts.steps);
    }
    let (x_held, y_held) = (x.narrow(0, n_train, n_held)?, y.narrow(0, n_train, n_held)?);
    let (fve, l0, freq) = fidelity(&tc, &x_held, &y_held)?;
    let dead = freq.iter().filter(|&&f| f == 0.0).count();
    let tc = Transcoder { log_frequency: Some(freq.iter().map(|&f| (f + 1e-10).log10() as f32).collect()), ..tc };
    let report = TrainReport { train_tokens: n_train, heldout_tokens: n_held, fve, l0, dead, resampled, options: opts.clone() };
    Ok((tc, report))
}

/// The first `len` f32 values of a contiguous CPU tensor's storage, from its start.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, len: usize) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(c) => Ok(&c.as_slice::<f32>()?[layout.start_offset()..][..len]),
        _ => bail!("training activations are not on the CPU"),
    }
}

/// The optimisation: `opts.steps` steps over shuffled batches of the `n_train` training rows,
/// with λ's warm-up, the learning rate's decay and dead-feature resampling. Returns how many
/// features were resampled.
fn optimise(trainer: &mut dyn Trainer, shape: Shape, n_train: usize, variance: f64, opts: &TrainOptions, rng: &mut rand::rngs::StdRng) -> Result<usize> {
    let bar = crate::progress::bar(opts.steps as u64).with_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} steps, {msg}, eta {eta}").expect("valid template"),
    );
    let mut order: Vec<u32> = (0..n_train as u32).collect();
    order.shuffle(rng);
    let mut cursor = 0;
    let mut fired_since = vec![false; opts.d_sae];
    let mut resampled = 0;
    let batch = opts.batch_tokens.min(n_train);
    for step in 0..opts.steps {
        if cursor + batch > order.len() {
            order.shuffle(rng);
            cursor = 0;
        }
        let rows = &order[cursor..cursor + batch];
        cursor += batch;
        let warm = ((step + 1) as f64 / (opts.steps as f64 * 0.05).max(1.0)).min(1.0);
        let lambda = opts.l1_coefficient * warm;
        let decay_start = opts.steps * 4 / 5;
        let lr = if step < decay_start { opts.lr } else { opts.lr * (opts.steps - step) as f64 / (opts.steps - decay_start) as f64 };
        let (mse, fired) = trainer.step(rows, lambda, lr)?;
        for (f, &now) in fired_since.iter_mut().zip(&fired) {
            *f |= now;
        }
        if opts.resample_every > 0 && (step + 1) % opts.resample_every == 0 {
            if step < opts.steps / 2 {
                let dead: Vec<usize> = fired_since.iter().enumerate().filter(|(_, &f)| !f).map(|(i, _)| i).collect();
                if !dead.is_empty() {
                    let mut p = trainer.params()?;
                    let (xb, yb) = trainer.rows(rows)?;
                    if resample_dead(&mut p, shape, &xb, &yb, &dead, &fired_since, rng) {
                        trainer.set_params(p)?;
                        resampled += dead.len();
                    }
                }
            }
            fired_since.iter_mut().for_each(|f| *f = false);
        }
        if step % 50 == 0 {
            bar.set_message(format!("mse/var {:.3}", mse / variance));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(resampled)
}

/// Widths of the transcoder being trained.
#[derive(Debug, Clone, Copy)]
struct Shape {
    d_in: usize,
    d_sae: usize,
    d_out: usize,
}

/// The parameters on the host (or their gradients, or Adam's moments: the same shapes).
#[derive(Debug, Clone, PartialEq)]
struct Params {
    /// `[d_in, d_sae]`.
    w_enc: Vec<f32>,
    /// `[d_sae]`.
    b_enc: Vec<f32>,
    /// `[d_sae, d_out]`.
    w_dec: Vec<f32>,
    /// `[d_in]`.
    b_dec_in: Vec<f32>,
    /// `[d_out]`.
    b_dec_out: Vec<f32>,
}

impl Params {
    /// Decoder rows: random directions of norm `0.1 √V`; encoder: uniform in ±1/√d_in; the
    /// biases: zero, and the means of x and y for the centrings.
    fn init(s: Shape, variance: f64, mean_x: Vec<f32>, mean_y: Vec<f32>, rng: &mut rand::rngs::StdRng) -> Self {
        let mut w_dec: Vec<f32> = (0..s.d_sae * s.d_out).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
        for row in w_dec.chunks_exact_mut(s.d_out) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            let scale = (variance.sqrt() * 0.1) as f32 / norm;
            row.iter_mut().for_each(|v| *v *= scale);
        }
        let scale = 1.0 / (s.d_in as f32).sqrt();
        let w_enc = (0..s.d_in * s.d_sae).map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale).collect();
        Self { w_enc, b_enc: vec![0.0; s.d_sae], w_dec, b_dec_in: mean_x, b_dec_out: mean_y }
    }

    fn zeros_like(&self) -> Self {
        let z = |v: &Vec<f32>| vec![0.0; v.len()];
        Self { w_enc: z(&self.w_enc), b_enc: z(&self.b_enc), w_dec: z(&self.w_dec), b_dec_in: z(&self.b_dec_in), b_dec_out: z(&self.b_dec_out) }
    }

    fn parts(&self) -> [&[f32]; 5] {
        [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec_in, &self.b_dec_out]
    }

    fn parts_mut(&mut self) -> [&mut [f32]; 5] {
        [&mut self.w_enc, &mut self.b_enc, &mut self.w_dec, &mut self.b_dec_in, &mut self.b_dec_out]
    }
}

/// One way of running optimizer steps: by hand on the CPU, or with candle's autograd.
trait Trainer {
    /// Forward, gradient of `mse / V + λ / √V · Σᵢ fᵢ‖W_dec[i]‖` (both averaged over the batch)
    /// and an Adam step at `lr`, on rows `rows` of the training buffer. Returns the batch's mse
    /// and which features fired on it.
    fn step(&mut self, rows: &[u32], lambda: f64, lr: f64) -> Result<(f64, Vec<bool>)>;
    fn params(&self) -> Result<Params>;
    fn set_params(&mut self, p: Params) -> Result<()>;
    /// Rows `rows` of the training buffer's x and y, on the host.
    fn rows(&self, rows: &[u32]) -> Result<(Vec<f32>, Vec<f32>)>;
}

/// Adam as candle-nn's `AdamW` computes it, without weight decay (its default β and ε).
struct Adam {
    m: Params,
    v: Params,
    t: i32,
}

impl Adam {
    fn new(p: &Params) -> Self {
        Self { m: p.zeros_like(), v: p.zeros_like(), t: 0 }
    }

    fn step(&mut self, p: &mut Params, g: &Params, lr: f64) {
        let ParamsAdamW { beta1, beta2, eps, .. } = ParamsAdamW::default();
        self.t += 1;
        let scale_m = (1.0 / (1.0 - beta1.powi(self.t))) as f32;
        let scale_v = (1.0 / (1.0 - beta2.powi(self.t))) as f32;
        let (b1, c1, b2, c2, eps, lr) = (beta1 as f32, (1.0 - beta1) as f32, beta2 as f32, (1.0 - beta2) as f32, eps as f32, lr as f32);
        for (((p, g), m), v) in p.parts_mut().into_iter().zip(g.parts()).zip(self.m.parts_mut()).zip(self.v.parts_mut()) {
            p.par_chunks_mut(4096).zip(g.par_chunks(4096)).zip(m.par_chunks_mut(4096)).zip(v.par_chunks_mut(4096)).for_each(|(((p, g), m), v)| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = *m * b1 + g * c1;
                    *v = *v * b2 + g * g * c2;
                    *p -= *m * scale_m / ((*v * scale_v).sqrt() + eps) * lr;
                }
            });
        }
    }
}

/// Training on the CPU: the forward pass, its gradient written out and Adam, in fused passes
/// over batch-sized buffers allocated once, with `gemm` for the products.
struct CpuTrainer<'a> {
    shape: Shape,
    /// The training buffer, `[n, d_in]` and `[n, d_out]`.
    x: &'a [f32],
    y: &'a [f32],
    variance: f64,
    p: Params,
    g: Params,
    adam: Adam,
    buf: Buffers,
}

/// One batch's intermediate values.
#[derive(Default)]
struct Buffers {
    /// `x − b_dec_in`, `[batch, d_in]`.
    xc: Vec<f32>,
    /// Feature activations, `[batch, d_sae]`.
    f: Vec<f32>,
    /// The residual `ŷ − y`, `[batch, d_out]`.
    r: Vec<f32>,
    /// The gradient at the pre-activations, `[batch, d_sae]`.
    df: Vec<f32>,
    /// `‖W_dec[i]‖` and `Σ_b f_bi`, `[d_sae]` each.
    norms: Vec<f32>,
    fsum: Vec<f32>,
    /// Each row's squared error, `[batch]`.
    sse: Vec<f64>,
}

impl Buffers {
    /// The forward pass over rows `rows` of `x` and `y`; returns the sum of squared errors.
    fn forward(&mut self, p: &Params, s: Shape, x: &[f32], y: &[f32], rows: &[u32]) -> f64 {
        let b = rows.len();
        self.xc.resize(b * s.d_in, 0.0);
        self.f.resize(b * s.d_sae, 0.0);
        self.r.resize(b * s.d_out, 0.0);
        self.xc.par_chunks_mut(s.d_in).zip(rows).for_each(|(xc, &r)| {
            for ((o, &v), &c) in xc.iter_mut().zip(&x[r as usize * s.d_in..][..s.d_in]).zip(&p.b_dec_in) {
                *o = v - c;
            }
        });
        product(&mut self.f, b, s.d_sae, s.d_in, (&self.xc, s.d_in, 1), (&p.w_enc, s.d_sae, 1), 1.0);
        self.f.par_chunks_mut(s.d_sae).for_each(|f| {
            for (v, &c) in f.iter_mut().zip(&p.b_enc) {
                *v = (*v + c).max(0.0);
            }
        });
        product(&mut self.r, b, s.d_out, s.d_sae, (&self.f, s.d_sae, 1), (&p.w_dec, s.d_out, 1), 1.0);
        self.sse.resize(b, 0.0);
        self.r.par_chunks_mut(s.d_out).zip(&mut self.sse).zip(rows).for_each(|((r, sse), &row)| {
            *sse = 0.0;
            for ((v, &c), &t) in r.iter_mut().zip(&p.b_dec_out).zip(&y[row as usize * s.d_out..][..s.d_out]) {
                *v = *v + c - t;
                *sse += (*v as f64) * (*v as f64);
            }
        });
        self.sse.iter().sum()
    }
}

impl<'a> CpuTrainer<'a> {
    fn new(p: Params, shape: Shape, x: &'a [f32], y: &'a [f32], variance: f64) -> Self {
        Self { shape, x, y, variance, g: p.zeros_like(), adam: Adam::new(&p), p, buf: Buffers::default() }
    }

    /// The forward pass and the gradient (into `self.g`) on rows `rows`; returns the mse.
    fn gradient(&mut self, rows: &[u32], lambda: f64) -> f64 {
        let (s, p, g, buf) = (self.shape, &self.p, &mut self.g, &mut self.buf);
        let b = rows.len();
        let mse = buf.forward(p, s, self.x, self.y, rows) / b as f64;
        // d loss / d ŷ = c · r; the sparsity term adds `w` times each feature's decoder norm.
        let c = (2.0 / (b as f64 * self.variance)) as f32;
        let w = (lambda / self.variance.sqrt() / b as f64) as f32;
        buf.norms.resize(s.d_sae, 0.0);
        buf.norms.par_iter_mut().zip(p.w_dec.par_chunks(s.d_out)).for_each(|(n, row)| *n = row.iter().map(|v| v * v).sum::<f32>().sqrt());
        column_sums(&buf.f, s.d_sae, &mut buf.fsum);
        // Decoder: c · fᵀ r, plus the norms' gradient w · (Σ_b f_bi) · W_dec[i] / ‖W_dec[i]‖.
        product(&mut g.w_dec, s.d_sae, s.d_out, b, (&buf.f, 1, s.d_sae), (&buf.r, s.d_out, 1), c);
        g.w_dec.par_chunks_mut(s.d_out).zip(p.w_dec.par_chunks(s.d_out)).enumerate().for_each(|(i, (g, w_row))| {
            let k = w * buf.fsum[i] / buf.norms[i];
            for (g, &v) in g.iter_mut().zip(w_row) {
                *g += k * v;
            }
        });
        column_sums(&buf.r, s.d_out, &mut g.b_dec_out);
        g.b_dec_out.iter_mut().for_each(|v| *v *= c);
        // Pre-activations: (c · r W_decᵀ + w · ‖W_dec[i]‖) where the feature fired, else 0 (a
        // pre-activation of exactly 0 counts as not fired, as in PyTorch; candle's autograd lets
        // it through).
        buf.df.resize(b * s.d_sae, 0.0);
        product(&mut buf.df, b, s.d_sae, s.d_out, (&buf.r, s.d_out, 1), (&p.w_dec, 1, s.d_out), c);
        buf.df.par_chunks_mut(s.d_sae).zip(buf.f.par_chunks(s.d_sae)).for_each(|(df, f)| {
            for ((d, &f), &n) in df.iter_mut().zip(f).zip(&buf.norms) {
                *d = if f > 0.0 { *d + w * n } else { 0.0 };
            }
        });
        // Encoder: xcᵀ df; its bias: Σ_b df; the input centring: −W_enc · Σ_b df.
        product(&mut g.w_enc, s.d_in, s.d_sae, b, (&buf.xc, 1, s.d_in), (&buf.df, s.d_sae, 1), 1.0);
        column_sums(&buf.df, s.d_sae, &mut g.b_enc);
        for (gb, w_row) in g.b_dec_in.iter_mut().zip(p.w_enc.chunks_exact(s.d_sae)) {
            *gb = -w_row.iter().zip(&g.b_enc).map(|(w, d)| w * d).sum::<f32>();
        }
        mse
    }
}

impl Trainer for CpuTrainer<'_> {
    fn step(&mut self, rows: &[u32], lambda: f64, lr: f64) -> Result<(f64, Vec<bool>)> {
        let mse = self.gradient(rows, lambda);
        self.adam.step(&mut self.p, &self.g, lr);
        Ok((mse, self.buf.fsum.iter().map(|&s| s > 0.0).collect()))
    }

    fn params(&self) -> Result<Params> {
        Ok(self.p.clone())
    }

    fn set_params(&mut self, p: Params) -> Result<()> {
        self.p = p;
        Ok(())
    }

    fn rows(&self, rows: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (di, dout) = (self.shape.d_in, self.shape.d_out);
        Ok((
            rows.iter().flat_map(|&r| &self.x[r as usize * di..][..di]).copied().collect(),
            rows.iter().flat_map(|&r| &self.y[r as usize * dout..][..dout]).copied().collect(),
        ))
    }
}

/// `dst [m, n] = scale · a · b`, for `a [m, k]` and `b [k, n]` given as slices with their row and
/// column strides.
fn product(dst: &mut [f32], m: usize, n: usize, k: usize, a: (&[f32], usize, usize), b: (&[f32], usize, usize), scale: f32) {
    // Whether a `rows × cols` view with these strides lies in its slice (an empty view always does).
    let fits = |(v, rs, cs): (&[f32], usize, usize), rows: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1).checked_mul(rs).zip((cols - 1).checked_mul(cs)).and_then(|(r, c)| r.checked_add(c)).is_some_and(|last| last < v.len())
    };
    assert!(m.checked_mul(n).is_some_and(|mn| mn <= dst.len()) && fits(a, m, k) && fits(b, k, n), "product: a slice is too short for its shape");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every element read or written lies in its slice (checked above); with k = 0 gemm
    // reads neither a nor b and writes zeros.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads().max(1)),
        );
    }
}

/// `out[j] = Σ_i a[i][j]` over the rows of `a` (`cols` wide), each sum in row order (blocks of
/// columns in parallel).
fn column_sums(a: &[f32], cols: usize, out: &mut Vec<f32>) {
    const BLOCK: usize = 16;
    out.clear();
    out.resize(cols, 0.0);
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, sums)| {
        for row in a.chunks_exact(cols) {
            sums.iter_mut().zip(&row[bi * BLOCK..]).for_each(|(s, &v)| *s += v);
        }
    });
}

/// Training with candle's autograd and `AdamW` (on a GPU).
struct CandleTrainer {
    x: Tensor,
    y: Tensor,
    variance: f64,
    w_enc: Var,
    b_enc: Var,
    w_dec: Var,
    b_dec_in: Var,
    b_dec_out: Var,
    adam: AdamW,
}

impl CandleTrainer {
    fn new(p: &Params, s: Shape, x: Tensor, y: Tensor, variance: f64) -> Result<Self> {
        let dev = x.device().clone();
        let var = |v: &[f32], shape: &[usize]| Var::from_tensor(&Tensor::from_slice(v, shape, &dev)?);
        let (w_enc, b_enc, w_dec) = (var(&p.w_enc, &[s.d_in, s.d_sae])?, var(&p.b_enc, &[s.d_sae])?, var(&p.w_dec, &[s.d_sae, s.d_out])?);
        let (b_dec_in, b_dec_out) = (var(&p.b_dec_in, &[s.d_in])?, var(&p.b_dec_out, &[s.d_out])?);
        let params = ParamsAdamW { weight_decay: 0.0, ..Default::default() };
        let adam = AdamW::new(vec![w_enc.clone(), b_enc.clone(), w_dec.clone(), b_dec_in.clone(), b_dec_out.clone()], params)?;
        Ok(Self { x, y, variance, w_enc, b_enc, w_dec, b_dec_in, b_dec_out, adam })
    }

    /// The loss on rows `rows`, its mse term and the feature activations.
    fn loss(&self, rows: &[u32], lambda: f64) -> Result<(Tensor, Tensor, Tensor)> {
        let idx = Tensor::from_slice(rows, rows.len(), self.x.device())?;
        let (xb, yb) = (self.x.index_select(&idx, 0)?, self.y.index_select(&idx, 0)?);
        let f = xb.broadcast_sub(self.b_dec_in.as_tensor())?.matmul(self.w_enc.as_tensor())?.broadcast_add(self.b_enc.as_tensor())?.relu()?;
        let y_hat = f.matmul(self.w_dec.as_tensor())?.broadcast_add(self.b_dec_out.as_tensor())?;
        let mse = (y_hat - &yb)?.sqr()?.sum(1)?.mean_all()?;
        let dec_norms = self.w_dec.as_tensor().sqr()?.sum(1)?.sqrt()?;
        let sparsity = f.broadcast_mul(&dec_norms)?.sum(1)?.mean_all()?;
        let loss = ((mse.clone() / self.variance)? + (sparsity * (lambda / self.variance.sqrt()))?)?;
        Ok((loss, mse, f))
    }

    fn vars(&self) -> [&Var; 5] {
        [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec_in, &self.b_dec_out]
    }
}

impl Trainer for CandleTrainer {
    fn step(&mut self, rows: &[u32], lambda: f64, lr: f64) -> Result<(f64, Vec<bool>)> {
        let (loss, mse, f) = self.loss(rows, lambda)?;
        self.adam.set_learning_rate(lr);
        self.adam.backward_step(&loss)?;
        let fired = f.gt(0f32)?.max(0)?.to_vec1::<u8>()?;
        Ok((mse.to_scalar::<f32>()? as f64, fired.into_iter().map(|a| a != 0).collect()))
    }

    fn params(&self) -> Result<Params> {
        let [w_enc, b_enc, w_dec, b_dec_in, b_dec_out] = self.vars().map(|v| v.as_tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()));
        Ok(Params { w_enc: w_enc?, b_enc: b_enc?, w_dec: w_dec?, b_dec_in: b_dec_in?, b_dec_out: b_dec_out? })
    }

    fn set_params(&mut self, p: Params) -> Result<()> {
        for (var, v) in self.vars().into_iter().zip(p.parts()) {
            var.set(&Tensor::from_slice(v, var.shape(), var.device())?)?;
        }
        Ok(())
    }

    fn rows(&self, rows: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let idx = Tensor::from_slice(rows, rows.len(), self.x.device())?;
        let host = |t: &Tensor| t.index_select(&idx, 0)?.flatten_all()?.to_vec1::<f32>();
        Ok((host(&self.x)?, host(&self.y)?))
    }
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

/// Re-initialises the features `dead` (which did not fire; `fired` says which did) from a batch
/// `(x, y)` of rows: each one's encoder towards the input of a token drawn with probability
/// proportional to its squared error, its decoder towards that token's residual error. Returns
/// false, changing nothing, when every token of the batch is reconstructed exactly (there is no
/// error to aim at, and a decoder row of zero would have no norm gradient).
fn resample_dead(p: &mut Params, s: Shape, x: &[f32], y: &[f32], dead: &[usize], fired: &[bool], rng: &mut rand::rngs::StdRng) -> bool {
    let rows: Vec<u32> = (0..(x.len() / s.d_in) as u32).collect();
    let mut buf = Buffers::default();
    buf.forward(p, s, x, y, &rows);
    let loss: Vec<f32> = buf.r.chunks_exact(s.d_out).map(|r| r.iter().map(|v| v * v).sum()).collect();
    let total: f64 = loss.iter().map(|&l| l as f64).sum();
    if total <= 0.0 {
        return false;
    }
    // The mean norm of the encoder columns of features that fired.
    let column_norm = |i: usize| p.w_enc.chunks_exact(s.d_sae).map(|row| row[i] * row[i]).sum::<f32>().sqrt();
    let alive: Vec<f32> = (0..s.d_sae).filter(|&i| fired[i]).map(column_norm).collect();
    let alive_norm = if alive.is_empty() { 1.0 } else { alive.iter().sum::<f32>() / alive.len() as f32 };
    for &i in dead {
        let mut target = rng.gen::<f64>() * total;
        let mut j = 0;
        while j + 1 < loss.len() && target > loss[j] as f64 {
            target -= loss[j] as f64;
            j += 1;
        }
        let xc = &buf.xc[j * s.d_in..][..s.d_in];
        let xn = xc.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
        for (row, &v) in p.w_enc.chunks_exact_mut(s.d_sae).zip(xc) {
            row[i] = v / xn * alive_norm * 0.2;
        }
        // The error y − ŷ (the residual is ŷ − y).
        for (w, &r) in p.w_dec[i * s.d_out..][..s.d_out].iter_mut().zip(&buf.r[j * s.d_out..][..s.d_out]) {
            *w = -r * 0.2;
        }
        p.b_enc[i] = 0.0;
    }
    true
}

/// Collects activations of `opts.layer` over `texts`, trains, and saves the transcoder (with
/// its held-out log10 frequencies) to `out` in neurosteer's format (its folder is created first,
/// so that a folder that cannot be made fails before the training, not after).
pub fn train_for_model(model: &Model, texts: &[String], opts: &TrainOptions, max_tokens: usize, out: &std::path::Path) -> Result<TrainReport> {
    opts.check()?; // (before collecting activations; `train` checks again)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Uniform values in ±1 from `seed`.
    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect()
    }

    /// `y = relu(x E + c) D` for `n` random inputs: an MLP whose hidden units a transcoder can
    /// learn as features.
    fn mlp_data(n: usize, d_in: usize, hidden: usize, d_out: usize) -> (Vec<f32>, Vec<f32>) {
        let (x, e, c, d) = (data(n * d_in, 1), data(d_in * hidden, 2), data(hidden, 3), data(hidden * d_out, 4));
        let mut y = vec![0f32; n * d_out];
        for (xr, yr) in x.chunks_exact(d_in).zip(y.chunks_exact_mut(d_out)) {
            for h in 0..hidden {
                let pre: f32 = c[h] - 0.5 + xr.iter().enumerate().map(|(i, &v)| v * e[i * hidden + h]).sum::<f32>();
                for (o, yv) in yr.iter_mut().enumerate() {
                    *yv += pre.max(0.0) * d[h * d_out + o];
                }
            }
        }
        (x, y)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
    }

    /// `n` tokens of [`mlp_data`], their output variance, and initial parameters whose first
    /// four features never fire (their biases far below any pre-activation), the others'
    /// biases varied.
    fn fixture(n: usize, s: Shape) -> (Vec<f32>, Vec<f32>, f64, Params) {
        let (x, y) = mlp_data(n, s.d_in, 16, s.d_out);
        let mean = |v: &[f32], d: usize| (0..d).map(|j| v.iter().skip(j).step_by(d).sum::<f32>() / n as f32).collect::<Vec<f32>>();
        let (mean_x, mean_y) = (mean(&x, s.d_in), mean(&y, s.d_out));
        let variance = y.chunks_exact(s.d_out).map(|r| r.iter().zip(&mean_y).map(|(v, m)| ((v - m) * (v - m)) as f64).sum::<f64>()).sum::<f64>() / n as f64;
        let mut init = Params::init(s, variance, mean_x, mean_y, &mut rand::rngs::StdRng::seed_from_u64(5));
        for (i, b) in init.b_enc.iter_mut().enumerate() {
            *b = if i < 4 { -100.0 } else { (i as f32 * 0.37).sin() * 0.3 };
        }
        (x, y, variance, init)
    }

    /// The CPU step's gradient is candle's autograd gradient of the same loss, and its Adam steps
    /// move the parameters as candle-nn's `AdamW` does.
    #[test]
    fn cpu_steps_match_candle_autograd() {
        let s = Shape { d_in: 12, d_sae: 40, d_out: 10 };
        let n = 300;
        let (x, y, variance, init) = fixture(n, s);
        let tensor = |v: &[f32], d: usize| Tensor::from_slice(v, (n, d), &Device::Cpu).unwrap();
        let mut cpu = CpuTrainer::new(init.clone(), s, &x, &y, variance);
        let mut reference = CandleTrainer::new(&init, s, tensor(&x, s.d_in), tensor(&y, s.d_out), variance).unwrap();
        let rows: Vec<u32> = (0..n as u32).rev().step_by(2).collect();
        let lambda = 0.3;

        let mse = cpu.gradient(&rows, lambda);
        let (loss, want_mse, f) = reference.loss(&rows, lambda).unwrap();
        let fired = f.gt(0f32).unwrap().to_dtype(DType::F32).unwrap().sum(0).unwrap().to_vec1::<f32>().unwrap();
        assert!(fired.iter().filter(|&&c| c > 0.0).count() > s.d_sae / 4 && fired.contains(&0.0), "the batch should leave some features dead and fire others: {fired:?}");
        let want_mse = want_mse.to_scalar::<f32>().unwrap() as f64;
        assert!((mse - want_mse).abs() <= 1e-5 * want_mse, "mse {mse} vs {want_mse}");
        let grads = loss.backward().unwrap();
        for (name, (var, got)) in ["W_enc", "b_enc", "W_dec", "b_dec_in", "b_dec_out"].iter().zip(reference.vars().into_iter().zip(cpu.g.parts())) {
            let want = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{name}: candle's gradient is zero");
            assert!(max_diff(got, &want) <= 1e-5 * scale, "{name}: gradient differs by {} (scale {scale})", max_diff(got, &want));
        }

        for step in 0..3 {
            let rows: Vec<u32> = (step..n as u32).step_by(3).collect();
            let (mse, fired) = cpu.step(&rows, lambda, 1e-2).unwrap();
            let (want_mse, want_fired) = reference.step(&rows, lambda, 1e-2).unwrap();
            assert!((mse - want_mse).abs() <= 1e-5 * want_mse, "step {step}: mse {mse} vs {want_mse}");
            assert_eq!(fired, want_fired, "step {step}: features fired");
        }
        let (got, want) = (cpu.params().unwrap(), reference.params().unwrap());
        let moved = max_diff(&want.w_enc, &init.w_enc);
        assert!(moved > 1e-2, "three steps of lr 1e-2 should move W_enc (moved {moved})");
        for (name, (got, want)) in ["W_enc", "b_enc", "W_dec", "b_dec_in", "b_dec_out"].iter().zip(got.parts().into_iter().zip(want.parts())) {
            assert!(max_diff(got, want) <= 1e-5, "{name}: parameters differ by {} after three steps", max_diff(got, want));
        }
    }

    /// The loop resamples features that fired on none of a period's batches (in the first half
    /// of the steps), after which they fire.
    #[test]
    fn dead_features_are_resampled() {
        let s = Shape { d_in: 12, d_sae: 24, d_out: 10 };
        let n = 1000;
        let (x, y, variance, init) = fixture(n, s);
        let mut trainer = CpuTrainer::new(init, s, &x, &y, variance);
        let opts = TrainOptions { d_sae: s.d_sae, steps: 60, batch_tokens: 100, resample_every: 20, ..Default::default() };
        let resampled = optimise(&mut trainer, s, n, variance, &opts, &mut rand::rngs::StdRng::seed_from_u64(3)).unwrap();
        assert!(resampled >= 4, "resampled {resampled}");
        let all: Vec<u32> = (0..n as u32).collect();
        let (_, fired) = trainer.step(&all, 0.0, 0.0).unwrap();
        assert!(fired[..4].iter().all(|&f| f), "resampled features fire: {fired:?}");
    }

    /// A trainer that only records what the loop asks of it; feature 0 never fires, feature 1
    /// only at the first step.
    struct Recorder {
        calls: Vec<(f64, f64)>,
        resets: Vec<usize>,
    }

    impl Trainer for Recorder {
        fn step(&mut self, rows: &[u32], lambda: f64, lr: f64) -> Result<(f64, Vec<bool>)> {
            assert_eq!(rows.len(), 10);
            let first = self.calls.is_empty();
            self.calls.push((lambda, lr));
            Ok((1.0, vec![false, first, true]))
        }
        fn params(&self) -> Result<Params> {
            let s = Shape { d_in: 1, d_sae: 3, d_out: 1 };
            Ok(Params { w_enc: vec![1.0, 1.0, 1.0], ..Params::init(s, 1.0, vec![0.0], vec![0.0], &mut rand::rngs::StdRng::seed_from_u64(0)) })
        }
        fn set_params(&mut self, _: Params) -> Result<()> {
            self.resets.push(self.calls.len());
            Ok(())
        }
        fn rows(&self, rows: &[u32]) -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((rows.iter().map(|&r| r as f32).collect(), rows.iter().map(|&r| 1.0 + r as f32).collect()))
        }
    }

    /// The loop's schedules: λ warms up over the first 5% of steps, the learning rate decays
    /// linearly over the last 20%, and features dead over a whole period are resampled at the
    /// period's end in the first half only (feature 1, which fired at the first step, first
    /// counts as dead in the second period).
    #[test]
    fn the_loop_keeps_its_schedules() {
        let opts = TrainOptions { d_sae: 3, l1_coefficient: 2.0, lr: 0.1, steps: 100, batch_tokens: 10, resample_every: 20, ..Default::default() };
        let mut rec = Recorder { calls: Vec::new(), resets: Vec::new() };
        let s = Shape { d_in: 1, d_sae: 3, d_out: 1 };
        let resampled = optimise(&mut rec, s, 35, 1.0, &opts, &mut rand::rngs::StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(rec.calls.len(), 100);
        for (step, &(lambda, lr)) in rec.calls.iter().enumerate() {
            let warm = ((step + 1) as f64 / 5.0).min(1.0);
            assert!((lambda - 2.0 * warm).abs() < 1e-12, "step {step}: λ {lambda}");
            let want_lr = if step < 80 { 0.1 } else { 0.1 * (100 - step) as f64 / 20.0 };
            assert!((lr - want_lr).abs() < 1e-12, "step {step}: lr {lr}");
        }
        // Periods end after steps 20, 40, 60, 80, 100; only those before step 50 resample.
        assert_eq!(rec.resets, [20, 40]);
        assert_eq!(resampled, 1 + 2, "feature 0 in both periods, feature 1 in the second");
    }

    /// `product` refuses views that do not fit their slices, and with k = 0 writes zeros.
    #[test]
    fn products_check_their_shapes() {
        let mut dst = vec![f32::NAN; 6];
        product(&mut dst, 2, 3, 0, (&[], 0, 1), (&[], 3, 1), 1.0);
        assert_eq!(dst, [0.0; 6]);
        let (a, b) = ([1.0f32, 2.0, 3.0, 4.0], [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]);
        product(&mut dst, 2, 3, 2, (&a, 2, 1), (&b, 3, 1), 2.0);
        assert_eq!(dst, [6.0, 4.0, 4.0, 14.0, 8.0, 8.0]);
        for (m, n, k, a_len) in [(1, 1, 1, 0), (2, 3, 2, 3), (usize::MAX, 2, 2, 4)] {
            let a = vec![1.0f32; a_len];
            let caught = std::panic::catch_unwind(|| product(&mut [0.0; 6], m, n, k, (&a, k, 1), (&b, n, 1), 1.0));
            assert!(caught.is_err(), "{m}x{k} from {a_len} values accepted");
        }
    }

    /// A dead feature is re-initialised from the one token that is badly reconstructed: its
    /// encoder along the token's centred input (at a fifth of the live features' mean encoder
    /// norm), its decoder along a fifth of the token's error, its bias zero; the others stay.
    #[test]
    fn resampling_aims_dead_features_at_the_worst_token() {
        let s = Shape { d_in: 6, d_sae: 8, d_out: 5 };
        let mut p = Params::init(s, 1.0, vec![0.1; s.d_in], vec![0.0; s.d_out], &mut rand::rngs::StdRng::seed_from_u64(1));
        p.b_enc.iter_mut().enumerate().for_each(|(i, b)| *b = i as f32 * 0.1);
        let x = data(5 * s.d_in, 9);
        // y = ŷ on every token but the fourth.
        let mut buf = Buffers::default();
        buf.forward(&p, s, &x, &vec![0.0; 5 * s.d_out], &[0, 1, 2, 3, 4]);
        let mut y = buf.r.clone();
        let error = [0.5, -1.0, 0.25, 2.0, 0.0];
        y[3 * s.d_out..][..s.d_out].iter_mut().zip(error).for_each(|(v, e)| *v += e);
        let (dead, fired) = ([2usize, 6], [true, true, false, true, true, true, false, true]);
        let before = p.clone();
        let before_perfect = p.clone();
        // A batch reconstructed exactly leaves nothing to aim at: nothing changes.
        assert!(!resample_dead(&mut p, s, &x, &buf.r.clone(), &dead, &fired, &mut rand::rngs::StdRng::seed_from_u64(2)));
        assert_eq!(p, before_perfect);
        assert!(resample_dead(&mut p, s, &x, &y, &dead, &fired, &mut rand::rngs::StdRng::seed_from_u64(2)));
        let column = |p: &Params, i: usize| p.w_enc.iter().skip(i).step_by(s.d_sae).copied().collect::<Vec<f32>>();
        let norm = |v: &[f32]| v.iter().map(|v| v * v).sum::<f32>().sqrt();
        let alive: Vec<usize> = (0..s.d_sae).filter(|&i| fired[i]).collect();
        let alive_norm = alive.iter().map(|&i| norm(&column(&before, i))).sum::<f32>() / alive.len() as f32;
        let xc: Vec<f32> = x[3 * s.d_in..][..s.d_in].iter().zip(&before.b_dec_in).map(|(v, c)| v - c).collect();
        for i in 0..s.d_sae {
            if dead.contains(&i) {
                let want: Vec<f32> = xc.iter().map(|v| v / norm(&xc) * alive_norm * 0.2).collect();
                assert!(max_diff(&column(&p, i), &want) < 1e-5, "feature {i}: encoder");
                let want: Vec<f32> = error.iter().map(|e| e * 0.2).collect();
                assert!(max_diff(&p.w_dec[i * s.d_out..][..s.d_out], &want) < 1e-5, "feature {i}: decoder");
                assert_eq!(p.b_enc[i], 0.0);
            } else {
                assert_eq!(column(&p, i), column(&before, i), "feature {i}: encoder changed");
                assert_eq!(p.w_dec[i * s.d_out..][..s.d_out], before.w_dec[i * s.d_out..][..s.d_out], "feature {i}: decoder changed");
                assert_eq!(p.b_enc[i], before.b_enc[i]);
            }
        }
    }

    /// Training on the activations of a small ReLU MLP explains most of its output's variance
    /// on held-out inputs, with dead features resampled along the way.
    #[test]
    fn training_learns_an_mlp() {
        let (n, d_in, hidden, d_out) = (6000, 16, 24, 12);
        let (x, y) = mlp_data(n, d_in, hidden, d_out);
        let (x, y) = (Tensor::from_vec(x, (n, d_in), &Device::Cpu).unwrap(), Tensor::from_vec(y, (n, d_out), &Device::Cpu).unwrap());
        let opts = TrainOptions { d_sae: 64, l1_coefficient: 0.01, lr: 3e-3, steps: 800, batch_tokens: 256, resample_every: 100, ..Default::default() };
        let (tc, report) = train(&x, &y, &opts, toy_meta(d_in, opts.d_sae, d_out)).unwrap();
        assert!(report.fve > 0.9, "held-out FVE {}", report.fve);
        assert!(report.l0 < opts.d_sae as f64 / 2.0, "L0 {}", report.l0);
        assert_eq!(tc.w_enc.dims(), [d_in, opts.d_sae]);
    }

    fn toy_meta(d_in: usize, d_sae: usize, d_out: usize) -> TranscoderMeta {
        TranscoderMeta {
            layer: 0,
            hook_in: "in".into(),
            hook_out: "out".into(),
            d_in,
            d_sae,
            d_out,
            format: "neurosteer".into(),
            activation: Default::default(),
            model_name: None,
            extra: Default::default(),
        }
    }

    /// Training refuses activations that hold NaN (a model whose forward pass overflowed), and
    /// a run that diverges fails instead of returning NaN weights.
    #[test]
    fn non_finite_inputs_and_divergence_fail() {
        let (n, d_in, hidden, d_out) = (2000, 16, 24, 12);
        let (mut x, y) = mlp_data(n, d_in, hidden, d_out);
        let opts = TrainOptions { d_sae: 32, steps: 30, batch_tokens: 256, ..Default::default() };
        let tensors = |x: &[f32]| (Tensor::from_slice(x, (n, d_in), &Device::Cpu).unwrap(), Tensor::from_slice(&y, (n, d_out), &Device::Cpu).unwrap());
        let (xt, yt) = tensors(&x);
        let e = train(&xt, &yt, &TrainOptions { lr: 1e30, ..opts.clone() }, toy_meta(d_in, 32, d_out)).expect_err("lr 1e30 diverges").to_string();
        assert!(e.contains("diverged") && e.contains("--lr"), "{e}");
        assert!(train(&xt, &yt, &opts, toy_meta(d_in, 32, d_out)).is_ok());
        x[5 * d_in + 3] = f32::NAN;
        let (xt, yt) = tensors(&x);
        let e = train(&xt, &yt, &opts, toy_meta(d_in, 32, d_out)).expect_err("NaN input").to_string();
        assert!(e.contains("inputs") && e.contains("NaN"), "{e}");
    }
}
