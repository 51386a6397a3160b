//! karpathy's llama2.c checkpoints (`stories260K.bin`) and tokenizers (`tok512.bin`).
//!
//! Two checkpoint layouts are read: the legacy one (7 × i32 header, then f32 weights with the
//! rotary tables; a negative vocab size means an unshared classifier) and export version 1
//! (magic `ak42`, 256-byte header, norms first). The q/k rows are permuted from llama2.c's
//! interleaved rotary pairs to the Hugging Face half-split layout, so one Llama forward serves both.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use super::config::{LlamaConfig, LlamaFamily};

/// A loaded llama2.c checkpoint: its config and its weights under Hugging Face names.
pub struct Llama2cCheckpoint {
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Tensor>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn i32(&mut self) -> Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.at + n > self.bytes.len() {
            bail!(
                "{}: truncated llama2.c file ({} bytes, needed at least {})",
                self.path.display(),
                self.bytes.len(),
                self.at + n
            );
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        let b = self.take(4 * n)?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// Reads a llama2.c checkpoint (legacy or version 1).
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Llama2cCheckpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut r = Reader { bytes: &bytes, at: 0, path };
    let magic = r.i32()?;
    let (version1, header) = if magic == 0x616b3432 {
        let version = r.i32()?;
        if version != 1 {
            bail!("{}: llama2.c export version {version} is not supported (1 or legacy)", path.display());
        }
        (true, [r.i32()?, r.i32()?, r.i32()?, r.i32()?, r.i32()?, r.i32()?, r.i32()?])
    } else {
        (false, [magic, r.i32()?, r.i32()?, r.i32()?, r.i32()?, r.i32()?, r.i32()?])
    };
    let [dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len] = header;
    let shared = if version1 { r.take(1)?[0] != 0 } else { vocab > 0 };
    let vocab = vocab.unsigned_abs() as usize;
    if dim <= 0 || hidden <= 0 || n_layers <= 0 || n_heads <= 0 || n_kv_heads <= 0 || seq_len <= 0
        || dim % n_heads != 0 || n_heads % n_kv_heads != 0 || vocab == 0
    {
        bail!("{}: not a llama2.c checkpoint (implausible header {header:?})", path.display());
    }
    let (d, hd, l) = (dim as usize, hidden as usize, n_layers as usize);
    let head_dim = d / n_heads as usize;
    let kv_dim = head_dim * n_kv_heads as usize;
    let seq_len = seq_len as usize;
    if version1 {
        r.at = 256;
    }

    let mut tensors = HashMap::new();
    let mut put = |name: String, data: Vec<f32>, shape: (usize, usize)| -> Result<()> {
        if data.iter().any(|x| !x.is_finite()) {
            bail!("{}: weight {name} holds NaN or infinite values", path.display());
        }
        tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        Ok(())
    };
    let read_layers = |r: &mut Reader, rows: usize, cols: usize| -> Result<Vec<Vec<f32>>> {
        (0..l).map(|_| r.f32s(rows * cols)).collect()
    };

    let (embed, rms_att, rms_ffn, rms_final);
    if version1 {
        rms_att = read_layers(&mut r, 1, d)?;
        rms_ffn = read_layers(&mut r, 1, d)?;
        rms_final = r.f32s(d)?;
        embed = r.f32s(vocab * d)?;
    } else {
        embed = r.f32s(vocab * d)?;
        rms_att = read_layers(&mut r, 1, d)?;
        rms_ffn = Vec::new();
        rms_final = Vec::new();
    }
    let wq = read_layers(&mut r, d, d)?;
    let wk = read_layers(&mut r, kv_dim, d)?;
    let wv = read_layers(&mut r, kv_dim, d)?;
    let wo = read_layers(&mut r, d, d)?;
    let (rms_ffn, w1, w2, w3, rms_final) = if version1 {
        let w1 = read_layers(&mut r, hd, d)?;
        let w2 = read_layers(&mut r, d, hd)?;
        let w3 = read_layers(&mut r, hd, d)?;
        (rms_ffn, w1, w2, w3, rms_final)
    } else {
        let rms_ffn = read_layers(&mut r, 1, d)?;
        let w1 = read_layers(&mut r, hd, d)?;
        let w2 = read_layers(&mut r, d, hd)?;
        let w3 = read_layers(&mut r, hd, d)?;
        let rms_final = r.f32s(d)?;
        r.take(seq_len * head_dim * 4)?; // freq_cis_real, freq_cis_imag: recomputed
        (rms_ffn, w1, w2, w3, rms_final)
    };
    let classifier = if shared { None } else { Some(r.f32s(vocab * d)?) };
    if r.at != bytes.len() {
        bail!(
            "{}: {} bytes left over after the weights; header {header:?} does not describe this file",
            path.display(),
            bytes.len() - r.at
        );
    }

    for i in 0..l {
        let p = format!("model.layers.{i}.");
        put(format!("{p}input_layernorm.weight"), rms_att[i].clone(), (1, d))?;
        put(format!("{p}post_attention_layernorm.weight"), rms_ffn[i].clone(), (1, d))?;
        put(format!("{p}self_attn.q_proj.weight"), halves_from_pairs(&wq[i], d, d, head_dim), (d, d))?;
        put(format!("{p}self_attn.k_proj.weight"), halves_from_pairs(&wk[i], kv_dim, d, head_dim), (kv_dim, d))?;
        put(format!("{p}self_attn.v_proj.weight"), wv[i].clone(), (kv_dim, d))?;
        put(format!("{p}self_attn.o_proj.weight"), wo[i].clone(), (d, d))?;
        put(format!("{p}mlp.gate_proj.weight"), w1[i].clone(), (hd, d))?;
        put(format!("{p}mlp.down_proj.weight"), w2[i].clone(), (d, hd))?;
        put(format!("{p}mlp.up_proj.weight"), w3[i].clone(), (hd, d))?;
    }
    put("model.embed_tokens.weight".into(), embed, (vocab, d))?;
    put("model.norm.weight".into(), rms_final, (1, d))?;
    if let Some(w) = classifier {
        put("lm_head.weight".into(), w, (vocab, d))?;
    }
    // Norm gains were stored as [1, d] rows for `put`; flatten them.
    for t in tensors.iter_mut().filter(|(k, _)| k.ends_with("norm.weight")) {
        *t.1 = t.1.flatten_all()?;
    }
    let config = LlamaConfig {
        family: LlamaFamily::Llama,
        hidden_size: d,
        intermediate_size: hd,
        num_hidden_layers: l,
        num_attention_heads: n_heads as usize,
        num_key_value_heads: n_kv_heads as usize,
        head_dim,
        vocab_size: vocab,
        max_position_embeddings: seq_len,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        tie_word_embeddings: shared,
        bos_token_id: Some(1),
        // run.c stops on BOS (a new story); Hugging Face configs of these models name 2.
        eos_token_ids: vec![2, 1],
    };
    Ok(Llama2cCheckpoint { config, tensors })
}

/// Permutes the output rows of a q/k weight `[rows, cols]` from interleaved rotary pairs
/// (2i, 2i+1) to half-split order (i, i + head_dim/2), head by head.
fn halves_from_pairs(w: &[f32], rows: usize, cols: usize, head_dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * cols];
    let half = head_dim / 2;
    for head in 0..rows / head_dim {
        for i in 0..half {
            for (src, dst) in [(2 * i, i), (2 * i + 1, i + half)] {
                let s = (head * head_dim + src) * cols;
                let t = (head * head_dim + dst) * cols;
                out[t..t + cols].copy_from_slice(&w[s..s + cols]);
            }
        }
    }
    out
}

/// llama2.c's BPE tokenizer: pieces with merge scores and byte fallback (`<0xXX>` at id 3 + byte).
pub struct Llama2cTokenizer {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    lookup: HashMap<Vec<u8>, u32>,
}

impl Llama2cTokenizer {
    /// Reads `tok512.bin`-style files: i32 max length, then per piece f32 score, i32 length, bytes.
    pub fn load(path: &Path, vocab_size: usize) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let mut r = Reader { bytes: &bytes, at: 0, path };
        r.i32()?;
        let mut pieces = Vec::with_capacity(vocab_size);
        let mut scores = Vec::with_capacity(vocab_size);
        for _ in 0..vocab_size {
            let score = r.f32s(1)?[0];
            if score.is_nan() {
                bail!("{}: piece {} has a NaN merge score", path.display(), scores.len());
            }
            scores.push(score);
            let len = r.i32()?;
            if !(0..=1024).contains(&len) {
                bail!("{}: not a llama2.c tokenizer (piece length {len})", path.display());
            }
            pieces.push(r.take(len as usize)?.to_vec());
        }
        let lookup = pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
        Ok(Self { pieces, scores, lookup })
    }

    /// Encodes like run.c's `encode` without BOS/EOS: a dummy-prefix space, code points or
    /// byte fallback, then greedy merges: each time the adjacent pair whose merged piece has the
    /// best score (the first such pair on a tie) is merged. Each pair's merge is looked up once,
    /// and again only when a merge beside it changes it.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut tokens = Vec::new();
        if text.is_empty() {
            return tokens;
        }
        if let Some(&id) = self.lookup.get(b" ".as_slice()) {
            tokens.push(id);
        }
        for ch in text.chars() {
            let mut buf = [0u8; 4];
            let s = ch.encode_utf8(&mut buf).as_bytes();
            match self.lookup.get(s) {
                Some(&id) => tokens.push(id),
                // Byte pieces `<0xXX>` sit at ids 3..259; a vocabulary too small to hold them
                // gets `<unk>` (0).
                None => tokens.extend(s.iter().map(|&b| if (b as usize + 3) < self.pieces.len() { b as u32 + 3 } else { 0 })),
            }
        }
        // merges[i]: the score and id of the piece that tokens i and i + 1 merge into, if any.
        let mut merged = Vec::new();
        let mut merge = |a: u32, b: u32| {
            merged.clear();
            merged.extend_from_slice(&self.pieces[a as usize]);
            merged.extend_from_slice(&self.pieces[b as usize]);
            self.lookup.get(&merged).map(|&id| (self.scores[id as usize], id))
        };
        let mut merges: Vec<Option<(f32, u32)>> = tokens.windows(2).map(|w| merge(w[0], w[1])).collect();
        loop {
            let mut best: Option<(f32, usize, u32)> = None;
            for (i, &m) in merges.iter().enumerate() {
                if let Some((score, id)) = m {
                    if best.is_none_or(|(s, _, _)| score > s) {
                        best = Some((score, i, id));
                    }
                }
            }
            let Some((_, i, id)) = best else { break };
            tokens[i] = id;
            tokens.remove(i + 1);
            merges.remove(i);
            if i > 0 {
                merges[i - 1] = merge(tokens[i - 1], tokens[i]);
            }
            if i < merges.len() {
                merges[i] = merge(tokens[i], tokens[i + 1]);
            }
        }
        tokens
    }

    /// Decodes without special tokens (0, 1, 2), bytes from `<0xXX>` pieces, and strips one
    /// leading space as the Hugging Face copy of these tokenizers does.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(piece) = self.pieces.get(id as usize) else { continue };
            if id <= 2 {
                continue;
            }
            if (3..259).contains(&id) && self.pieces.len() >= 259 {
                bytes.push((id - 3) as u8);
            } else {
                bytes.extend_from_slice(piece);
            }
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        match text.strip_prefix(' ') {
            Some(rest) => rest.to_string(),
            None => text,
        }
    }

    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary too small for the 256 byte pieces maps unknown characters to `<unk>` instead
    /// of indexing past its end.
    #[test]
    fn small_vocabulary_without_byte_pieces() {
        let pieces: Vec<Vec<u8>> = ["<unk>", "<s>", "</s>", " ", "a", "b", " a"].iter().map(|p| p.as_bytes().to_vec()).collect();
        let scores = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        let lookup = pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
        let t = Llama2cTokenizer { pieces, scores, lookup };
        assert_eq!(t.encode("aé b"), vec![6, 0, 0, 3, 5]);
        assert_eq!(t.decode(&[6, 0, 5]), "ab");
    }

    /// Merges as run.c does, rescanning every pair after each merge: random texts over a
    /// vocabulary of random pieces and scores (with ties), against that plain loop.
    #[test]
    fn merges_match_the_plain_loop() {
        fn plain(t: &Llama2cTokenizer, mut tokens: Vec<u32>) -> Vec<u32> {
            loop {
                let mut best: Option<(f32, usize, u32)> = None;
                for i in 0..tokens.len().saturating_sub(1) {
                    let mut merged = t.pieces[tokens[i] as usize].clone();
                    merged.extend_from_slice(&t.pieces[tokens[i + 1] as usize]);
                    if let Some(&id) = t.lookup.get(&merged) {
                        let score = t.scores[id as usize];
                        if best.is_none_or(|(s, _, _)| score > s) {
                            best = Some((score, i, id));
                        }
                    }
                }
                let Some((_, i, id)) = best else { return tokens };
                tokens[i] = id;
                tokens.remove(i + 1);
            }
        }
        let mut seed = 12345u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let alphabet = b" abc";
        let mut pieces: Vec<Vec<u8>> = ["<unk>", "<s>", "</s>"].iter().map(|p| p.as_bytes().to_vec()).collect();
        pieces.extend(alphabet.iter().map(|&c| vec![c]));
        while pieces.len() < 60 {
            let len = 2 + next(4) as usize;
            let p: Vec<u8> = (0..len).map(|_| alphabet[next(4) as usize]).collect();
            if !pieces.contains(&p) {
                pieces.push(p);
            }
        }
        let scores: Vec<f32> = (0..pieces.len()).map(|_| next(8) as f32).collect();
        let lookup = pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
        let t = Llama2cTokenizer { pieces, scores, lookup };
        let mut merged_any = false;
        for _ in 0..300 {
            let text: String = (0..1 + next(40)).map(|_| alphabet[next(4) as usize] as char).collect();
            let start: Vec<u32> = std::iter::once(3).chain(text.bytes().map(|b| 3 + alphabet.iter().position(|&c| c == b).unwrap() as u32)).collect();
            let want = plain(&t, start.clone());
            merged_any |= want.len() < start.len();
            assert_eq!(t.encode(&text), want, "{text:?}");
        }
        assert!(merged_any);
    }

    /// A NaN merge score (which would make the merge order arbitrary) is refused, naming the piece.
    #[test]
    fn nan_score_is_refused() {
        let path = std::env::temp_dir().join(format!("neurosteer-tok-{}.bin", std::process::id()));
        let mut bytes = 8i32.to_le_bytes().to_vec();
        for (i, score) in [0.0f32, 0.5, f32::NAN].into_iter().enumerate() {
            bytes.extend(score.to_le_bytes());
            bytes.extend(1i32.to_le_bytes());
            bytes.push(b'a' + i as u8);
        }
        std::fs::write(&path, bytes).unwrap();
        let e = format!("{:#}", Llama2cTokenizer::load(&path, 3).err().unwrap());
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains("neurosteer-tok") && e.contains("piece 2 has a NaN merge score"), "{e}");
    }
}
