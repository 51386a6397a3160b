//! GPT-2 with hook points.
//!
//! TransformerLens's `center_writing_weights` is applied: both output projections are centred over
//! `d_model` at load time, the token and position embeddings as they are looked up, so the residual stream,
//! `hook_attn_out` and `hook_mlp_out` carry TransformerLens's (mean-free) values. LayerNorm is
//! blind to that shift, so the logits are unchanged. `ln*.hook_normalized` is `(x - mean) / scale`
//! without gain or bias (LNPre); the gain and bias are applied after the hook, to the centred
//! input, which is what TransformerLens's folded and centred weights compute.

use anyhow::Result;
use candle_core::{DType, Device, Storage, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::attention::{attend, hooked_norm, select_positions, KvCache, Scores, Step};
use super::linear::{packs_on, Embedding, Linear};
use super::matmul::{transpose_sub, Packed};
use super::pointwise::{center_rows, gelu_tanh, scale_rows};
use super::config::Gpt2Config;
use super::{Input, Output};
use crate::hooks::{HookPoint, Hooks};

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, d: usize) -> Result<Self> {
        Ok(Self { weight: vb.get(d, "weight")?, bias: vb.get(d, "bias")? })
    }

    /// Applies gain and bias to a normalized (possibly edited) input, centring it first.
    fn affine(&self, normalized: &Tensor) -> Result<Tensor> {
        scale_rows(normalized, true, &self.weight, Some(&self.bias))
    }
}

/// Loads GPT-2's `Conv1D` (weight `[in, out]`, `y = x @ W + b`) as a [`Linear`] in `dtype`,
/// optionally centring its output over the columns (TransformerLens's `center_writing_weights`).
fn conv1d(vb: &VarBuilder, d_in: usize, d_out: usize, centre: bool, dtype: DType) -> Result<Linear> {
    // Read on the CPU, where it is centred and transposed (or packed), whatever the model's device.
    let weight = vb.clone().set_device(Device::Cpu).get((d_in, d_out), "weight")?;
    let mut bias = vb.get(d_out, "bias")?;
    if centre {
        bias = bias.broadcast_sub(&bias.mean_keepdim(0)?)?;
    }
    let (storage, layout) = weight.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { anyhow::bail!("GPT-2 weights must be read on the CPU") };
    let w = &cpu.as_slice::<f32>()?[layout.start_offset()..][..d_in * d_out];
    // Each input row's mean over the outputs, subtracted while transposing to the [out, in]
    // layout of the kernels (or packing for the AVX-512 kernel, which reads [in, out] slices).
    let means: Vec<f32> = w
        .par_chunks_exact(d_out)
        .map(|row| if centre { (row.iter().map(|&v| v as f64).sum::<f64>() / d_out as f64) as f32 } else { 0.0 })
        .collect();
    if packs_on(bias.device()) {
        return Linear::from_packed(Packed::from_kn(w, d_in, d_out, &means, dtype)?, Some(bias));
    }
    let t = transpose_sub(w, d_in, d_out, &means);
    let weight = Tensor::from_vec(t, (d_out, d_in), bias.device())?.to_dtype(dtype)?;
    Linear::new(weight, Some(bias))
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// A GPT-2 model with hook points.
pub struct Gpt2 {
    pub config: Gpt2Config,
    /// Token embeddings in the weight dtype (centred when looked up), tied to the unembedding.
    wte: Embedding,
    unembed: Linear,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

impl Gpt2 {
    /// Loads HF-named weights, with or without the `transformer.` prefix: matrices and
    /// embeddings in `dtype`, LayerNorm gains and all biases in f32.
    pub fn load(config: Gpt2Config, vb: VarBuilder, dtype: DType) -> Result<Self> {
        let c = &config;
        let vb = vb.to_dtype(DType::F32);
        let vb = if vb.contains_tensor("transformer.wte.weight") { vb.pp("transformer") } else { vb };
        let d = c.n_embd;
        let wte = vb.get((c.vocab_size, d), "wte.weight")?.to_dtype(dtype)?;
        let wpe = vb.get((c.n_positions, d), "wpe.weight")?.to_dtype(dtype)?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let b = vb.pp(format!("h.{i}"));
            blocks.push(Block {
                ln_1: LayerNorm::load(&b.pp("ln_1"), d)?,
                c_attn: conv1d(&b.pp("attn.c_attn"), d, 3 * d, false, dtype)?,
                c_proj: conv1d(&b.pp("attn.c_proj"), d, d, true, dtype)?,
                ln_2: LayerNorm::load(&b.pp("ln_2"), d)?,
                c_fc: conv1d(&b.pp("mlp.c_fc"), d, c.n_inner, false, dtype)?,
                mlp_proj: conv1d(&b.pp("mlp.c_proj"), c.n_inner, d, true, dtype)?,
            });
        }
        let ln_f = LayerNorm::load(&vb.pp("ln_f"), d)?;
        let (wte, unembed) = Embedding::with_unembed(wte, None)?;
        Ok(Self { config: config.clone(), wte, unembed, wpe, blocks, ln_f })
    }

    /// Runs the blocks from `input` to `output` (see [`Input`]), appending to `cache`.
    pub fn forward(
        &self,
        input: Input,
        step: &Step,
        cache: &mut KvCache,
        hooks: &mut Hooks,
        output: Output,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, d) = (step.batch, step.seq, c.n_embd);
        let (h, hd) = (c.n_head, c.n_embd / c.n_head);
        let eps = c.layer_norm_epsilon;
        let real = step.real.as_deref();
        let centred = |rows: Tensor| -> Result<Tensor> { center_rows(&rows.to_dtype(DType::F32)?.reshape((b, t, d))?) };
        let (first, mut x) = match input {
            Input::Tokens(tokens) => {
                let embed = centred(self.wte.lookup(&self.unembed, tokens)?)?;
                let embed = hooks.visit(HookPoint::Embed, embed)?;
                let pos = centred(self.wpe.index_select(&step.positions, 0)?)?;
                let pos = hooks.visit(HookPoint::PosEmbed, pos)?;
                (0, (embed + pos)?)
            }
            Input::Resid(l, x) => (l, x),
        };
        for (l, blk) in self.blocks.iter().enumerate().take(output.end(self.blocks.len())).skip(first) {
            x = hooks.visit(HookPoint::ResidPre(l), x)?;
            // Attention.
            let normed = hooked_norm(hooks, &x, eps, true, HookPoint::Ln1Scale(l), HookPoint::Ln1Normalized(l))?;
            let qkv = blk.c_attn.forward(&blk.ln_1.affine(&normed)?, real)?;
            let split = |i: usize| -> Result<Tensor> {
                Ok(qkv.narrow(2, i * d, d)?.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let (k, v) = cache.append(l, k, v)?;
            let attn = attend(&q, &k, &v, &step.mask, Scores::standard(hd))?;
            let attn_out = hooks.visit(HookPoint::AttnOut(l), blk.c_proj.forward(&attn, real)?)?;
            x = hooks.visit(HookPoint::ResidMid(l), (x + attn_out)?)?;
            // MLP.
            let normed = hooked_norm(hooks, &x, eps, true, HookPoint::Ln2Scale(l), HookPoint::Ln2Normalized(l))?;
            let h = hooks.visit(HookPoint::MlpIn(l), blk.ln_2.affine(&normed)?)?;
            let pre = hooks.visit(HookPoint::MlpPre(l), blk.c_fc.forward(&h, real)?)?;
            let post = hooks.visit(HookPoint::MlpPost(l), gelu_tanh(&pre)?)?;
            // The output projection was centred at load, so `mlp.hook_out` is centred like
            // `hook_mlp_out` (the mean over d_model reaches no later LayerNorm).
            let mlp_out = hooks.visit(HookPoint::MlpHookOut(l), blk.mlp_proj.forward(&post, real)?)?;
            let mlp_out = hooks.visit(HookPoint::MlpOut(l), mlp_out)?;
            x = hooks.visit(HookPoint::ResidPost(l), (x + mlp_out)?)?;
        }
        let Output::Logits(logits_at) = output else { return Ok(x) };
        let x = select_positions(x, logits_at)?;
        let normed = hooked_norm(hooks, &x, eps, true, HookPoint::LnFinalScale, HookPoint::LnFinalNormalized)?;
        let hidden = self.ln_f.affine(&normed)?;
        self.unembed.forward(&hidden, None)
    }
}
