//! Checkpoint weights from safetensors files (one or several shards), read tensor by tensor with
//! positioned reads straight into the dtype and device the model runs in. Only the converted
//! weights stay resident: no memory map of the file is held beside them, so a 16 GB bf16 checkpoint
//! needs 16 GB, not 32.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

/// The tensors of a checkpoint, by name, and where their bytes lie.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "U32" => DType::U32,
        "U8" | "BOOL" => DType::U8,
        _ => return None,
    })
}

impl SafetensorsFiles {
    /// Opens every file and checks its header: a truncated or corrupt file is named here.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
            for (name, entry) in read_header(path, &file, i)? {
                entries.insert(name, entry);
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, entries })
    }

    /// The floating-point dtype holding most of the checkpoint's bytes.
    pub fn stored_dtype(&self) -> DType {
        let mut bytes: HashMap<DType, u64> = HashMap::new();
        for e in self.entries.values().filter(|e| e.dtype.is_float()) {
            *bytes.entry(e.dtype).or_default() += e.end - e.start;
        }
        bytes.into_iter().max_by_key(|&(d, b)| (b, d.size_in_bytes())).map_or(DType::F32, |(d, _)| d)
    }

    /// Number of floating-point parameters.
    pub fn param_count(&self) -> u64 {
        self.entries.values().filter(|e| e.dtype.is_float()).map(|e| e.shape.iter().product::<usize>() as u64).sum()
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A tensor's shape, if it exists.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Reads one tensor as stored, on the CPU.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).with_context(|| format!("no tensor named {name}"))?;
        let (path, file) = &self.files[e.file];
        // In chunks of 4 MiB on every thread (the page-cache copy is the load's largest cost).
        let read = |bytes: &mut [u8]| {
            bytes.par_chunks_mut(CHUNK).enumerate().try_for_each(|(i, chunk)| {
                file.read_exact_at(chunk, e.start + (i * CHUNK) as u64)
                    .with_context(|| format!("{}: cannot read tensor {name}", path.display()))
            })
        };
        // Floats are read straight into their typed buffer (one copy of the tensor, not two).
        fn typed<T: candle_core::WithDType + bytemuck::Zeroable>(n: usize, read: impl Fn(&mut [u8]) -> Result<()>) -> Result<Vec<T>> {
            let mut v = super::zeroed_buffer::<T>(n);
            // SAFETY: f64, f32, f16 and bf16 are plain old data: any bytes are a valid value.
            let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>()) };
            read(bytes)?;
            Ok(v)
        }
        let n = e.shape.iter().product::<usize>();
        let dev = &Device::Cpu;
        // A NaN or infinite weight would poison every output: refuse it here, naming it.
        let finite = |ok: bool| -> Result<()> {
            anyhow::ensure!(ok, "{}: tensor {name} holds NaN or infinite values", path.display());
            Ok(())
        };
        Ok(match e.dtype {
            DType::F32 => {
                let v = typed::<f32>(n, read)?;
                finite(all_finite(&v))?;
                Tensor::from_vec(v, e.shape.as_slice(), dev)?
            }
            DType::BF16 => {
                let v = typed::<half::bf16>(n, read)?;
                finite(all_finite(&v))?;
                Tensor::from_vec(v, e.shape.as_slice(), dev)?
            }
            DType::F16 => {
                let v = typed::<half::f16>(n, read)?;
                finite(all_finite(&v))?;
                Tensor::from_vec(v, e.shape.as_slice(), dev)?
            }
            DType::F64 => {
                let v = typed::<f64>(n, read)?;
                finite(all_finite(&v))?;
                Tensor::from_vec(v, e.shape.as_slice(), dev)?
            }
            other => anyhow::bail!("{}: tensor {name} has dtype {other:?}; weights are floating point (f32, f16, bf16, f64)", path.display()),
        })
    }
}

/// Bytes per positioned read of a tensor.
const CHUNK: usize = 4 << 20;

/// Whether every value is finite (widening to f64 keeps NaN and infinities): branch-free within
/// blocks (so it vectorizes), blocks in parallel.
fn all_finite<T: candle_core::WithDType>(v: &[T]) -> bool {
    v.par_chunks(1 << 16).all(|c| c.iter().fold(true, |ok, x| ok & x.to_f64().is_finite()))
}

fn read_header(path: &Path, file: &File, index: usize) -> Result<Vec<(String, Entry)>> {
    let bad = |what: &str| anyhow::anyhow!("{}: corrupt or truncated safetensors file: {what}", path.display());
    let file_len = file.metadata().with_context(|| format!("{}: cannot stat", path.display()))?.len();
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0).map_err(|_| bad("shorter than its 8-byte header length"))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad(&format!("header length {n} does not fit the file of {file_len} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).map_err(|_| bad("cannot read the header"))?;
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(&format!("header is not a JSON object ({e})")))?;
    let data_start = 8 + n;
    let mut out = Vec::with_capacity(raw.len());
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        let r: RawEntry = serde_json::from_value(v).map_err(|e| bad(&format!("tensor {name}: {e}")))?;
        let dtype = parse_dtype(&r.dtype).ok_or_else(|| bad(&format!("tensor {name}: unsupported dtype {}", r.dtype)))?;
        let (s, e) = r.data_offsets;
        let numel = r.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let want = numel.and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64));
        if e < s || Some(e - s) != want || data_start + e > file_len {
            return Err(bad(&format!("tensor {name}: byte range {s}..{e} does not match its shape {:?} or the file", r.shape)));
        }
        out.push((name, Entry { file: index, dtype, shape: r.shape, start: data_start + s, end: data_start + e }));
    }
    // Tensors sharing bytes would read each other's values (an empty tensor has none to share).
    out.sort_by_key(|(_, e)| (e.start, e.end));
    let stored: Vec<&(String, Entry)> = out.iter().filter(|(_, e)| e.end > e.start).collect();
    for pair in stored.windows(2) {
        let ((a, ea), (b, eb)) = (&pair[0], &pair[1]);
        if eb.start < ea.end {
            return Err(bad(&format!("tensors {a} and {b} share bytes")));
        }
    }
    Ok(out)
}

/// `t` if it has shape `s`, else an error naming tensor `name` (a backend's `get`).
pub(crate) fn expect_shape(t: Tensor, s: &Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.shape() != s {
        return Err(candle_core::Error::Msg(format!("tensor {name} has shape {:?}, expected {:?}", t.dims(), s.dims())));
    }
    Ok(t)
}

impl candle_nn::var_builder::SimpleBackend for SafetensorsFiles {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        expect_shape(self.get_unchecked(name, dtype, dev)?, &s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.read(name).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of the named f32 tensors (hand-written, as a checkpoint would be).
    fn write(path: &Path, tensors: &[(&str, Vec<f32>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, v) in tensors {
            let start = data.len();
            data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            header.insert(name.to_string(), serde_json::json!({"dtype": "F32", "shape": [v.len()], "data_offsets": [start, data.len()]}));
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.extend(data);
        std::fs::write(path, bytes).unwrap();
    }

    /// A tensor of several read chunks comes back exactly; a NaN or an infinity in any chunk is
    /// one error naming the file and the tensor.
    #[test]
    fn chunked_reads_are_exact_and_refuse_non_finite_values() {
        let dir = std::env::temp_dir().join(format!("neurosteer-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let n = 2 * CHUNK / 4 + 123;
        let big: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
        for (bad, at) in [(f32::NAN, n - 1), (f32::INFINITY, CHUNK / 4 + 1), (f32::NEG_INFINITY, 0)] {
            let mut poisoned = big.clone();
            poisoned[at] = bad;
            let path = dir.join("w.safetensors");
            write(&path, &[("ok", big.clone()), ("poisoned", poisoned)]);
            let files = SafetensorsFiles::open(&[path]).unwrap();
            assert_eq!(files.read("ok").unwrap().to_vec1::<f32>().unwrap(), big);
            let e = format!("{:#}", files.read("poisoned").unwrap_err());
            assert!(e.contains("w.safetensors") && e.contains("tensor poisoned holds NaN or infinite"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two tensors whose byte ranges overlap are refused when the file is opened.
    #[test]
    fn overlapping_tensors_are_refused() {
        let dir = std::env::temp_dir().join(format!("neurosteer-overlap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("o.safetensors");
        let header = br#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.extend([0u8; 16]);
        std::fs::write(&path, bytes).unwrap();
        let e = format!("{:#}", SafetensorsFiles::open(std::slice::from_ref(&path)).err().unwrap());
        assert!(e.contains("o.safetensors") && e.contains("tensors a and b share bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
