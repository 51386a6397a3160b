//! GPT-2 with hook points.
//!
//! TransformerLens's `center_writing_weights` is applied at load time: the token and position
//! embeddings and both output projections are centred over `d_model`, so the residual stream,
//! `hook_attn_out` and `hook_mlp_out` carry TransformerLens's (mean-free) values. LayerNorm is
//! blind to that shift, so the logits are unchanged. `ln*.hook_normalized` is `(x - mean) / scale`
//! without gain or bias (LNPre); the gain and bias are applied after the hook, to the centred
//! input, which is what TransformerLens's folded and centred weights compute.

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::attention::{attend, hooked_norm, select_positions, KvCache, Step};
use super::linear::Linear;
use super::config::Gpt2Config;
use super::LogitsAt;
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
        let centred = normalized.broadcast_sub(&normalized.mean_keepdim(D::Minus1)?)?;
        Ok(centred.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Loads GPT-2's `Conv1D` (weight `[in, out]`, `y = x @ W + b`) as a [`Linear`] in `dtype`,
/// optionally centring its output over the columns (TransformerLens's `center_writing_weights`).
fn conv1d(vb: &VarBuilder, d_in: usize, d_out: usize, centre: bool, dtype: DType) -> Result<Linear> {
    let mut weight = vb.get((d_in, d_out), "weight")?;
    let mut bias = vb.get(d_out, "bias")?;
    if centre {
        weight = weight.broadcast_sub(&weight.mean_keepdim(1)?)?;
        bias = bias.broadcast_sub(&bias.mean_keepdim(0)?)?;
    }
    Linear::new(weight.t()?.contiguous()?.to_dtype(dtype)?, Some(bias))
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
    /// Token embeddings, centred (what the residual stream receives), in the weight dtype.
    wte_centred: Tensor,
    /// Token embeddings as stored: the tied unembedding.
    unembed: Linear,
    wpe_centred: Tensor,
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
        let wte = vb.get((c.vocab_size, d), "wte.weight")?;
        let wpe = vb.get((c.n_positions, d), "wpe.weight")?;
        let centre_rows = |t: &Tensor| -> Result<Tensor> { Ok(t.broadcast_sub(&t.mean_keepdim(1)?)?.to_dtype(dtype)?) };
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
        Ok(Self {
            config: config.clone(),
            wte_centred: centre_rows(&wte)?,
            unembed: Linear::new(wte.to_dtype(dtype)?, None)?,
            wpe_centred: centre_rows(&wpe)?,
            blocks,
            ln_f,
        })
    }

    /// Runs `tokens [batch, seq]` (u32) through the model, appending to `cache`.
    pub fn forward(
        &self,
        tokens: &Tensor,
        step: &Step,
        cache: &mut KvCache,
        hooks: &mut Hooks,
        logits_at: LogitsAt,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, d) = (step.batch, step.seq, c.n_embd);
        let (h, hd) = (c.n_head, c.n_embd / c.n_head);
        let eps = c.layer_norm_epsilon;
        let embed = self.wte_centred.index_select(&tokens.flatten_all()?, 0)?.to_dtype(DType::F32)?.reshape((b, t, d))?;
        let embed = hooks.visit(HookPoint::Embed, embed)?;
        let pos = self.wpe_centred.index_select(&step.positions, 0)?.to_dtype(DType::F32)?.reshape((b, t, d))?;
        let pos = hooks.visit(HookPoint::PosEmbed, pos)?;
        let mut x = (embed + pos)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            x = hooks.visit(HookPoint::ResidPre(l), x)?;
            // Attention.
            let normed = hooked_norm(hooks, &x, eps, true, HookPoint::Ln1Scale(l), HookPoint::Ln1Normalized(l))?;
            let qkv = blk.c_attn.forward(&blk.ln_1.affine(&normed)?)?;
            let split = |i: usize| -> Result<Tensor> {
                Ok(qkv.narrow(2, i * d, d)?.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let (k, v) = cache.append(l, k, v)?;
            let attn = attend(&q, &k, &v, &step.mask)?;
            let attn_out = hooks.visit(HookPoint::AttnOut(l), blk.c_proj.forward(&attn)?)?;
            x = hooks.visit(HookPoint::ResidMid(l), (x + attn_out)?)?;
            // MLP.
            let normed = hooked_norm(hooks, &x, eps, true, HookPoint::Ln2Scale(l), HookPoint::Ln2Normalized(l))?;
            let normed = hooks.mlp_input(l, normed)?;
            let pre = hooks.visit(HookPoint::MlpPre(l), blk.c_fc.forward(&blk.ln_2.affine(&normed)?)?)?;
            let post = hooks.visit(HookPoint::MlpPost(l), pre.gelu()?)?;
            let mlp_out = blk.mlp_proj.forward(&post)?;
            let mlp_out = hooks.mlp_output(l, &normed, mlp_out)?;
            let mlp_out = hooks.visit(HookPoint::MlpOut(l), mlp_out)?;
            x = hooks.visit(HookPoint::ResidPost(l), (x + mlp_out)?)?;
        }
        let x = select_positions(x, logits_at)?;
        let normed = hooked_norm(hooks, &x, eps, true, HookPoint::LnFinalScale, HookPoint::LnFinalNormalized)?;
        let hidden = self.ln_f.affine(&normed)?;
        self.unembed.forward(&hidden)
    }
}
