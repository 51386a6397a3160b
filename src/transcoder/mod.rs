//! Transcoders: sparse MLP replacements that read one hook and predict another.
//!
//! ```text
//! pre = (x - b_dec_in) @ W_enc + b_enc
//! f   = act(pre)                        (see [`Activation`])
//! y   = f @ W_dec + b_dec_out (+ x @ W_skip.T when a skip connection is present)
//! ```
//!
//! A cross-layer transcoder's features of source layer L also write into the layers after it:
//! `W_dec_next[j]` decodes into layer L + 1 + j.
//!
//! [`Transcoder::load`] reads the sae_training `.pt` checkpoints of the published GPT-2
//! transcoders, SAELens folders, neurosteer's own `.safetensors` (what [`Transcoder::save`]
//! writes; see [`formats`]), and the public sets: circuit-tracer per-layer and cross-layer sets,
//! Gemma Scope `params.npz`, from a folder or the hub (see [`sets`]).

pub mod eval;
pub mod formats;
pub mod sets;
pub mod splice;
pub mod train;

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::hooks::HookPoint;
use crate::model::matmul::{Weights, SMALL_M};
use crate::model::matmul_nn::matmul_nn;

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
    /// The on-disk format it was loaded from: `"sae_training"`, `"saelens"`, `"neurosteer"`,
    /// `"circuit-tracer"`, `"circuit-tracer-clt"` or `"gemma-scope"`.
    pub format: String,
    /// The activation function.
    #[serde(default)]
    pub activation: Activation,
    /// The model it was trained on, when the file says.
    pub model_name: Option<String>,
    /// Other configuration fields worth keeping (`l1_coefficient`, `architecture`, ...).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A transcoder's activation function, as its format defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Activation {
    /// `relu(pre)`.
    #[default]
    Relu,
    /// `pre · (pre > θ)` (circuit-tracer, Gemma Scope): a negative threshold lets negative values through.
    JumpRelu,
    /// `relu(pre) · (pre > θ)` (SAELens).
    JumpReluNonNegative,
    /// The `k` largest pre-activations of each token, kept as they are (no ReLU), others zero.
    TopK { k: usize },
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Activation::Relu => f.write_str("ReLU"),
            Activation::JumpRelu => f.write_str("JumpReLU: pre·(pre > θ)"),
            Activation::JumpReluNonNegative => f.write_str("JumpReLU: relu(pre)·(pre > θ)"),
            Activation::TopK { k } => write!(f, "TopK (k = {k})"),
        }
    }
}

impl Activation {
    /// Whether it acts on each feature alone (so it can run on a subset of the features).
    pub fn elementwise(&self) -> bool {
        !matches!(self, Activation::TopK { .. })
    }

    /// Applies the activation to `pre [n, width]`; `threshold [width]` is required by JumpReLU.
    pub fn apply(&self, pre: &Tensor, threshold: Option<&Tensor>) -> Result<Tensor> {
        let jump = |pre: &Tensor| -> Result<Tensor> {
            let th = threshold.ok_or_else(|| anyhow!("JumpReLU without a threshold"))?;
            Ok((pre * pre.broadcast_gt(th)?.to_dtype(pre.dtype())?)?)
        };
        Ok(match *self {
            Activation::Relu => pre.relu()?,
            Activation::JumpRelu => jump(pre)?,
            Activation::JumpReluNonNegative => jump(&pre.relu()?)?,
            Activation::TopK { k } => top_k(pre, k)?,
        })
    }
}

/// Keeps the `k` largest values of each row of `pre [n, width]` and zeroes the others.
fn top_k(pre: &Tensor, k: usize) -> Result<Tensor> {
    let (n, width) = pre.dims2()?;
    if k >= width {
        return Ok(pre.clone());
    }
    let mut rows = pre.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut scratch = vec![0f32; width];
    for row in rows.chunks_mut(width) {
        scratch.copy_from_slice(row);
        // The k-th largest value; ties at it are all kept (float activations rarely tie).
        let (_, kth, _) = scratch.select_nth_unstable_by(width - k, |a, b| a.total_cmp(b));
        let kth = *kth;
        for v in row.iter_mut() {
            if *v < kth {
                *v = 0.0;
            }
        }
    }
    Ok(Tensor::from_vec(rows, (n, width), pre.device())?)
}

impl TranscoderMeta {
    /// The input and output hook points.
    pub fn points(&self) -> Result<(HookPoint, HookPoint)> {
        Ok((self.hook_in.parse()?, self.hook_out.parse()?))
    }
}

/// A transcoder's weights (f32 on the CPU as loaded; see [`Transcoder::to`] for other devices and
/// precisions).
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
    /// Cross-layer transcoders: decoders into the later layers, `W_dec_next[j]` `[d_sae, d_out]`
    /// writing into layer `layer + 1 + j`. Empty for a single-layer transcoder.
    pub w_dec_next: Vec<Tensor>,
    /// Input centring subtracted before encoding, `[d_in]` (zeros for SAELens).
    pub b_dec_in: Tensor,
    /// Output bias, `[d_out]`.
    pub b_dec_out: Tensor,
    /// JumpReLU per-feature threshold, `[d_sae]` (present exactly when the activation is JumpReLU).
    pub threshold: Option<Tensor>,
    /// Skip connection, `[d_out, d_in]`.
    pub w_skip: Option<Tensor>,
    /// log10 firing frequency per feature (`-10` = dead).
    pub log_frequency: Option<Vec<f32>>,
}

impl Transcoder {
    /// Loads a transcoder: a `.pt` file (sae_training), a SAELens folder (`cfg.json`), a
    /// `.safetensors` file (neurosteer's own format), or a public set (a folder with
    /// `config.yaml`, one layer's file of such a set, a Gemma Scope `params.npz`, or a hub id
    /// `hf://org/repo[/path]` / `org/repo`). `layer` picks the layer of a set and must agree with
    /// a single-layer file.
    pub fn load(path: &Path, layer: Option<usize>) -> Result<Self> {
        let t = match sets::SetSource::detect(path)? {
            Some(set) => set.load_layer(layer)?,
            None => {
                let t = Self::load_file(path)?;
                if let Some(l) = layer.filter(|&l| l != t.meta.layer) {
                    bail!("{}: --layer {l}, but this transcoder is for layer {}", path.display(), t.meta.layer);
                }
                t
            }
        };
        t.check_finite(path)?;
        Ok(t)
    }

    /// Every source layer of the cross-layer transcoder at `path` whose layer `steered` was read
    /// from (for `replace`, which splices them all), `steered` itself in its place rather than read
    /// again; a single-layer transcoder alone.
    pub fn load_all(path: &Path, steered: Arc<Self>) -> Result<Vec<Arc<Self>>> {
        match sets::SetSource::detect(path)? {
            Some(set) if set.is_cross_layer() => {
                let n = set.clt_layers()?;
                (0..n)
                    .map(|l| {
                        if l == steered.meta.layer {
                            return Ok(steered.clone());
                        }
                        let t = set.load_clt_layer(l, n)?;
                        t.check_finite(path)?;
                        Ok(Arc::new(t))
                    })
                    .collect()
            }
            _ => Ok(vec![steered]),
        }
    }

    fn load_file(path: &Path) -> Result<Self> {
        if let Some(local) = sets::hub_file(path)? {
            return Self::load_file(&local);
        }
        if path.is_dir() {
            return formats::load_saelens(path);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("pt") | Some("pth") | Some("bin") => formats::load_sae_training(path),
            Some("safetensors") => formats::load_neurosteer(path),
            _ if !path.exists() => bail!("{}: no such file or folder", path.display()),
            _ => bail!(
                "{}: unknown transcoder format (expected a .pt file, a SAELens folder, a .safetensors file, a set folder with config.yaml or a params.npz)",
                path.display()
            ),
        }
    }

    /// Refuses NaN or infinite weights.
    fn check_finite(&self, path: &Path) -> Result<()> {
        match self.first_non_finite()? {
            Some(name) => Err(file_err(path, format!("tensor {name} holds NaN or infinite values"))),
            None => Ok(()),
        }
    }

    /// The name of the first weight tensor that holds NaN or infinite values, if any.
    fn first_non_finite(&self) -> Result<Option<&'static str>> {
        let mut named = vec![("W_enc", &self.w_enc), ("b_enc", &self.b_enc), ("W_dec", &self.w_dec), ("b_dec_in", &self.b_dec_in), ("b_dec_out", &self.b_dec_out)];
        named.extend(self.threshold.iter().map(|t| ("threshold", t)));
        named.extend(self.w_skip.iter().map(|t| ("W_skip", t)));
        named.extend(self.w_dec_next.iter().map(|t| ("W_dec (later layers)", t)));
        for (name, t) in named {
            if !crate::model::all_finite(t)? {
                return Ok(Some(name));
            }
        }
        Ok(None)
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
        let pre = linear_in(&x2.broadcast_sub(&self.b_dec_in)?, &self.w_enc)?.broadcast_add(&self.b_enc)?;
        let f = self.meta.activation.apply(&pre, self.threshold.as_ref())?;
        Ok(f.reshape(with_last(&lead, self.meta.d_sae))?)
    }

    /// Output from feature activations: `[.., d_sae] -> [.., d_out]`, i.e. `f @ W_dec + b_dec_out`
    /// (no skip connection: that needs the input, see [`Transcoder::forward`]).
    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        let (f2, lead) = self.flatten(f, self.meta.d_sae, "decode")?;
        let y = linear_in(&f2, &self.w_dec)?.broadcast_add(&self.b_dec_out)?;
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

    /// Whether this is one source layer of a cross-layer transcoder.
    pub fn is_cross_layer(&self) -> bool {
        self.meta.format == sets::CROSS_LAYER_FORMAT
    }

    /// Features whose log10 firing frequency is strictly above `threshold` (the project uses
    /// `-6.0`), or `None` when no frequencies are loaded.
    pub fn alive(&self, threshold: f32) -> Option<Vec<usize>> {
        let lf = self.log_frequency.as_ref()?;
        Some(lf.iter().enumerate().filter(|(_, &v)| v > threshold).map(|(i, _)| i).collect())
    }

    /// A copy on `device` with the encoder and decoders in `dtype` (f32, bf16 or f16); biases,
    /// the threshold and the skip matrix stay f32.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("transcoder weights must be f32, bf16 or f16, not {dtype:?}");
        }
        let mv = |t: &Tensor| t.to_device(device);
        let cast = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
        Ok(Self {
            meta: self.meta.clone(),
            w_enc: cast(&self.w_enc)?,
            b_enc: mv(&self.b_enc)?,
            w_dec: cast(&self.w_dec)?,
            w_dec_next: self.w_dec_next.iter().map(cast).collect::<candle_core::Result<_>>()?,
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

/// `x [.., k] @ w [k, n]` in f32, for a transcoder weight matrix in f32, bf16 or f16. On the CPU
/// by [`matmul_nn`] (half precision widened in registers, f32 sums), except f32 weights times
/// more than [`SMALL_M`] rows (prefill) or given as a view (the skip matrix's transpose), which
/// go to candle's matrix product; on a GPU by one
/// matrix product with `x` cast to the weight's dtype (cuBLAS sums in f32) and the result cast back.
pub fn linear_in(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let n = w.dim(1)?;
    let rows = x.elem_count() / k.max(1);
    let x2 = x.reshape((rows, k))?;
    let y = match (w.dtype(), w.device()) {
        (DType::F32, Device::Cpu) if rows <= SMALL_M && w.is_contiguous() => cpu_matmul_nn(&x2, w)?,
        (DType::F32, _) => x2.to_dtype(DType::F32)?.matmul(w)?,
        (_, Device::Cpu) => cpu_matmul_nn(&x2, w)?,
        _ => x2.to_dtype(w.dtype())?.matmul(w)?.to_dtype(DType::F32)?,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = n;
    Ok(y.reshape(out)?)
}

/// `f @ W_dec` reading only the rows of `W_dec` whose feature is active (on the CPU; one matrix
/// product elsewhere).
pub fn sparse_decode(f: &Tensor, w_dec: &Tensor) -> Result<Tensor> {
    if !f.device().is_cpu() {
        return linear_in(f, w_dec);
    }
    let dims = f.dims().to_vec();
    let d_sae = dims[dims.len() - 1];
    let y = cpu_matmul_nn(&f.reshape((f.elem_count() / d_sae.max(1), d_sae))?, w_dec)?;
    let mut shape = dims;
    *shape.last_mut().unwrap() = w_dec.dim(1)?;
    Ok(y.reshape(shape)?)
}

/// `x [m, k] @ w [k, n]` on the CPU by [`matmul_nn`], for `w` in f32, bf16 or f16.
fn cpu_matmul_nn(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let n = w.dim(1)?;
    let x = x.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut y = vec![0f32; m * n];
    Weights::with(&w.contiguous()?, "transcoder weight", |w| matmul_nn(&x, m, k, w, n, &mut y))?;
    Ok(Tensor::from_vec(y, (m, n), &Device::Cpu)?)
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
