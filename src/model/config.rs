//! Model configurations: Hugging Face `config.json` for Llama and GPT-2, and the shapes
//! every architecture shares.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The architectures neurosteer runs.
pub const SUPPORTED_ARCHITECTURES: &str = "LlamaForCausalLM, GPT2LMHeadModel (HF folders or hub ids) and llama2.c checkpoints (.bin)";

/// Llama-family hyper-parameters (Llama 2/3.x, SmolLM, TinyLlama, llama2.c).
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `rope_scaling` of type `llama3`.
#[derive(Debug, Clone, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// GPT-2 hyper-parameters.
#[derive(Debug, Clone)]
pub struct Gpt2Config {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    pub layer_norm_epsilon: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawLlama {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

#[derive(Deserialize)]
struct RawGpt2 {
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    n_positions: usize,
    vocab_size: usize,
    layer_norm_epsilon: f64,
    activation_function: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    reorder_and_upcast_attn: Option<bool>,
}

impl ModelConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        Self::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).context("not valid JSON")?;
        let arch = value
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| value.get("model_type").and_then(|m| m.as_str()))
            .unwrap_or("<none>")
            .to_string();
        match arch.as_str() {
            "LlamaForCausalLM" | "llama" => {
                let raw: RawLlama = serde_json::from_value(value)
                    .context("LlamaForCausalLM config is missing a field or has a wrong type")?;
                Ok(ModelConfig::Llama(raw.validate()?))
            }
            "GPT2LMHeadModel" | "gpt2" => {
                let raw: RawGpt2 = serde_json::from_value(value)
                    .context("GPT2LMHeadModel config is missing a field or has a wrong type")?;
                Ok(ModelConfig::Gpt2(raw.validate()?))
            }
            other => bail!(
                "unsupported architecture `{other}`; supported: {SUPPORTED_ARCHITECTURES}"
            ),
        }
    }
}

impl RawLlama {
    fn validate(self) -> Result<LlamaConfig> {
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("hidden_act `{act}` is not supported (only silu)");
            }
        }
        if self.attention_bias == Some(true) || self.mlp_bias == Some(true) {
            bail!("Llama with attention or MLP biases is not supported");
        }
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            bail!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}");
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads);
        if head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        let rope_scaling = match self.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("<none>");
                if kind != "llama3" {
                    bail!("rope_scaling of type `{kind}` is not supported (only llama3)");
                }
                Some(serde_json::from_value(v).context("rope_scaling (llama3) is incomplete")?)
            }
        };
        Ok(LlamaConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
        })
    }
}

impl RawGpt2 {
    fn validate(self) -> Result<Gpt2Config> {
        if let Some(act) = &self.activation_function {
            if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                bail!("activation_function `{act}` is not supported (only gelu_new)");
            }
        }
        if self.scale_attn_by_inverse_layer_idx == Some(true) || self.reorder_and_upcast_attn == Some(true) {
            bail!("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported");
        }
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            bail!("n_embd {} is not a multiple of n_head {}", self.n_embd, self.n_head);
        }
        Ok(Gpt2Config {
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_inner: self.n_inner.unwrap_or(4 * self.n_embd),
            n_positions: self.n_positions,
            vocab_size: self.vocab_size,
            layer_norm_epsilon: self.layer_norm_epsilon,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_lists_supported() {
        let e = ModelConfig::from_json(r#"{"architectures": ["MistralForCausalLM"]}"#).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("MistralForCausalLM") && msg.contains("GPT2LMHeadModel"), "{msg}");
    }

    #[test]
    fn llama3_scaling_and_eos_list() {
        let c = ModelConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":176,
            "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":10,
            "max_position_embeddings":256,"rms_norm_eps":1e-5,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":32},"eos_token_id":[1,2]}"#,
        )
        .unwrap();
        let ModelConfig::Llama(c) = c else { panic!() };
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.rope_scaling.unwrap().original_max_position_embeddings, 32);
    }
}
