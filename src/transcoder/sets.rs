//! The public transcoder sets: circuit-tracer per-layer sets (`model_kind: transcoder_set`) and
//! cross-layer transcoders (`model_kind: cross_layer_transcoder`), Gemma Scope `params.npz`
//! files, from a local folder or the Hugging Face hub. Only the layers a command uses are read.
//!
//! * A set folder holds `config.yaml` (`model_kind`, `feature_input_hook`, `feature_output_hook`,
//!   optional `transcoders` list (position = layer), `activation`, `k`); without `config.yaml`, a
//!   W&B-style `wandb-config.yaml` (`key: {value: ...}`) gives the same keys.
//! * Per-layer files `layer_L.safetensors`: `W_enc [d_sae, d_model]`, `W_dec [d_sae, d_model]`,
//!   `b_enc`, `b_dec` (the output bias), optional `W_skip [d_model, d_model]` (applied as
//!   `x @ W_skip.T`) and `activation_function.threshold`; any other key is refused.
//! * Cross-layer files `W_enc_L.safetensors` (`W_enc_L [d_sae, D]`, `b_enc_L`, `b_dec_L`,
//!   optional `threshold_L`) and `W_dec_L.safetensors` (`W_dec_L [d_sae, n_layers - L, D]`,
//!   block j writing into layer L + j); `b_dec_L` is layer L's output bias.
//! * Gemma Scope `params.npz`: `W_enc [d_model, d_sae]` (model width first), `W_dec`, `b_enc`,
//!   `b_dec`, `threshold`; JumpReLU; without a config it reads `blocks.L.ln2.hook_normalized` and
//!   writes `blocks.L.hook_mlp_out`, L taken from the `layer_L` part of its path.
//!
//! Activation: `activation: topk` (with `k`), `activation: relu`, else JumpReLU `pre·(pre > θ)`
//! when a threshold is stored, else ReLU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as J;

use super::{file_err, Activation, Transcoder, TranscoderMeta};
use crate::hub::HubRepo;
use crate::model::weights::SafetensorsFiles;

/// The `format` of a cross-layer transcoder's source layer.
pub const CROSS_LAYER_FORMAT: &str = "circuit-tracer-clt";

/// Where a set's files are: a local folder, or a folder of a hub repository.
enum Files {
    Local(PathBuf),
    Hub { repo: HubRepo, prefix: String, revision: Option<String> },
}

impl Files {
    /// A file of the set, relative to its folder (downloaded into the hub cache if needed).
    fn get(&self, rel: &str) -> Result<PathBuf> {
        match self {
            Files::Local(dir) => {
                let p = dir.join(rel);
                if !p.is_file() {
                    bail!("{}: no such file", p.display());
                }
                Ok(p)
            }
            Files::Hub { repo, prefix, .. } => repo.get(&join(prefix, rel)),
        }
    }

    /// The set's file names, relative to its folder.
    fn list(&self) -> Result<Vec<String>> {
        match self {
            Files::Local(dir) => {
                let rd = std::fs::read_dir(dir).map_err(|e| file_err(dir, e))?;
                Ok(rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            }
            Files::Hub { repo, prefix, .. } => {
                // Offline, the cached snapshot holding the set's config is the listing.
                let cached_dir = ["config.yaml", "wandb-config.yaml", "wanb-config.yaml"]
                    .iter()
                    .find_map(|f| repo.cached(&join(prefix, f)))
                    .and_then(|p| p.parent().map(Path::to_path_buf));
                if let (true, Some(dir)) = (crate::hub::offline(), cached_dir) {
                    return Files::Local(dir).list();
                }
                Ok(repo
                    .list_files()?
                    .into_iter()
                    .filter_map(|f| if prefix.is_empty() { Some(f) } else { f.strip_prefix(&format!("{prefix}/")).map(str::to_string) })
                    .collect())
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Files::Local(dir) => dir.display().to_string(),
            Files::Hub { repo, prefix, revision } => {
                let rev = revision.as_ref().map(|r| format!("@{r}")).unwrap_or_default();
                format!("hf://{}{}{rev}", repo.id, if prefix.is_empty() { String::new() } else { format!("/{prefix}") })
            }
        }
    }
}

fn join(prefix: &str, rel: &str) -> String {
    if prefix.is_empty() { rel.to_string() } else { format!("{prefix}/{rel}") }
}

/// What a set's config says.
#[derive(Debug, Clone)]
struct SetConfig {
    cross_layer: bool,
    input_hook: String,
    output_hook: String,
    /// Per-layer file paths (position = layer), relative to the set folder or `hf://` ids.
    transcoders: Option<Vec<String>>,
    activation: Option<String>,
    k: Option<usize>,
    model_name: Option<String>,
}

/// A transcoder set, and the one layer a path pointed at, if it named a file.
pub struct SetSource {
    files: Files,
    config: SetConfig,
    /// The layer of the file the user named (`layer_2.safetensors`, `W_enc_2.safetensors`).
    pinned: Option<usize>,
    /// The npz file named directly (Gemma Scope), relative to the set folder.
    pinned_file: Option<String>,
}

impl SetSource {
    /// Recognises a public set in `path`: a folder with `config.yaml` (or `wandb-config.yaml`), one
    /// layer's file inside such a folder, a `params.npz`, or a hub reference (`hf://org/repo[/path]`
    /// or `org/repo`). `None` for the other formats.
    pub fn detect(path: &Path) -> Result<Option<Self>> {
        let spec = path.to_string_lossy();
        if let Some(rest) = spec.strip_prefix("hf://") {
            return if rest.ends_with(".pt") { Ok(None) } else { Self::from_hub(rest).map(Some) };
        }
        if !path.exists() {
            if looks_like_repo_id(&spec) {
                return Self::from_hub(&spec).map(Some);
            }
            bail!("{}: no such file or folder (nor a hub id like org/repo or hf://org/repo/path)", path.display());
        }
        if path.is_dir() {
            if path.join("cfg.json").is_file() {
                return Ok(None);
            }
            return Ok(read_config(&Files::Local(path.to_path_buf()))?
                .map(|config| Self { files: Files::Local(path.to_path_buf()), config, pinned: None, pinned_file: None }));
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.ends_with(".npz") {
            return Self::for_npz(path).map(Some);
        }
        let Some(layer) = layer_file_index(name) else { return Ok(None) };
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let files = Files::Local(dir.clone());
        match read_config(&files)? {
            Some(config) => {
                let pinned_file = (!config.cross_layer).then(|| name.to_string());
                Ok(Some(Self { files, config, pinned: Some(layer), pinned_file }))
            }
            None if name.starts_with("layer_") => Err(file_err(path, format!("no config.yaml beside it in {}", dir.display()))),
            None => Ok(None),
        }
    }

    /// A Gemma Scope `params.npz`: the config of the set folder above it when one lists it,
    /// else the Gemma Scope defaults with the layer from the `layer_L` path part.
    fn for_npz(path: &Path) -> Result<Self> {
        let layer = path
            .components()
            .filter_map(|c| c.as_os_str().to_str()?.strip_prefix("layer_")?.parse::<usize>().ok())
            .next_back();
        for dir in path.ancestors().skip(1).take(4) {
            let files = Files::Local(dir.to_path_buf());
            if let Some(config) = read_config(&files)? {
                let rel = path.strip_prefix(dir).map_err(|e| anyhow!("{e}"))?.to_string_lossy().to_string();
                let listed = config.transcoders.as_ref().and_then(|t| t.iter().position(|p| *p == rel));
                let pinned = listed.or(layer).ok_or_else(|| file_err(path, "cannot tell its layer (no layer_L in the path and not listed in config.yaml)"))?;
                return Ok(Self { files, config, pinned: Some(pinned), pinned_file: Some(rel) });
            }
        }
        let layer = layer.ok_or_else(|| file_err(path, "cannot tell its layer: no layer_L part in the path and no config.yaml above it"))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let config = SetConfig {
            cross_layer: false,
            input_hook: "ln2.hook_normalized".into(),
            output_hook: "hook_mlp_out".into(),
            transcoders: None,
            activation: None,
            k: None,
            model_name: None,
        };
        Ok(Self { files: Files::Local(dir), config, pinned: Some(layer), pinned_file: Some(name) })
    }

    /// `org/repo[/path][?revision=r]` on the hub.
    fn from_hub(spec: &str) -> Result<Self> {
        let (spec, revision) = match spec.split_once("?revision=") {
            Some((s, r)) => (s, Some(r.to_string())),
            None => (spec, None),
        };
        let parts: Vec<&str> = spec.split('/').filter(|p| !p.is_empty()).collect();
        if parts.len() < 2 {
            bail!("hf://{spec}: expected hf://org/repo[/path]");
        }
        let id = format!("{}/{}", parts[0], parts[1]);
        let repo = match &revision {
            Some(r) => HubRepo::model_at(&id, r),
            None => HubRepo::model(&id),
        };
        let rest = &parts[2..];
        let file = rest.last().filter(|n| n.ends_with(".safetensors") || n.ends_with(".npz"));
        let prefix_parts = if file.is_some() { &rest[..rest.len() - 1] } else { rest };
        let files = Files::Hub { repo, prefix: prefix_parts.join("/"), revision };
        let config = read_config(&files)?.ok_or_else(|| anyhow!("{}: no config.yaml or wandb-config.yaml there", files.describe()))?;
        let pinned = file.and_then(|f| layer_file_index(f));
        let pinned_file = file.filter(|_| !config.cross_layer).map(|f| f.to_string());
        if let (Some(f), None) = (file, pinned) {
            if !f.ends_with(".npz") {
                bail!("{}: cannot tell the layer of {f}", files.describe());
            }
        }
        Ok(Self { files, config, pinned, pinned_file })
    }

    /// Whether this is a cross-layer transcoder.
    pub fn is_cross_layer(&self) -> bool {
        self.config.cross_layer
    }

    /// The layer to load: the file's, or `--layer`, which must agree.
    fn choose_layer(&self, layer: Option<usize>) -> Result<usize> {
        match (self.pinned, layer) {
            (Some(p), Some(l)) if p != l => bail!("{}: --layer {l}, but the file named is layer {p}", self.files.describe()),
            (Some(p), _) => Ok(p),
            (None, Some(l)) => Ok(l),
            (None, None) => bail!("{}: a transcoder set with one transcoder per layer; pass --layer L", self.files.describe()),
        }
    }

    /// Reads one layer's transcoder (for a cross-layer transcoder: that source layer, with its
    /// decoders into the later layers).
    pub fn load_layer(&self, layer: Option<usize>) -> Result<Transcoder> {
        let layer = self.choose_layer(layer)?;
        if self.config.cross_layer {
            return self.load_clt_layer(layer, self.clt_layers()?);
        }
        let rel = match (&self.pinned_file, &self.config.transcoders) {
            (Some(f), _) => f.clone(),
            (None, Some(list)) => list
                .get(layer)
                .cloned()
                .ok_or_else(|| anyhow!("{}: config.yaml lists {} transcoders, no layer {layer}", self.files.describe(), list.len()))?,
            (None, None) => format!("layer_{layer}.safetensors"),
        };
        let path = match rel.strip_prefix("hf://") {
            Some(hub) => {
                let (repo, file) = hub_repo_and_path(hub)?;
                repo.get(&file)?
            }
            None => self.files.get(&rel)?,
        };
        if rel.ends_with(".npz") {
            read_gemma_scope(&path, layer, &self.config)
        } else {
            read_layer_file(&path, layer, &self.config, self.repo_id().as_deref())
        }
    }

    fn repo_id(&self) -> Option<String> {
        match &self.files {
            Files::Hub { repo, .. } => Some(repo.id.clone()),
            Files::Local(_) => None,
        }
    }

    /// The number of layers of a cross-layer transcoder: the `W_enc_L` files, 0..n without gaps.
    pub(crate) fn clt_layers(&self) -> Result<usize> {
        let names = self.files.list()?;
        let mut layers: Vec<usize> = names
            .iter()
            .filter_map(|n| n.strip_prefix("W_enc_")?.strip_suffix(".safetensors")?.parse().ok())
            .collect();
        layers.sort_unstable();
        if layers.is_empty() || layers.iter().enumerate().any(|(i, &l)| i != l) {
            bail!("{}: expected W_enc_0.safetensors .. W_enc_{{n-1}}.safetensors without gaps, found layers {layers:?}", self.files.describe());
        }
        Ok(layers.len())
    }

    pub(crate) fn load_clt_layer(&self, layer: usize, n_layers: usize) -> Result<Transcoder> {
        if layer >= n_layers {
            bail!("{}: a cross-layer transcoder of {n_layers} layers has no layer {layer}", self.files.describe());
        }
        let (enc_name, dec_name) = (format!("W_enc_{layer}.safetensors"), format!("W_dec_{layer}.safetensors"));
        let enc_path = self.files.get(&enc_name)?;
        let dec_path = self.files.get(&dec_name)?;
        let enc = Strict::open(&enc_path)?;
        let dec = Strict::open(&dec_path)?;
        let w_enc = enc.take(&format!("W_enc_{layer}"))?;
        let b_enc = enc.take(&format!("b_enc_{layer}"))?;
        let b_dec = enc.take(&format!("b_dec_{layer}"))?;
        let threshold = enc.take_opt(&format!("threshold_{layer}"))?;
        enc.done()?;
        let w_dec_all = dec.take(&format!("W_dec_{layer}"))?;
        dec.done()?;
        let (d_sae, d_model) = rows_cols(&enc_path, "W_enc", &w_enc)?;
        check_len(&enc_path, "b_enc", &b_enc, d_sae)?;
        check_len(&enc_path, "b_dec", &b_dec, d_model)?;
        if let Some(th) = &threshold {
            check_len(&enc_path, "threshold", th, d_sae)?;
        }
        let targets = n_layers - layer;
        if w_dec_all.dims() != [d_sae, targets, d_model] {
            return Err(file_err(
                &dec_path,
                format!("W_dec_{layer} has shape {:?}, expected [{d_sae}, {targets}, {d_model}] (features, layers {layer}..{n_layers}, width)", w_dec_all.dims()),
            ));
        }
        let block = |j: usize| -> Result<Tensor> { Ok(w_dec_all.narrow(1, j, 1)?.squeeze(1)?.contiguous()?) };
        let activation = pick_activation(&self.config, threshold.is_some(), &enc_path, None)?;
        let meta = self.meta(layer, d_model, d_sae, CROSS_LAYER_FORMAT, activation, n_layers);
        Ok(Transcoder {
            meta,
            w_enc: w_enc.t()?.contiguous()?,
            b_enc,
            w_dec: block(0)?,
            w_dec_next: (1..targets).map(block).collect::<Result<_>>()?,
            b_dec_in: Tensor::zeros(d_model, DType::F32, &Device::Cpu)?,
            b_dec_out: b_dec,
            threshold,
            w_skip: None,
            log_frequency: None,
        })
    }

    fn meta(&self, layer: usize, d_model: usize, d_sae: usize, format: &str, activation: Activation, n_layers: usize) -> TranscoderMeta {
        self.config.meta(layer, d_model, d_sae, format, activation, Some(n_layers), &self.files.describe())
    }
}

impl SetConfig {
    #[allow(clippy::too_many_arguments)]
    fn meta(&self, layer: usize, d_model: usize, d_sae: usize, format: &str, activation: Activation, clt_layers: Option<usize>, source: &str) -> TranscoderMeta {
        let mut extra = serde_json::Map::new();
        extra.insert("source".into(), J::String(source.to_string()));
        if let Some(n) = clt_layers.filter(|_| self.cross_layer) {
            extra.insert("cross_layer_layers".into(), J::from(n));
        }
        TranscoderMeta {
            layer,
            hook_in: format!("blocks.{layer}.{}", self.input_hook),
            hook_out: format!("blocks.{layer}.{}", self.output_hook),
            d_in: d_model,
            d_sae,
            d_out: d_model,
            format: format.into(),
            activation,
            model_name: self.model_name.clone(),
            extra,
        }
    }
}

/// A single-file transcoder on the hub (`hf://org/repo/path/file.pt`, with its
/// `*_log_feature_sparsity.pt` when the repository has one), fetched into the cache.
pub fn hub_file(path: &Path) -> Result<Option<PathBuf>> {
    let spec = path.to_string_lossy();
    let Some(rest) = spec.strip_prefix("hf://").filter(|r| r.ends_with(".pt")) else { return Ok(None) };
    let (repo, file) = hub_repo_and_path(rest)?;
    let local = repo.get(&file)?;
    let stem = file.strip_suffix(".pt").unwrap_or(&file);
    // The frequencies are optional: a failed download leaves them out.
    let _ = repo.get(&format!("{stem}_log_feature_sparsity.pt"));
    Ok(Some(local))
}

/// `org/repo/path[?revision=r]` → the repository and the path inside it.
fn hub_repo_and_path(spec: &str) -> Result<(HubRepo, String)> {
    let (spec, revision) = match spec.split_once("?revision=") {
        Some((s, r)) => (s, Some(r)),
        None => (spec, None),
    };
    let mut parts = spec.splitn(3, '/');
    let (org, name, file) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if org.is_empty() || name.is_empty() {
        bail!("hf://{spec}: expected hf://org/repo/path");
    }
    let id = format!("{org}/{name}");
    Ok((revision.map_or_else(|| HubRepo::model(&id), |r| HubRepo::model_at(&id, r)), file.to_string()))
}

/// `layer_L.safetensors` / `W_enc_L.safetensors` / `W_dec_L.safetensors` → L.
fn layer_file_index(name: &str) -> Option<usize> {
    let stem = name.strip_suffix(".safetensors")?;
    let n = stem.strip_prefix("layer_").or_else(|| stem.strip_prefix("W_enc_")).or_else(|| stem.strip_prefix("W_dec_"))?;
    n.parse().ok()
}

fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    let is_file = [".pt", ".pth", ".bin", ".safetensors", ".npz", ".json", ".yaml"].iter().any(|e| spec.ends_with(e));
    !is_file && parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// Reads `config.yaml`, else `wandb-config.yaml` / `wanb-config.yaml` (W&B's `key: {value: v}`).
fn read_config(files: &Files) -> Result<Option<SetConfig>> {
    let mut hub_error = None;
    for (name, wandb) in [("config.yaml", false), ("wandb-config.yaml", true), ("wanb-config.yaml", true)] {
        let path = match files {
            Files::Local(dir) if !dir.join(name).is_file() => continue,
            Files::Local(dir) => dir.join(name),
            Files::Hub { .. } => match files.get(name) {
                Ok(p) => p,
                Err(e) => {
                    hub_error.get_or_insert(e);
                    continue;
                }
            },
        };
        let text = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e))?;
        let value: J = serde_yaml_ng::from_str(&text).map_err(|e| file_err(&path, format!("not valid YAML: {e}")))?;
        let obj = value.as_object().ok_or_else(|| file_err(&path, "not a YAML mapping"))?;
        let field = |k: &str| -> Option<&J> {
            let v = obj.get(k)?;
            if wandb { v.get("value") } else { Some(v) }
        };
        let string = |k: &str| field(k).and_then(J::as_str).map(str::to_string);
        let kind = if wandb { Some("transcoder_set".to_string()) } else { string("model_kind") };
        let cross_layer = match kind.as_deref() {
            Some("transcoder_set") => false,
            Some("cross_layer_transcoder") => true,
            Some(other) => return Err(file_err(&path, format!("model_kind {other:?} is not a transcoder set (transcoder_set or cross_layer_transcoder)"))),
            None => return Err(file_err(&path, "no model_kind")),
        };
        let hook = |k: &str| -> Result<String> {
            let h = string(k).ok_or_else(|| file_err(&path, format!("no {k}")))?;
            let short = h.strip_prefix("blocks.").and_then(|r| r.split_once('.')).map_or(h.as_str(), |(_, rest)| rest);
            Ok(short.to_string())
        };
        let transcoders = match field("transcoders") {
            None | Some(J::Null) => None,
            Some(J::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string).ok_or_else(|| file_err(&path, "transcoders must be a list of paths")))
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(_) => return Err(file_err(&path, "transcoders must be a list of paths")),
        };
        let k = match field("k") {
            None | Some(J::Null) => None,
            Some(v) => Some(v.as_u64().filter(|&k| k > 0).ok_or_else(|| file_err(&path, "k must be a positive integer"))? as usize),
        };
        return Ok(Some(SetConfig {
            cross_layer,
            input_hook: hook("feature_input_hook")?,
            output_hook: hook("feature_output_hook")?,
            transcoders,
            activation: string("activation"),
            k,
            model_name: string("model_name"),
        }));
    }
    // On the hub, say why config.yaml could not be had (absent, or no network).
    match hub_error {
        Some(e) => Err(e.context(format!("{}: no transcoder set config (config.yaml or wandb-config.yaml)", files.describe()))),
        None => Ok(None),
    }
}

/// The activation of a circuit-tracer file: `activation: topk` (with `k`), `relu`, else
/// JumpReLU when a threshold is stored, else ReLU.
fn pick_activation(config: &SetConfig, has_threshold: bool, path: &Path, repo: Option<&str>) -> Result<Activation> {
    Ok(match config.activation.as_deref().map(str::to_lowercase).as_deref() {
        Some("topk") => {
            let k = match (config.k, repo) {
                (Some(k), _) => k,
                (None, Some("facebook/crv-8b-instruct-transcoders")) => 128,
                (None, _) => return Err(file_err(path, "activation topk needs k in config.yaml")),
            };
            Activation::TopK { k }
        }
        Some("relu") => Activation::Relu,
        Some("jumprelu") | None if has_threshold => Activation::JumpRelu,
        Some("jumprelu") => return Err(file_err(path, "activation jumprelu, but no threshold is stored")),
        None => Activation::Relu,
        Some(other) => return Err(file_err(path, format!("unknown activation {other:?} (topk, relu or jumprelu)"))),
    })
}

/// A safetensors file read key by key, that refuses keys nobody took.
struct Strict {
    path: PathBuf,
    files: SafetensorsFiles,
    taken: std::cell::RefCell<Vec<String>>,
}

impl Strict {
    fn open(path: &Path) -> Result<Self> {
        Ok(Self { path: path.to_path_buf(), files: SafetensorsFiles::open(&[path.to_path_buf()])?, taken: Default::default() })
    }

    fn take_opt(&self, name: &str) -> Result<Option<Tensor>> {
        if self.files.shape(name).is_none() {
            return Ok(None);
        }
        self.taken.borrow_mut().push(name.to_string());
        let t = self.files.read(name)?;
        Ok(Some(t.to_dtype(DType::F32)?))
    }

    fn take(&self, name: &str) -> Result<Tensor> {
        self.take_opt(name)?.ok_or_else(|| file_err(&self.path, format!("missing tensor {name}")))
    }

    fn done(&self) -> Result<()> {
        let taken = self.taken.borrow();
        let extra: Vec<&str> = self.files.names().into_iter().filter(|n| !taken.iter().any(|t| t == n)).collect();
        if !extra.is_empty() {
            return Err(file_err(&self.path, format!("unexpected tensors {extra:?}")));
        }
        Ok(())
    }
}

fn rows_cols(path: &Path, name: &str, t: &Tensor) -> Result<(usize, usize)> {
    t.dims2().map_err(|_| file_err(path, format!("{name} has shape {:?}, expected a matrix", t.dims())))
}

fn check_len(path: &Path, name: &str, t: &Tensor, n: usize) -> Result<()> {
    if t.dims() != [n] {
        return Err(file_err(path, format!("{name} has shape {:?}, expected [{n}]", t.dims())));
    }
    Ok(())
}

/// One circuit-tracer `layer_L.safetensors`: features are rows of both `W_enc` and `W_dec`.
fn read_layer_file(path: &Path, layer: usize, config: &SetConfig, repo: Option<&str>) -> Result<Transcoder> {
    let f = Strict::open(path)?;
    let w_enc = f.take("W_enc")?;
    let w_dec = f.take("W_dec")?;
    let b_enc = f.take("b_enc")?;
    let b_dec = f.take("b_dec")?;
    let w_skip = f.take_opt("W_skip")?;
    let threshold = f.take_opt("activation_function.threshold")?;
    f.done()?;
    let d_sae = b_enc.dims1().map_err(|_| file_err(path, "b_enc is not a vector"))?;
    let d_model = b_dec.dims1().map_err(|_| file_err(path, "b_dec is not a vector"))?;
    for (name, t) in [("W_enc", &w_enc), ("W_dec", &w_dec)] {
        if t.dims() != [d_sae, d_model] {
            return Err(file_err(path, format!("{name} has shape {:?}, expected [{d_sae}, {d_model}] (d_sae from b_enc, d_model from b_dec)", t.dims())));
        }
    }
    if let Some(ws) = &w_skip {
        if ws.dims() != [d_model, d_model] {
            return Err(file_err(path, format!("W_skip has shape {:?}, expected [{d_model}, {d_model}]", ws.dims())));
        }
    }
    if let Some(th) = &threshold {
        check_len(path, "activation_function.threshold", th, d_sae)?;
    }
    let activation = pick_activation(config, threshold.is_some(), path, repo)?;
    let threshold = threshold.filter(|_| matches!(activation, Activation::JumpRelu));
    Ok(Transcoder {
        meta: config.meta(layer, d_model, d_sae, "circuit-tracer", activation, None, &path.display().to_string()),
        w_enc: w_enc.t()?.contiguous()?,
        b_enc,
        w_dec,
        w_dec_next: Vec::new(),
        b_dec_in: Tensor::zeros(d_model, DType::F32, &Device::Cpu)?,
        b_dec_out: b_dec,
        threshold,
        w_skip,
        log_frequency: None,
    })
}

/// A Gemma Scope `params.npz`: `W_enc [d_model, d_sae]`, `W_dec [d_sae, d_model]`, `b_enc`,
/// `b_dec`, `threshold`; JumpReLU.
fn read_gemma_scope(path: &Path, layer: usize, config: &SetConfig) -> Result<Transcoder> {
    let arrays: HashMap<String, Tensor> = Tensor::read_npz(path)
        .map_err(|e| file_err(path, format!("not a readable .npz file: {e}")))?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let get = |k: &str| arrays.get(k).cloned().ok_or_else(|| file_err(path, format!("missing array {k}")));
    if let Some(extra) = arrays.keys().find(|k| !["W_enc", "W_dec", "b_enc", "b_dec", "threshold"].contains(&k.as_str())) {
        return Err(file_err(path, format!("unexpected array {extra}")));
    }
    let (w_enc, w_dec, b_enc, b_dec, threshold) = (get("W_enc")?, get("W_dec")?, get("b_enc")?, get("b_dec")?, get("threshold")?);
    let d_sae = b_enc.dims1().map_err(|_| file_err(path, "b_enc is not a vector"))?;
    let d_model = b_dec.dims1().map_err(|_| file_err(path, "b_dec is not a vector"))?;
    if w_enc.dims() != [d_model, d_sae] {
        return Err(file_err(path, format!("W_enc has shape {:?}, expected [{d_model}, {d_sae}] (Gemma Scope stores the model width first)", w_enc.dims())));
    }
    if w_dec.dims() != [d_sae, d_model] {
        return Err(file_err(path, format!("W_dec has shape {:?}, expected [{d_sae}, {d_model}]", w_dec.dims())));
    }
    check_len(path, "threshold", &threshold, d_sae)?;
    Ok(Transcoder {
        meta: config.meta(layer, d_model, d_sae, "gemma-scope", Activation::JumpRelu, None, &path.display().to_string()),
        w_enc: w_enc.contiguous()?,
        b_enc,
        w_dec: w_dec.contiguous()?,
        w_dec_next: Vec::new(),
        b_dec_in: Tensor::zeros(d_model, DType::F32, &Device::Cpu)?,
        b_dec_out: b_dec,
        threshold: Some(threshold),
        w_skip: None,
        log_frequency: None,
    })
}
