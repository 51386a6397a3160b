//! `neurosteer._native`: the Python bindings. Every method calls the library as the command line
//! does; this file only converts arguments and results (numpy arrays, dicts) and releases the GIL
//! while the library computes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use candle_core::{Device, Tensor};
use neurosteer::experiment::{self, ClassifyJob, DatasetSpec, SteerJob, TraceJob};
use neurosteer::generate::{generate, GenerateOptions};
use neurosteer::hooks::{HookPoint, Hooks, ZeroAblation};
use neurosteer::model::{DTypeChoice, Model, Placement, TranscoderDType};
use neurosteer::transcoder::splice::{Splice, SteerMode, Steering};
use neurosteer::transcoder::{Activation, Transcoder};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{AllowTypeChange, IntoPyArray, PyArrayDyn, PyArrayLikeDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

create_exception!(
    neurosteer,
    NeurosteerError,
    PyRuntimeError,
    "An error from neurosteer; the message is the one line the command line prints."
);

/// The CLI's one-line message for an error: its context chain on one line.
fn py_err(e: anyhow::Error) -> PyErr {
    NeurosteerError::new_err(neurosteer::error_line(&e))
}

/// Runs `f` with the GIL released, turning its errors (and any panic) into [`NeurosteerError`].
fn compute<T: Send>(py: Python<'_>, f: impl FnOnce() -> anyhow::Result<T> + Send) -> PyResult<T> {
    let outcome = py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    match outcome {
        Ok(result) => result.map_err(py_err),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(NeurosteerError::new_err(format!("internal error: {msg}")))
        }
    }
}

/// Runs `f` with the library's progress bars shown or hidden as asked (`None`: unchanged, i.e.
/// drawn when stderr is a terminal).
fn with_progress<T>(progress: Option<bool>, f: impl FnOnce() -> T) -> T {
    let before = neurosteer::progress::shown();
    if let Some(p) = progress {
        neurosteer::progress::set_shown(p);
    }
    let out = f();
    neurosteer::progress::set_shown(before);
    out
}

/// An f32 tensor copied out of candle, ready to hand to numpy without another copy.
struct Array {
    data: Vec<f32>,
    shape: Vec<usize>,
}

impl Array {
    fn from_tensor(t: &Tensor) -> anyhow::Result<Self> {
        let shape = t.dims().to_vec();
        let data = t.to_device(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self { data, shape })
    }

    fn into_py(self, py: Python<'_>) -> PyResult<Bound<'_, PyArrayDyn<f32>>> {
        let a = ArrayD::from_shape_vec(IxDyn(&self.shape), self.data).map_err(|e| NeurosteerError::new_err(e.to_string()))?;
        Ok(a.into_pyarray(py))
    }
}

/// A CPU tensor holding a numpy array (or anything `numpy.asarray` takes) as f32.
fn tensor_from(x: &PyArrayLikeDyn<'_, f32, AllowTypeChange>) -> PyResult<Tensor> {
    let shape = x.shape().to_vec();
    // `as_slice` also accepts Fortran order, whose memory order is not the logical one.
    let data = match x.as_slice() {
        Ok(s) if x.is_c_contiguous() => s.to_vec(),
        _ => x.as_array().iter().copied().collect(),
    };
    Tensor::from_vec(data, shape, &Device::Cpu).map_err(|e| py_err(e.into()))
}

/// `obj` as JSON (via Python's `json`, paths as strings).
fn to_json(obj: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    let py = obj.py();
    let kwargs = PyDict::new(py);
    kwargs.set_item("default", py.import("os")?.getattr("fspath")?)?;
    let text: String = py.import("json")?.call_method("dumps", (obj,), Some(&kwargs))?.extract()?;
    serde_json::from_str(&text).map_err(|e| NeurosteerError::new_err(e.to_string()))
}

/// JSON text as Python objects (dicts, lists, numbers, strings).
fn from_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

/// A JSON file written by the library, as Python objects.
fn read_json<'py>(py: Python<'py>, path: &Path) -> PyResult<Bound<'py, PyAny>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display())).map_err(py_err)?;
    from_json(py, &text)
}

/// A value of one of the command line's enums (`--dtype`, `--mode`), parsed as clap parses it.
fn parse_enum<T: clap::ValueEnum>(what: &str, value: &str) -> PyResult<T> {
    T::from_str(value, false).map_err(|_| {
        let names: Vec<String> =
            T::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| p.get_name().to_string()).collect();
        NeurosteerError::new_err(format!("{what} `{value}`: expected one of {}", names.join(", ")))
    })
}

/// A pipeline job from keyword arguments, deserialised as a `run` config's table is (so its
/// defaults are the config's). With `dataset`, the dataset's own fields (`n`, `split`, `seed`,
/// `shuffle`, `kind`, ...) are taken from the keywords too.
fn job<T: serde::de::DeserializeOwned>(what: &str, dataset: Option<&str>, options: Option<&Bound<'_, PyDict>>) -> PyResult<T> {
    let mut fields = match options {
        Some(o) => match to_json(o.as_any())? {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a dict is a JSON object"),
        },
        None => serde_json::Map::new(),
    };
    if let Some(path) = dataset {
        let mut spec = serde_json::Map::new();
        spec.insert("path".into(), path.into());
        let names = serde_json::from_value::<DatasetSpec>(serde_json::Value::Object(spec.clone()))
            .and_then(serde_json::to_value)
            .map_err(|e| NeurosteerError::new_err(e.to_string()))?;
        for name in names.as_object().into_iter().flat_map(|m| m.keys()).filter(|k| *k != "path") {
            if let Some(v) = fields.remove(name) {
                spec.insert(name.clone(), v);
            }
        }
        fields.insert("dataset".into(), spec.into());
    }
    serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| NeurosteerError::new_err(format!("{what}: {e}")))
}

/// Features as `--features` takes them: a list of indices becomes `1,5,9`; a string or path
/// (`"1,5,9"`, a JSON file with a list, a neurons.json) is taken as is.
fn features_spec(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    match obj.extract::<PathBuf>() {
        Ok(p) => Ok(p.to_string_lossy().into_owned()),
        Err(_) => Ok(obj.extract::<Vec<usize>>()?.iter().map(usize::to_string).collect::<Vec<_>>().join(",")),
    }
}

/// An activation's name, as the transcoder meta serialises it (`relu`, `jump_relu`, ...).
fn activation_name(a: &Activation) -> String {
    serde_json::to_value(a).ok().and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string)).unwrap_or_default()
}

/// A transcoder argument: a `Transcoder` object, or one read from a path for this call.
enum TranscoderArg<'py> {
    Object(Bound<'py, PyTranscoder>),
    Read(PyTranscoder),
}

impl std::ops::Deref for TranscoderArg<'_> {
    type Target = PyTranscoder;

    fn deref(&self) -> &PyTranscoder {
        match self {
            TranscoderArg::Object(t) => t.get(),
            TranscoderArg::Read(t) => t,
        }
    }
}

/// A `Transcoder` object or a path to load one from.
fn transcoder_arg<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<TranscoderArg<'py>> {
    if let Ok(t) = obj.cast::<PyTranscoder>() {
        return Ok(TranscoderArg::Object(t.clone()));
    }
    let path: PathBuf = obj.extract()?;
    let tc = compute(py, || Transcoder::load(&path, None))?;
    Ok(TranscoderArg::Read(PyTranscoder::new(tc, path)))
}

/// A model's shapes: `model.cfg`.
#[pyclass(frozen, get_all, name = "ModelConfig", module = "neurosteer")]
struct PyModelConfig {
    /// Where the model came from (folder, file or hub id).
    source: String,
    /// `"llama"` or `"gpt2"`.
    family: String,
    n_layers: usize,
    d_model: usize,
    d_mlp: usize,
    /// Vocabulary size (TransformerLens's `d_vocab`, also available under that name).
    vocab: usize,
    /// Context length.
    n_ctx: usize,
    /// The BOS id prepended by `to_tokens`, or None.
    bos: Option<u32>,
    /// Ids that end a generated sequence.
    eos: Vec<u32>,
    /// `"cpu"` or `"cuda:N"`.
    device: String,
    /// The weights' dtype: `"f32"`, `"bf16"` or `"f16"`.
    dtype: String,
}

#[pymethods]
impl PyModelConfig {
    /// TransformerLens's name for `vocab`.
    #[getter]
    fn d_vocab(&self) -> usize {
        self.vocab
    }

    fn __repr__(&self) -> String {
        format!(
            "ModelConfig(family={:?}, n_layers={}, d_model={}, d_mlp={}, vocab={}, n_ctx={}, device={:?}, dtype={:?}, source={:?})",
            self.family, self.n_layers, self.d_model, self.d_mlp, self.vocab, self.n_ctx, self.device, self.dtype, self.source
        )
    }
}

/// A language model (Llama family, GPT-2, llama2.c) with TransformerLens hook points.
#[pyclass(frozen, name = "Model", module = "neurosteer")]
struct PyModel {
    model: Model,
}

#[pymethods]
impl PyModel {
    /// Loads a Hugging Face folder, a hub id or a llama2.c `.bin` checkpoint (as `--model`).
    #[staticmethod]
    #[pyo3(signature = (spec, *, device = "cpu", dtype = "auto", transcoder_dtype = "f32", tokenizer = None, no_bos = false))]
    fn load(py: Python<'_>, spec: &str, device: &str, dtype: &str, transcoder_dtype: &str, tokenizer: Option<PathBuf>, no_bos: bool) -> PyResult<Self> {
        let placement = Placement {
            device: device.to_string(),
            dtype: parse_enum::<DTypeChoice>("dtype", dtype)?,
            transcoder_dtype: parse_enum::<TranscoderDType>("transcoder_dtype", transcoder_dtype)?,
        };
        let model = compute(py, || Model::load(spec, &placement.load_options(tokenizer, no_bos)?))?;
        Ok(Self { model })
    }

    /// The model's shapes and special tokens.
    #[getter]
    fn cfg(&self) -> PyModelConfig {
        let i = &self.model.info;
        let device = match self.model.device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cpu".to_string(),
        };
        PyModelConfig {
            source: i.source.clone(),
            family: i.family.to_string(),
            n_layers: i.n_layers,
            d_model: i.d_model,
            d_mlp: i.d_mlp,
            vocab: i.vocab_size,
            n_ctx: i.n_ctx,
            bos: self.model.codec.bos,
            eos: i.eos.clone(),
            device,
            dtype: self.model.dtype.as_str().to_string(),
        }
    }

    /// Token ids of `text`, BOS first unless loaded with `no_bos` (TransformerLens's `to_tokens`).
    fn to_tokens<'py>(&self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
        let ids = self.model.codec.to_tokens(text).map_err(py_err)?;
        let n = ids.len();
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        Ok(ArrayD::from_shape_vec(IxDyn(&[n]), ids).expect("length matches").into_pyarray(py))
    }

    /// The text of token ids.
    fn to_string(&self, ids: Vec<u32>) -> PyResult<String> {
        self.model.codec.decode(&ids).map_err(py_err)
    }

    /// Runs one prompt (text, or token ids) and returns `(logits, cache)`: TransformerLens's
    /// logits `[seq, vocab]` (centred, except Gemma-2's) and `{hook name: [seq, d]}` for every name in `names`.
    #[pyo3(signature = (input, names = None))]
    fn run_with_cache<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        names: Option<Vec<String>>,
    ) -> PyResult<(Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyDict>)> {
        let model = &self.model;
        let ids: Vec<u32> = if input.is_instance_of::<PyString>() {
            model.codec.to_tokens(&input.extract::<String>()?).map_err(py_err)?
        } else {
            input.extract()?
        };
        let names = names.unwrap_or_default();
        let points = names.iter().map(|n| model.hook_point(n)).collect::<anyhow::Result<Vec<HookPoint>>>().map_err(py_err)?;
        let (logits, values) = compute(py, || {
            let (logits, values) = neurosteer::activations::run_with_cache(model, &ids, &points)?;
            let values = points.iter().map(|p| Array::from_tensor(&values[p])).collect::<anyhow::Result<Vec<_>>>()?;
            Ok((Array::from_tensor(&logits)?, values))
        })?;
        let cache = PyDict::new(py);
        for (name, value) in names.iter().zip(values) {
            cache.set_item(name, value.into_py(py)?)?;
        }
        Ok((logits.into_py(py)?, cache))
    }

    /// Greedy generation with a KV cache, in batches, optionally steering transcoder features
    /// (as `neurosteer generate --json`). Returns `{"prompt", "new_tokens", "text"}` per prompt (a
    /// list for a list of prompts).
    #[pyo3(signature = (prompts, max_new_tokens = 50, batch_size = 8, steer = None, *, truncate_left = false, ablate_mlp = Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompts: &Bound<'py, PyAny>,
        max_new_tokens: usize,
        batch_size: usize,
        steer: Option<&Bound<'py, PyAny>>,
        truncate_left: bool,
        ablate_mlp: Vec<usize>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let model = &self.model;
        let single = prompts.is_instance_of::<PyString>();
        let texts: Vec<String> = if single { vec![prompts.extract()?] } else { prompts.extract()? };
        let steerings: Vec<Py<PySteering>> = match steer {
            None => Vec::new(),
            Some(s) => match s.cast::<PySteering>() {
                Ok(one) => vec![one.clone().unbind()],
                Err(_) => s.extract()?,
            },
        };
        let edits: Vec<&PySteering> = steerings.iter().map(|s| s.get()).collect();
        let opts = GenerateOptions { max_new_tokens, batch_size, stop_at_eos: true, truncate_left, feed_last: false };
        let outputs = compute(py, || {
            let mut hooks = Hooks::none();
            for s in &edits {
                hooks.edit(s.edit_for(model)?);
            }
            for &l in &ablate_mlp {
                if l >= model.info.n_layers {
                    anyhow::bail!("--ablate-mlp {l}: the model has {} layers", model.info.n_layers);
                }
                hooks.edit(Arc::new(ZeroAblation(l)));
            }
            let ids: Vec<Vec<u32>> = texts.iter().map(|p| model.codec.to_tokens(p)).collect::<anyhow::Result<_>>()?;
            let news = generate(model, &ids, &opts, &hooks, |_| Ok(()))?;
            news.into_iter().map(|new| Ok((model.codec.decode(&new)?, new))).collect::<anyhow::Result<Vec<_>>>()
        })?;
        let records = PyList::empty(py);
        for (prompt, (text, new)) in texts.iter().zip(outputs) {
            let r = PyDict::new(py);
            r.set_item("prompt", prompt)?;
            r.set_item("new_tokens", new)?;
            r.set_item("text", text)?;
            records.append(r)?;
        }
        if single { Ok(records.get_item(0)?) } else { Ok(records.into_any()) }
    }

    fn __repr__(&self) -> String {
        format!("Model({:?})", self.model.info.source)
    }
}

/// A transcoder's placement and sizes: `tc.cfg`.
#[pyclass(frozen, get_all, name = "TranscoderConfig", module = "neurosteer")]
struct PyTranscoderConfig {
    /// Block index.
    layer: usize,
    /// Input hook, e.g. `blocks.2.ln2.hook_normalized`.
    hook_in: String,
    /// Output hook, e.g. `blocks.2.hook_mlp_out`.
    hook_out: String,
    d_in: usize,
    d_sae: usize,
    d_out: usize,
    /// The on-disk format it was read from.
    format: String,
    /// The model it was trained on, when the file says.
    model_name: Option<String>,
    /// `"relu"`, `"jump_relu"` (`pre·(pre > θ)`), `"jump_relu_non_negative"` (SAELens's
    /// `relu(pre)·(pre > θ)`) or `"top_k"`.
    activation: String,
    /// For `top_k`: how many features each token keeps.
    k: Option<usize>,
    /// Whether it has a skip connection (`W_skip`).
    skip: bool,
    /// Other configuration fields of the file.
    extra: Py<PyAny>,
}

#[pymethods]
impl PyTranscoderConfig {
    fn __repr__(&self) -> String {
        format!(
            "TranscoderConfig(layer={}, d_in={}, d_sae={}, d_out={}, format={:?}, activation={:?}, skip={})",
            self.layer,
            self.d_in,
            self.d_sae,
            self.d_out,
            self.format,
            self.activation,
            if self.skip { "True" } else { "False" }
        )
    }
}

/// A transcoder: a sparse stand-in for one layer's MLP.
#[pyclass(frozen, name = "Transcoder", module = "neurosteer")]
struct PyTranscoder {
    tc: Arc<Transcoder>,
    path: PathBuf,
    /// Copies made for models on other devices or in other precisions (`transcoder_dtype`), kept
    /// so that each is converted once, not at every call.
    placed: std::sync::Mutex<Vec<Arc<Transcoder>>>,
}

impl PyTranscoder {
    fn new(tc: Transcoder, path: PathBuf) -> Self {
        Self { tc: Arc::new(tc), path, placed: Default::default() }
    }

    /// This transcoder ready to run with `model`: checked against it (hooks, widths), on its
    /// device and in its transcoder dtype.
    fn for_model(&self, model: &Model) -> anyhow::Result<Arc<Transcoder>> {
        experiment::check_fit(model, &self.tc, &self.path)?;
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = placed.iter().find(|t| experiment::is_placed_for(model, t)) {
            return Ok(t.clone());
        }
        let t = experiment::place_for(model, self.tc.clone())?;
        if !Arc::ptr_eq(&t, &self.tc) {
            // One copy per place and dtype: a copy for an earlier device handle there (a CUDA
            // device opened again) is dropped.
            placed.retain(|p| place(p) != place(&t));
            placed.push(t.clone());
        }
        Ok(t)
    }
}

/// Where a transcoder's weights are and in which dtype: one placed copy (and one edit around it)
/// is kept per place.
fn place(t: &Transcoder) -> (candle_core::DeviceLocation, candle_core::DType) {
    (t.w_enc.device().location(), t.w_enc.dtype())
}

#[pymethods]
impl PyTranscoder {
    /// Loads a transcoder in any format the command line's `--transcoder` takes: a sae_training
    /// `.pt`, a SAELens folder, a neurosteer `.safetensors`, a circuit-tracer set or cross-layer
    /// folder (`layer` picks the layer), one layer's file of a set, a Gemma Scope `params.npz`, or
    /// a hub reference (`hf://org/repo[/path]`, `org/repo`). `layer`, when given for a single
    /// file, must be its layer.
    #[staticmethod]
    #[pyo3(signature = (path, layer = None))]
    fn load(py: Python<'_>, path: PathBuf, layer: Option<usize>) -> PyResult<Self> {
        let tc = compute(py, || Transcoder::load(&path, layer))?;
        Ok(Self::new(tc, path))
    }

    /// The file or folder it was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Placement, sizes and the file's configuration.
    #[getter]
    fn cfg(&self, py: Python<'_>) -> PyResult<PyTranscoderConfig> {
        let m = &self.tc.meta;
        let extra = serde_json::to_string(&m.extra).map_err(|e| NeurosteerError::new_err(e.to_string()))?;
        Ok(PyTranscoderConfig {
            layer: m.layer,
            hook_in: m.hook_in.clone(),
            hook_out: m.hook_out.clone(),
            d_in: m.d_in,
            d_sae: m.d_sae,
            d_out: m.d_out,
            format: m.format.clone(),
            model_name: m.model_name.clone(),
            activation: activation_name(&m.activation),
            k: match m.activation {
                Activation::TopK { k } => Some(k),
                _ => None,
            },
            skip: self.tc.w_skip.is_some(),
            extra: from_json(py, &extra)?.unbind(),
        })
    }

    /// log10 firing frequency per feature `[d_sae]`, or None when the file has none.
    #[getter]
    fn log_frequency<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArrayDyn<f32>>>> {
        self.tc
            .log_frequency
            .clone()
            .map(|v| Array { shape: vec![v.len()], data: v }.into_py(py))
            .transpose()
    }

    /// Features whose log10 frequency is above `threshold`, or None without frequencies.
    #[pyo3(signature = (threshold = -6.0))]
    fn alive(&self, threshold: f32) -> Option<Vec<usize>> {
        self.tc.alive(threshold)
    }

    /// Feature activations `[..., d_in] -> [..., d_sae]`.
    fn encode<'py>(&self, py: Python<'py>, x: PyArrayLikeDyn<'py, f32, AllowTypeChange>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let x = tensor_from(&x)?;
        compute(py, || Array::from_tensor(&self.tc.encode(&x)?))?.into_py(py)
    }

    /// Output from feature activations `[..., d_sae] -> [..., d_out]` (`f @ W_dec + b_dec_out`).
    fn decode<'py>(&self, py: Python<'py>, f: PyArrayLikeDyn<'py, f32, AllowTypeChange>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let f = tensor_from(&f)?;
        compute(py, || Array::from_tensor(&self.tc.decode(&f)?))?.into_py(py)
    }

    /// The full prediction `[..., d_in] -> [..., d_out]`: decode(encode(x)) plus the skip
    /// connection when there is one.
    fn forward<'py>(&self, py: Python<'py>, x: PyArrayLikeDyn<'py, f32, AllowTypeChange>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let x = tensor_from(&x)?;
        compute(py, || Array::from_tensor(&self.tc.forward(&x)?))?.into_py(py)
    }

    fn __repr__(&self) -> String {
        let m = &self.tc.meta;
        format!("Transcoder({:?}, layer={}, d_sae={})", self.path.display().to_string(), m.layer, m.d_sae)
    }
}

/// Scaling a transcoder's features while the model generates (`--transcoder --features
/// --strength --mode`).
#[pyclass(frozen, name = "Steering", module = "neurosteer")]
struct PySteering {
    transcoder: Py<PyTranscoder>,
    edit: Arc<Steering>,
    /// The edit built again around each placed copy of the transcoder (another device or
    /// `transcoder_dtype`), kept so that it is built once, not at every call.
    placed: std::sync::Mutex<Vec<(Arc<Transcoder>, Arc<Steering>)>>,
}

impl PySteering {
    /// The edit for `model`: the one built with the Steering when the transcoder needs no other
    /// device or dtype, else the one around the placed copy (built at its first use).
    fn edit_for(&self, model: &Model) -> anyhow::Result<Arc<Steering>> {
        let t = self.transcoder.get();
        let fitted = t.for_model(model)?;
        if Arc::ptr_eq(&fitted, &t.tc) {
            return Ok(self.edit.clone());
        }
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, edit)) = placed.iter().find(|(tc, _)| Arc::ptr_eq(tc, &fitted)) {
            return Ok(edit.clone());
        }
        let (features, strength, mode) = (self.edit.features().to_vec(), self.edit.strength(), self.edit.mode());
        let edit = Arc::new(experiment::splice_for(model, fitted.clone(), &t.path, mode)?.steering(features, strength, mode)?);
        placed.retain(|(tc, _)| place(tc) != place(&fitted));
        placed.push((fitted, edit.clone()));
        Ok(edit)
    }
}

#[pymethods]
impl PySteering {
    /// `features`: a list of indices, or what `--features` takes (`"1,5,9"`, a JSON file with a
    /// list, or a neurons.json whose "reasoning" list is used). `mode`: delta, replace or seed-compat.
    #[new]
    #[pyo3(signature = (transcoder, features, strength, mode = "delta"))]
    fn new(py: Python<'_>, transcoder: Bound<'_, PyTranscoder>, features: &Bound<'_, PyAny>, strength: f64, mode: &str) -> PyResult<Self> {
        let mode = parse_enum::<SteerMode>("mode", mode)?;
        let (tc, path) = (transcoder.get().tc.clone(), transcoder.get().path.clone());
        let spec = features_spec(features)?;
        let features = neurosteer::classify::parse_features(&spec).map_err(py_err)?;
        neurosteer::classify::check_made_for(&spec, &tc.meta).map_err(py_err)?;
        let edit = compute(py, || {
            if mode == SteerMode::Replace && tc.is_cross_layer() {
                // Replace with a cross-layer transcoder splices every source layer.
                let all = Transcoder::load_all(&path, tc.clone())?;
                return Splice::cross_layer(all, tc.meta.layer)?.steering(features, strength, mode);
            }
            Steering::new(tc, features, strength, mode)
        })?;
        Ok(Self { transcoder: transcoder.unbind(), edit: Arc::new(edit), placed: Default::default() })
    }

    #[getter]
    fn transcoder(&self, py: Python<'_>) -> Py<PyTranscoder> {
        self.transcoder.clone_ref(py)
    }

    #[getter]
    fn features(&self) -> Vec<usize> {
        self.edit.features().to_vec()
    }

    #[getter]
    fn strength(&self) -> f64 {
        self.edit.strength()
    }

    #[getter]
    fn mode(&self) -> String {
        self.edit.mode().to_string()
    }

    #[getter]
    fn layer(&self) -> usize {
        self.edit.layer()
    }

    fn __repr__(&self) -> String {
        format!(
            "Steering(layer={}, {} features, strength={}, mode={:?})",
            self.edit.layer(),
            self.edit.features().len(),
            self.edit.strength(),
            self.edit.mode().to_string()
        )
    }
}

/// `neurosteer trace`: generates under each prompt style and records every feature at each step
/// into `out`. Returns the trace manifest (`out/trace.json`).
#[pyfunction]
#[pyo3(signature = (model, transcoder, dataset, out, *, progress = None, **options))]
fn trace<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyModel>,
    transcoder: &Bound<'py, PyAny>,
    dataset: &str,
    out: PathBuf,
    progress: Option<bool>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let job: TraceJob = job("trace", Some(dataset), options)?;
    let arg = transcoder_arg(py, transcoder)?;
    let t: &PyTranscoder = &arg;
    let model = &model.get().model;
    compute(py, || {
        let tc = t.for_model(model)?;
        with_progress(progress, || experiment::run_trace_job(&job, model, tc, &t.path, &out))
    })?;
    read_json(py, &out.join("trace.json"))
}

/// `neurosteer classify`: splits alive features into reasoning and memory features; writes
/// `out` (with a CSV and plots beside it) and returns its content. The token-injection control
/// (`inject={...}`) needs `model` and `transcoder`.
#[pyfunction]
#[pyo3(signature = (traces, out = PathBuf::from("neurons.json"), *, model = None, transcoder = None, **options))]
fn classify<'py>(
    py: Python<'py>,
    traces: PathBuf,
    out: PathBuf,
    model: Option<&Bound<'py, PyModel>>,
    transcoder: Option<&Bound<'py, PyAny>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let job: ClassifyJob = job("classify", None, options)?;
    let arg = transcoder.map(|t| transcoder_arg(py, t)).transpose()?;
    let t: Option<&PyTranscoder> = arg.as_deref();
    let model = model.map(|m| &m.get().model);
    compute(py, || {
        let fitted = match (model, t) {
            (Some(m), Some(t)) => Some((m, t.for_model(m)?)),
            _ => None,
        };
        experiment::run_classify_job(&job, &traces, &out, fitted.as_ref().map(|(m, t)| (*m, t.as_ref())))
    })?;
    read_json(py, &out)
}

/// `neurosteer steer`: answers the dataset's questions under each steering configuration;
/// writes `out` and returns its records.
#[pyfunction]
#[pyo3(signature = (model, transcoder, features, dataset, out = PathBuf::from("results.json"), *, progress = None, **options))]
#[allow(clippy::too_many_arguments)]
fn steer<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyModel>,
    transcoder: &Bound<'py, PyAny>,
    features: &Bound<'py, PyAny>,
    dataset: &str,
    out: PathBuf,
    progress: Option<bool>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let job: SteerJob = job("steer", Some(dataset), options)?;
    let features = features_spec(features)?;
    let arg = transcoder_arg(py, transcoder)?;
    let t: &PyTranscoder = &arg;
    let model = &model.get().model;
    compute(py, || {
        let splice = experiment::splice_for(model, t.for_model(model)?, &t.path, job.mode)?;
        with_progress(progress, || experiment::run_steer_job(&job, model, &splice, &t.path, &features, &out))
    })?;
    read_json(py, &out)
}

/// `neurosteer evaluate`: scores a results file (accuracy, bootstrap CIs, McNemar tests, the
/// controls' distribution, flips) and writes evaluation.{json,md,csv}, the plots and report.html
/// into `out` (`neurons`: the classification to describe in the report). Returns the evaluation.
#[pyfunction]
#[pyo3(signature = (results, out = PathBuf::from("evaluation"), neurons = None))]
fn evaluate<'py>(py: Python<'py>, results: PathBuf, out: PathBuf, neurons: Option<PathBuf>) -> PyResult<Bound<'py, PyAny>> {
    let (e, _) = compute(py, || neurosteer::evaluate::evaluate_file(&results, &out, neurons.as_deref()))?;
    let text = serde_json::to_string(&e).map_err(|e| NeurosteerError::new_err(e.to_string()))?;
    from_json(py, &text)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NeurosteerError", m.py().get_type::<NeurosteerError>())?;
    m.add_class::<PyModel>()?;
    m.add_class::<PyModelConfig>()?;
    m.add_class::<PyTranscoder>()?;
    m.add_class::<PyTranscoderConfig>()?;
    m.add_class::<PySteering>()?;
    m.add_function(wrap_pyfunction!(trace, m)?)?;
    m.add_function(wrap_pyfunction!(classify, m)?)?;
    m.add_function(wrap_pyfunction!(steer, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    Ok(())
}
