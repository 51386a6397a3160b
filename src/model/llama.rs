//! The Llama family (Llama 2/3.x, SmolLM, TinyLlama, llama2.c checkpoints), with hook points.
//!
//! Weights stay as Hugging Face stores them; the hook values are those of TransformerLens's
//! processed model: for RMSNorm, `fold_ln` only moves the norm's gain into the next weights, so
//! `ln*.hook_normalized` is `x / rms(x)` and the gain is applied after the hook.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::attention::{attend, hooked_norm, select_positions, KvCache, Step};
use super::linear::Linear;
use super::config::LlamaConfig;
use super::LogitsAt;
use crate::hooks::{HookPoint, Hooks};

struct Block {
    attn_norm: Tensor,
    /// q, k and v projections, outputs side by side: `[(heads + 2 kv_heads) * head_dim]`.
    qkv: Linear,
    wo: Linear,
    mlp_norm: Tensor,
    /// Gate and up projections, outputs side by side: `[2 d_mlp]`.
    gate_up: Linear,
    down: Linear,
}

/// A Llama model with hook points.
pub struct Llama {
    pub config: LlamaConfig,
    /// Token embeddings in the weight dtype.
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Linear,
    /// Rotary tables `[max_positions, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Loads HF-named weights (`model.layers.N.self_attn.q_proj.weight`, ...): matrices and
    /// embeddings in `dtype`, norm gains in f32.
    pub fn load(config: LlamaConfig, vb: VarBuilder, dtype: DType) -> Result<Self> {
        let c = &config;
        let (d, hd, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let q_out = c.num_attention_heads * hd;
        let kv_out = c.num_key_value_heads * hd;
        let vb = vb.to_dtype(DType::F32);
        let w = vb.to_dtype(dtype);
        let embed = w.get((c.vocab_size, d), "model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let (b, bw) = (vb.pp(format!("model.layers.{i}")), w.pp(format!("model.layers.{i}")));
            let qkv = Linear::stacked(vec![
                bw.get((q_out, d), "self_attn.q_proj.weight")?,
                bw.get((kv_out, d), "self_attn.k_proj.weight")?,
                bw.get((kv_out, d), "self_attn.v_proj.weight")?,
            ])?;
            let gate_up = Linear::stacked(vec![bw.get((f, d), "mlp.gate_proj.weight")?, bw.get((f, d), "mlp.up_proj.weight")?])?;
            blocks.push(Block {
                attn_norm: b.get(d, "input_layernorm.weight")?,
                qkv,
                wo: Linear::new(bw.get((d, q_out), "self_attn.o_proj.weight")?, None)?,
                mlp_norm: b.get(d, "post_attention_layernorm.weight")?,
                gate_up,
                down: Linear::new(bw.get((d, f), "mlp.down_proj.weight")?, None)?,
            });
        }
        let final_norm = vb.get(d, "model.norm.weight")?;
        let lm_head = if w.contains_tensor("lm_head.weight") {
            w.get((c.vocab_size, d), "lm_head.weight")?
        } else {
            embed.clone()
        };
        let (cos, sin) = rotary_tables(c, vb.device()).context("building rotary tables")?;
        Ok(Self { config, embed, blocks, final_norm, lm_head: Linear::new(lm_head, None)?, cos, sin })
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
        let (b, t) = (step.batch, step.seq);
        let eps = c.rms_norm_eps;
        let cos = self.cos.index_select(&step.positions, 0)?.reshape((b, t, c.head_dim / 2))?;
        let sin = self.sin.index_select(&step.positions, 0)?.reshape((b, t, c.head_dim / 2))?;

        let x = self.embed.index_select(&tokens.flatten_all()?, 0)?.to_dtype(DType::F32)?.reshape((b, t, c.hidden_size))?;
        let mut x = hooks.visit(HookPoint::Embed, x)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            x = hooks.visit(HookPoint::ResidPre(l), x)?;
            // Attention.
            let normed = hooked_norm(hooks, &x, eps, false, HookPoint::Ln1Scale(l), HookPoint::Ln1Normalized(l))?;
            let h = normed.broadcast_mul(&blk.attn_norm)?;
            let qkv = blk.qkv.forward(&h)?;
            let (q_out, kv_out) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
            let heads = |start: usize, n: usize| -> Result<Tensor> {
                Ok(qkv.narrow(2, start, n * c.head_dim)?.reshape((b, t, n, c.head_dim))?.transpose(1, 2)?.contiguous()?)
            };
            let q = heads(0, c.num_attention_heads)?;
            let k = heads(q_out, c.num_key_value_heads)?;
            let v = heads(q_out + kv_out, c.num_key_value_heads)?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            let (k, v) = cache.append(l, k, v)?;
            let attn = attend(&q, &k, &v, &step.mask)?;
            let attn_out = hooks.visit(HookPoint::AttnOut(l), blk.wo.forward(&attn)?)?;
            x = hooks.visit(HookPoint::ResidMid(l), (x + attn_out)?)?;
            // MLP.
            let normed = hooked_norm(hooks, &x, eps, false, HookPoint::Ln2Scale(l), HookPoint::Ln2Normalized(l))?;
            let h = hooks.visit(HookPoint::MlpIn(l), normed.broadcast_mul(&blk.mlp_norm)?)?;
            let gate_up = blk.gate_up.forward(&h)?;
            let pre = hooks.visit(HookPoint::MlpPre(l), gate_up.narrow(2, 0, c.intermediate_size)?)?;
            let post = (candle_nn::ops::silu(&pre)? * gate_up.narrow(2, c.intermediate_size, c.intermediate_size)?)?;
            let post = hooks.visit(HookPoint::MlpPost(l), post)?;
            let mlp_out = hooks.visit(HookPoint::MlpHookOut(l), blk.down.forward(&post)?)?;
            let mlp_out = hooks.visit(HookPoint::MlpOut(l), mlp_out)?;
            x = hooks.visit(HookPoint::ResidPost(l), (x + mlp_out)?)?;
        }
        let x = select_positions(x, logits_at)?;
        let normed = hooked_norm(hooks, &x, eps, false, HookPoint::LnFinalScale, HookPoint::LnFinalNormalized)?;
        let h = normed.broadcast_mul(&self.final_norm)?;
        self.lm_head.forward(&h)
    }
}

/// Rotary `cos` / `sin` tables, with Llama-3 frequency scaling when configured.
fn rotary_tables(c: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = c.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let freq = 1.0 / c.rope_theta.powf(2.0 * i as f64 / c.head_dim as f64);
            let freq = match &c.rope_scaling {
                None => freq,
                Some(s) => {
                    let old = s.original_max_position_embeddings as f64;
                    let low_wavelen = old / s.low_freq_factor;
                    let high_wavelen = old / s.high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / s.factor
                    } else {
                        let smooth = (old / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * freq / s.factor + smooth * freq
                    }
                }
            };
            freq as f32
        })
        .collect();
    let n = c.max_position_embeddings;
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0u32, n as u32, device)?.to_dtype(candle_core::DType::F32)?.reshape((n, 1))?;
    let angles = pos.broadcast_mul(&inv_freq)?;
    Ok((angles.cos()?.contiguous()?, angles.sin()?.contiguous()?))
}
