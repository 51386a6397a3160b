//! Model configurations: Hugging Face `config.json` for Llama, Qwen3, Gemma-2 and GPT-2, and the
//! shapes every architecture shares.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Most positions a model may have: the rotary tables are built for all of them.
const MAX_POSITIONS: usize = 1 << 21;

/// The architectures neurosteer runs.
pub const SUPPORTED_ARCHITECTURES: &str =
    "LlamaForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, GPT2LMHeadModel (HF folders or hub ids) and llama2.c checkpoints (.bin)";

/// Which member of the Llama-shaped family a [`LlamaConfig`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFamily {
    /// Llama 2/3.x, SmolLM, TinyLlama, llama2.c.
    Llama,
    /// Qwen3: Llama plus an RMSNorm over each head's q and k (`q_norm`, `k_norm`) before RoPE,
    /// and no BOS (TransformerLens's `default_prepend_bos` is false).
    Qwen3,
}

impl LlamaFamily {
    /// `ModelInfo::family`.
    pub fn name(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "llama",
            LlamaFamily::Qwen3 => "qwen3",
        }
    }
}

/// Llama-family hyper-parameters (Llama 2/3.x, SmolLM, TinyLlama, llama2.c, Qwen3).
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub family: LlamaFamily,
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

/// Gemma-2 hyper-parameters.
#[derive(Debug, Clone)]
pub struct Gemma2Config {
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
    /// Attention scores are multiplied by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f64,
    /// `c · tanh(s / c)` on the attention scores, before the mask.
    pub attn_logit_softcapping: Option<f64>,
    /// `c · tanh(z / c)` on the logits.
    pub final_logit_softcapping: Option<f64>,
    /// Tokens a sliding-window layer sees, itself included.
    pub sliding_window: usize,
    /// Per layer, whether it uses the sliding window (else it is global).
    pub sliding_layers: Vec<bool>,
    /// The head is the embeddings (transformers' default for Gemma-2).
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
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
    /// Llama and Qwen3 (see [`LlamaConfig::family`]).
    Llama(LlamaConfig),
    Gemma2(Gemma2Config),
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
    use_sliding_window: Option<bool>,
}

#[derive(Deserialize)]
struct RawGemma2 {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    // Missing keys take transformers' `Gemma2Config` defaults.
    #[serde(default = "gemma2_defaults::head_dim")]
    head_dim: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "gemma2_defaults::rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "gemma2_defaults::rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "gemma2_defaults::query_pre_attn_scalar")]
    query_pre_attn_scalar: f64,
    /// Missing: transformers' default; `null`: no softcap.
    #[serde(default = "gemma2_defaults::attn_softcap")]
    attn_logit_softcapping: Option<f64>,
    #[serde(default = "gemma2_defaults::final_softcap")]
    final_logit_softcapping: Option<f64>,
    #[serde(default = "gemma2_defaults::sliding_window")]
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

mod gemma2_defaults {
    pub fn head_dim() -> usize {
        256
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        10_000.0
    }
    pub fn query_pre_attn_scalar() -> f64 {
        256.0
    }
    pub fn attn_softcap() -> Option<f64> {
        Some(50.0)
    }
    pub fn final_softcap() -> Option<f64> {
        Some(30.0)
    }
    pub fn sliding_window() -> Option<usize> {
        Some(4096)
    }
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
        let config = Self::parse(text)?;
        config.check_limits()?;
        Ok(config)
    }

    /// Refuses sizes no model has (before anything is allocated for them), non-positive norm
    /// epsilons and RoPE bases, and special tokens outside the vocabulary.
    fn check_limits(&self) -> Result<()> {
        // (name, value, largest allowed) of each size.
        type Sizes = Vec<(&'static str, usize, usize)>;
        let (sizes, eps, theta, bos, eos): (Sizes, f64, Option<f64>, Option<u32>, &[u32]) = match self {
            ModelConfig::Llama(LlamaConfig { hidden_size, intermediate_size, num_hidden_layers, head_dim, vocab_size, max_position_embeddings, rms_norm_eps, rope_theta, bos_token_id, eos_token_ids, .. })
            | ModelConfig::Gemma2(Gemma2Config { hidden_size, intermediate_size, num_hidden_layers, head_dim, vocab_size, max_position_embeddings, rms_norm_eps, rope_theta, bos_token_id, eos_token_ids, .. }) => (
                vec![
                    ("hidden_size", *hidden_size, 1 << 16),
                    ("intermediate_size", *intermediate_size, 1 << 18),
                    ("num_hidden_layers", *num_hidden_layers, 1024),
                    ("head_dim", *head_dim, 1024),
                    ("vocab_size", *vocab_size, 1 << 22),
                    ("max_position_embeddings", *max_position_embeddings, MAX_POSITIONS),
                ],
                *rms_norm_eps,
                Some(*rope_theta),
                *bos_token_id,
                eos_token_ids,
            ),
            ModelConfig::Gpt2(c) => (
                vec![
                    ("n_embd", c.n_embd, 1 << 16),
                    ("n_inner", c.n_inner, 1 << 18),
                    ("n_layer", c.n_layer, 1024),
                    ("vocab_size", c.vocab_size, 1 << 22),
                    ("n_positions", c.n_positions, MAX_POSITIONS),
                ],
                c.layer_norm_epsilon,
                None,
                c.bos_token_id,
                &c.eos_token_ids,
            ),
        };
        for (name, value, max) in sizes {
            if value == 0 || value > max {
                bail!("{name} {value} is out of range (1..={max})");
            }
        }
        if !(eps.is_finite() && eps > 0.0) {
            bail!("the norm epsilon {eps} must be a positive number");
        }
        // Frequencies are theta^(-2i / head_dim): a base of 1 or less makes them 1 or above (or
        // infinite), nothing a model was trained with.
        if let Some(theta) = theta.filter(|t| !(t.is_finite() && *t > 1.0)) {
            bail!("rope_theta {theta:e} must be a number above 1");
        }
        let vocab = match self {
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Gemma2(c) => c.vocab_size,
            ModelConfig::Gpt2(c) => c.vocab_size,
        };
        if let Some(id) = bos.into_iter().chain(eos.iter().copied()).find(|&id| id as usize >= vocab) {
            bail!("special token id {id} (bos_token_id or eos_token_id) is outside the vocabulary of {vocab}");
        }
        Ok(())
    }

    fn parse(text: &str) -> Result<Self> {
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
                Ok(ModelConfig::Llama(raw.validate(LlamaFamily::Llama)?))
            }
            "Qwen3ForCausalLM" | "qwen3" => {
                let raw: RawLlama = serde_json::from_value(value)
                    .context("Qwen3ForCausalLM config is missing a field or has a wrong type")?;
                Ok(ModelConfig::Llama(raw.validate(LlamaFamily::Qwen3)?))
            }
            "Gemma2ForCausalLM" | "gemma2" => {
                let raw: RawGemma2 = serde_json::from_value(value)
                    .context("Gemma2ForCausalLM config is missing a field or has a wrong type")?;
                Ok(ModelConfig::Gemma2(raw.validate()?))
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

/// Checks the head counts and the head width; returns the key/value head count.
fn check_heads(heads: usize, kv_heads: Option<usize>, head_dim: usize) -> Result<usize> {
    let kv_heads = kv_heads.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        bail!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}");
    }
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!("head_dim {head_dim} must be even (and non-zero) for rotary embeddings");
    }
    Ok(kv_heads)
}

impl RawLlama {
    fn validate(self, family: LlamaFamily) -> Result<LlamaConfig> {
        let name = match family {
            LlamaFamily::Llama => "Llama",
            LlamaFamily::Qwen3 => "Qwen3",
        };
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("hidden_act `{act}` is not supported (only silu)");
            }
        }
        if self.attention_bias == Some(true) || self.mlp_bias == Some(true) {
            bail!("{name} with attention or MLP biases is not supported");
        }
        if self.use_sliding_window == Some(true) {
            bail!("use_sliding_window true is not supported for {name} (every layer must be global)");
        }
        let heads = self.num_attention_heads;
        let head_dim = match (family, self.head_dim) {
            (_, Some(hd)) => hd,
            // transformers' Qwen3Config defaults head_dim to 128, not hidden_size / heads.
            (LlamaFamily::Qwen3, None) => bail!("Qwen3ForCausalLM config has no head_dim"),
            (LlamaFamily::Llama, None) => self.hidden_size / heads.max(1),
        };
        let kv_heads = check_heads(heads, self.num_key_value_heads, head_dim)?;
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
                let s: Llama3RopeScaling = serde_json::from_value(v).context("rope_scaling (llama3) is incomplete")?;
                // Each is a divisor in the llama3 rule; high = low divides by zero.
                let usable = s.factor > 0.0 && s.low_freq_factor > 0.0 && s.high_freq_factor > s.low_freq_factor && s.original_max_position_embeddings > 0;
                if !(usable && s.factor.is_finite() && s.high_freq_factor.is_finite()) {
                    bail!(
                        "rope_scaling (llama3): factor {}, low_freq_factor {}, high_freq_factor {} and original_max_position_embeddings {} \
                         must be positive, with high_freq_factor above low_freq_factor",
                        s.factor,
                        s.low_freq_factor,
                        s.high_freq_factor,
                        s.original_max_position_embeddings
                    );
                }
                Some(s)
            }
        };
        Ok(LlamaConfig {
            family,
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

impl RawGemma2 {
    fn validate(self) -> Result<Gemma2Config> {
        let act = self.hidden_activation.or(self.hidden_act).unwrap_or_else(|| "gelu_pytorch_tanh".into());
        if act != "gelu_pytorch_tanh" {
            bail!("hidden_activation `{act}` is not supported for Gemma-2 (only gelu_pytorch_tanh)");
        }
        if self.attention_bias == Some(true) {
            bail!("Gemma-2 with attention biases is not supported");
        }
        if !matches!(self.rope_scaling, None | Some(serde_json::Value::Null)) {
            bail!("rope_scaling is not supported for Gemma-2");
        }
        let kv_heads = check_heads(self.num_attention_heads, self.num_key_value_heads, self.head_dim)?;
        if self.query_pre_attn_scalar <= 0.0 {
            bail!("query_pre_attn_scalar {} must be positive", self.query_pre_attn_scalar);
        }
        for (key, cap) in [("attn_logit_softcapping", self.attn_logit_softcapping), ("final_logit_softcapping", self.final_logit_softcapping)] {
            if cap.is_some_and(|c| c <= 0.0) {
                bail!("{key} {} must be positive (or null for none)", cap.unwrap());
            }
        }
        let n = self.num_hidden_layers;
        // transformers' rule when the config has no `layer_types`: even layers slide, odd ones are global.
        let sliding_layers = match self.layer_types {
            None => (0..n).map(|i| (i + 1) % 2 == 1).collect(),
            Some(types) => {
                if types.len() != n {
                    bail!("layer_types has {} entries for {n} layers", types.len());
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => bail!("layer_types: `{other}` is not sliding_attention or full_attention"),
                    })
                    .collect::<Result<Vec<bool>>>()?
            }
        };
        let sliding_window = match self.sliding_window {
            Some(w) if w > 0 => w,
            _ if !sliding_layers.contains(&true) => usize::MAX,
            _ => bail!("sliding_window must be a positive number of tokens when some layer slides"),
        };
        Ok(Gemma2Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: n,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: kv_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            query_pre_attn_scalar: self.query_pre_attn_scalar,
            attn_logit_softcapping: self.attn_logit_softcapping,
            final_logit_softcapping: self.final_logit_softcapping,
            sliding_window,
            sliding_layers,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(true),
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
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
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

    const GEMMA2: &str = r#"{"architectures":["Gemma2ForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"vocab_size":10,
        "max_position_embeddings":256,"query_pre_attn_scalar":16,"sliding_window":6,"attn_logit_softcapping":null"#;

    #[test]
    fn gemma2_layer_types_defaults_and_errors() {
        let ModelConfig::Gemma2(c) = ModelConfig::from_json(&format!("{GEMMA2}}}")).unwrap() else { panic!() };
        assert_eq!(c.sliding_layers, vec![true, false, true]);
        assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (None, Some(30.0)));
        assert_eq!((c.sliding_window, c.rms_norm_eps, c.query_pre_attn_scalar), (6, 1e-6, 16.0));
        let with_types = format!(r#"{GEMMA2},"layer_types":["full_attention","full_attention","sliding_attention"]}}"#);
        let ModelConfig::Gemma2(c) = ModelConfig::from_json(&with_types).unwrap() else { panic!() };
        assert_eq!(c.sliding_layers, vec![false, false, true]);
        for (bad, says) in [
            (r#","layer_types":["full_attention"]}"#, "layer_types has 1 entries"),
            (r#","hidden_activation":"gelu"}"#, "hidden_activation `gelu`"),
            (r#","sliding_window":0}"#, "sliding_window"),
        ] {
            let e = ModelConfig::from_json(&format!("{GEMMA2}{bad}")).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{e:#}");
        }
    }

    #[test]
    fn qwen3_needs_head_dim_and_no_sliding_window() {
        let base = r#"{"architectures":["Qwen3ForCausalLM"],"hidden_size":64,"intermediate_size":176,
            "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":10,
            "max_position_embeddings":256,"rms_norm_eps":1e-6,"rope_theta":1000000,"eos_token_id":[1,2]"#;
        let ModelConfig::Llama(c) = ModelConfig::from_json(&format!(r#"{base},"head_dim":16}}"#)).unwrap() else { panic!() };
        assert_eq!((c.family, c.head_dim, c.rope_theta), (LlamaFamily::Qwen3, 16, 1e6));
        let e = ModelConfig::from_json(&format!("{base}}}")).unwrap_err();
        assert!(format!("{e:#}").contains("no head_dim"), "{e:#}");
        let e = ModelConfig::from_json(&format!(r#"{base},"head_dim":16,"use_sliding_window":true}}"#)).unwrap_err();
        assert!(format!("{e:#}").contains("use_sliding_window"), "{e:#}");
    }
}
