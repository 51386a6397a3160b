//! Transcoders: sparse MLP replacements that read one hook and predict another.
//!
//! ```text
//! pre = (x - b_dec_in) @ W_enc + b_enc
//! f   = relu(pre)                       (ReLU)
//! f   = relu(pre) * (pre > threshold)   (JumpReLU, when a threshold is present)
//! y   = f @ W_dec + b_dec_out (+ x @ W_skip.T when a skip connection is present)
//! ```
//!
//! [`Transcoder::load`] reads three on-disk formats (see [`formats`]): the sae_training `.pt`
//! checkpoints of the published GPT-2 transcoders, SAELens folders, and neurosteer's own single
//! `.safetensors` file, which is what [`Transcoder::save`] writes.

pub mod eval;
pub mod formats;
pub mod splice;
pub mod train;

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::hooks::HookPoint;

/// Where a transcoder sits in the model and how big it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscoderMeta {
    /// Block index the transcoder belongs to.
    pub layer: usize,
    /// Input hook, e.g. `blocks.2.ln2.hook_normalized`.
    pub hook_in: String,
    /// Output hook, e.g. `blocks.2.hook_mlp_out`.
    pub hook_out: String,
    /// Input width.
    pub d_in: usize,
    /// Number of features.
    pub d_sae: usize,
    /// Output width.
    pub d_out: usize,
    /// The on-disk format it was loaded from: `"sae_training"`, `"saelens"` or `"neurosteer"`.
    pub format: String,
    /// The model it was trained on, when the file says.
    pub model_name: Option<String>,
    /// Other configuration fields worth keeping (`l1_coefficient`, `architecture`, ...).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl TranscoderMeta {
    /// The input and output hook points.
    pub fn points(&self) -> Result<(HookPoint, HookPoint)> {
        Ok((self.hook_in.parse()?, self.hook_out.parse()?))
    }
}

/// A transcoder's weights (f32, CPU unless moved with [`Transcoder::to_device`]).
#[derive(Debug, Clone)]
pub struct Transcoder {
    /// Placement and sizes.
    pub meta: TranscoderMeta,
    /// Encoder, `[d_in, d_sae]`.
    pub w_enc: Tensor,
    /// Encoder bias, `[d_sae]`.
    pub b_enc: Tensor,
    /// Decoder, `[d_sae, d_out]`; row `i` is feature `i`'s output direction.
    pub w_dec: Tensor,
    /// Input centring subtracted before encoding, `[d_in]` (zeros for SAELens).
    pub b_dec_in: Tensor,
    /// Output bias, `[d_out]`.
    pub b_dec_out: Tensor,
    /// JumpReLU per-feature threshold, `[d_sae]`.
    pub threshold: Option<Tensor>,
    /// Skip connection, `[d_out, d_in]`.
    pub w_skip: Option<Tensor>,
    /// log10 firing frequency per feature (`-10` = dead).
    pub log_frequency: Option<Vec<f32>>,
}

impl Transcoder {
    /// Loads a transcoder: a `.pt` file (sae_training), a folder with `cfg.json` +
    /// `sae_weights.safetensors` (SAELens), or a `.safetensors` file (neurosteer's own format).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return formats::load_saelens(path);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("pt") | Some("pth") | Some("bin") => formats::load_sae_training(path),
            Some("safetensors") => formats::load_neurosteer(path),
            _ if !path.exists() => bail!("{}: no such file or folder", path.display()),
            _ => bail!(
                "{}: unknown transcoder format (expected a .pt file, a SAELens folder or a .safetensors file)",
                path.display()
            ),
        }
    }

    /// Saves in neurosteer's own `.safetensors` format, atomically (temp file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        formats::save_neurosteer(self, path)
    }

    /// Loads per-feature log10 firing frequencies from a bare-tensor `.pt` file (sae_training's
    /// `*_log_feature_sparsity.pt`) or a `.safetensors` file (key `sparsity` or `log_frequency`).
    pub fn load_frequency(&mut self, path: &Path) -> Result<()> {
        let v = formats::read_frequency(path)?;
        if v.len() != self.meta.d_sae {
            bail!("{}: {} frequencies, but the transcoder has d_sae = {}", path.display(), v.len(), self.meta.d_sae);
        }
        self.log_frequency = Some(v);
        Ok(())
    }

    /// Feature activations: `[.., d_in] -> [.., d_sae]`.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, lead) = self.flatten(x, self.meta.d_in, "encode")?;
        let pre = x2
            .broadcast_sub(&self.b_dec_in)?
            .matmul(&self.w_enc)?
            .broadcast_add(&self.b_enc)?;
        let mut f = pre.relu()?;
        if let Some(th) = &self.threshold {
            let mask = pre.broadcast_gt(th)?.to_dtype(f.dtype())?;
            f = (f * mask)?;
        }
        Ok(f.reshape(with_last(&lead, self.meta.d_sae))?)
    }

    /// Output from feature activations: `[.., d_sae] -> [.., d_out]`, i.e. `f @ W_dec + b_dec_out`
    /// (no skip connection: that needs the input, see [`Transcoder::forward`]).
    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        let (f2, lead) = self.flatten(f, self.meta.d_sae, "decode")?;
        let y = f2.matmul(&self.w_dec)?.broadcast_add(&self.b_dec_out)?;
        Ok(y.reshape(with_last(&lead, self.meta.d_out))?)
    }

    /// Full prediction `decode(encode(x))` plus the skip connection when present:
    /// `[.., d_in] -> [.., d_out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.decode(&self.encode(x)?)?;
        if let Some(ws) = &self.w_skip {
            let (x2, lead) = self.flatten(x, self.meta.d_in, "forward")?;
            let skip = x2.matmul(&ws.t()?)?.reshape(with_last(&lead, self.meta.d_out))?;
            y = (y + skip)?;
        }
        Ok(y)
    }

    /// Features whose log10 firing frequency is strictly above `threshold` (the project uses
    /// `-6.0`), or `None` when no frequencies are loaded.
    pub fn alive(&self, threshold: f32) -> Option<Vec<usize>> {
        let lf = self.log_frequency.as_ref()?;
        Some(lf.iter().enumerate().filter(|(_, &v)| v > threshold).map(|(i, _)| i).collect())
    }

    /// A copy with every tensor on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let mv = |t: &Tensor| t.to_device(device);
        Ok(Self {
            meta: self.meta.clone(),
            w_enc: mv(&self.w_enc)?,
            b_enc: mv(&self.b_enc)?,
            w_dec: mv(&self.w_dec)?,
            b_dec_in: mv(&self.b_dec_in)?,
            b_dec_out: mv(&self.b_dec_out)?,
            threshold: self.threshold.as_ref().map(mv).transpose()?,
            w_skip: self.w_skip.as_ref().map(mv).transpose()?,
            log_frequency: self.log_frequency.clone(),
        })
    }

    /// Reshapes `[.., width]` to `[n, width]` (f32), returning the leading dims.
    fn flatten(&self, x: &Tensor, width: usize, what: &str) -> Result<(Tensor, Vec<usize>)> {
        let dims = x.dims();
        match dims.last() {
            Some(&w) if w == width => {}
            _ => bail!("transcoder {what}: input has shape {dims:?}, expected [.., {width}]"),
        }
        let lead = dims[..dims.len() - 1].to_vec();
        let n = lead.iter().product::<usize>();
        let x = if x.dtype() == DType::F32 { x.clone() } else { x.to_dtype(DType::F32)? };
        Ok((x.reshape((n, width))?, lead))
    }
}

fn with_last(lead: &[usize], last: usize) -> Vec<usize> {
    let mut v = lead.to_vec();
    v.push(last);
    v
}

/// The block index in a hook name such as `blocks.2.ln2.hook_normalized`.
pub fn layer_from_hook(hook: &str) -> Option<usize> {
    let rest = hook.strip_prefix("blocks.")?;
    rest.split('.').next()?.parse().ok()
}

/// Builds an error that names a file.
pub(crate) fn file_err(path: &Path, msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{}: {msg}", path.display())
}
