//! The Llama family (Llama 2/3.x, SmolLM, TinyLlama, llama2.c checkpoints), with hook points.
//!
//! Weights stay as Hugging Face stores them; the hook values are those of TransformerLens's
//! processed model: for RMSNorm, `fold_ln` only moves the norm's gain into the next weights, so
//! `ln*.hook_normalized` is `x / rms(x)` and the gain is applied after the hook.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use super::attention::{attend, hooked_norm, linear, select_positions, KvCache, Step};
use super::config::LlamaConfig;
use super::LogitsAt;
use crate::hooks::{HookPoint, Hooks};

struct Block {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    mlp_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A Llama model with hook points.
pub struct Llama {
    pub config: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Tensor,
    /// Rotary tables `[max_positions, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Loads HF-named weights (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn load(config: LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let c = &config;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let q_out = c.num_attention_heads * hd;
        let kv_out = c.num_key_value_heads * hd;
        let embed = vb.get((c.vocab_size, d), "model.embed_tokens.weight")?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let b = vb.pp(format!("model.layers.{i}"));
            blocks.push(Block {
                attn_norm: b.get(d, "input_layernorm.weight")?,
                wq: b.get((q_out, d), "self_attn.q_proj.weight")?,
                wk: b.get((kv_out, d), "self_attn.k_proj.weight")?,
                wv: b.get((kv_out, d), "self_attn.v_proj.weight")?,
                wo: b.get((d, q_out), "self_attn.o_proj.weight")?,
                mlp_norm: b.get(d, "post_attention_layernorm.weight")?,
                gate: b.get((c.intermediate_size, d), "mlp.gate_proj.weight")?,
                up: b.get((c.intermediate_size, d), "mlp.up_proj.weight")?,
                down: b.get((d, c.intermediate_size), "mlp.down_proj.weight")?,
            });
        }
        let final_norm = vb.get(d, "model.norm.weight")?;
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            vb.get((c.vocab_size, d), "lm_head.weight")?
        } else {
            embed.clone()
        };
        let (cos, sin) = rotary_tables(c, vb.device()).context("building rotary tables")?;
        Ok(Self { config, embed, blocks, final_norm, lm_head, cos, sin })
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

        let x = self.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, c.hidden_size))?;
        let mut x = hooks.visit(HookPoint::Embed, x)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            x = hooks.visit(HookPoint::ResidPre(l), x)?;
            // Attention.
            let normed = hooked_norm(hooks, &x, eps, false, HookPoint::Ln1Scale(l), HookPoint::Ln1Normalized(l))?;
            let h = normed.broadcast_mul(&blk.attn_norm)?;
            let q = linear(&h, &blk.wq)?.reshape((b, t, c.num_attention_heads, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let k = linear(&h, &blk.wk)?.reshape((b, t, c.num_key_value_heads, c.head_dim))?.transpose(1, 2)?.contiguous()?;
            let v = linear(&h, &blk.wv)?.reshape((b, t, c.num_key_value_heads, c.head_dim))?.transpose(1, 2)?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?;
            let (k, v) = cache.append(l, k, v.contiguous()?)?;
            let attn = attend(&q, &k, &v, &step.mask)?;
            let attn_out = hooks.visit(HookPoint::AttnOut(l), linear(&attn, &blk.wo)?)?;
            x = hooks.visit(HookPoint::ResidMid(l), (x + attn_out)?)?;
            // MLP.
            let normed = hooked_norm(hooks, &x, eps, false, HookPoint::Ln2Scale(l), HookPoint::Ln2Normalized(l))?;
            let normed = hooks.mlp_input(l, normed)?;
            let h = normed.broadcast_mul(&blk.mlp_norm)?;
            let pre = hooks.visit(HookPoint::MlpPre(l), linear(&h, &blk.gate)?)?;
            let post = (candle_nn::ops::silu(&pre)? * linear(&h, &blk.up)?)?;
            let post = hooks.visit(HookPoint::MlpPost(l), post)?;
            let mlp_out = linear(&post, &blk.down)?;
            let mlp_out = hooks.mlp_output(l, &normed, mlp_out)?;
            let mlp_out = hooks.visit(HookPoint::MlpOut(l), mlp_out)?;
            x = hooks.visit(HookPoint::ResidPost(l), (x + mlp_out)?)?;
        }
        let x = select_positions(x, logits_at)?;
        let normed = hooked_norm(hooks, &x, eps, false, HookPoint::LnFinalScale, HookPoint::LnFinalNormalized)?;
        let h = normed.broadcast_mul(&self.final_norm)?;
        linear(&h, &self.lm_head)
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
