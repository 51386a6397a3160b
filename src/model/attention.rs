//! What every architecture's attention shares: the per-sequence KV cache with its padding
//! bookkeeping, the positions and masks of one forward step (causal, and sliding-window for
//! Gemma-2's local layers), rotary tables, and scaled dot-product attention with optional score
//! soft-capping.
//!
//! Batches are left-padded. Each sequence keeps its own positions (a padded prompt starts at
//! position 0 at its first real token) and never attends to padding, so a batch gives what one
//! prompt at a time gives. A sliding window counts positions, not cache slots, so padding never
//! shrinks it.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::config::Llama3RopeScaling;
use super::pointwise::normalize;
use super::LogitsAt;
use crate::hooks::{HookPoint, Hooks};

/// Keys and values of every layer, plus which cached slots hold real tokens.
///
/// Each layer's keys and values live in buffers `[batch, kv_heads, capacity, head_dim]` allocated
/// once, in f32 on the model's device, and written in place step by step; a step past the
/// capacity (only when the caller's estimate was short) moves them to buffers twice as large.
/// On the CPU they are ordinary pages, not huge ones: those measured no faster here, and a
/// 2 MiB page spans several (sequence, head) regions, so the whole capacity would be resident
/// from the prefill on, where small pages become resident as tokens are generated.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Slots allocated per sequence.
    capacity: usize,
    /// `valid[b][slot]`: whether slot `slot` of sequence `b` is a real token (not padding).
    valid: Vec<Vec<bool>>,
    /// The position the next real token of each sequence takes.
    next_pos: Vec<usize>,
}

/// Positions and attention mask of one forward step over `[batch, seq]` new tokens.
pub struct Step {
    /// `[batch * seq]` u32 positions, for rotary tables and learned position embeddings.
    pub positions: Tensor,
    /// `[batch, 1, seq, past + seq]` additive mask (0 or -inf).
    pub mask: Tensor,
    /// The mask of sliding-window layers, when the step was begun with a window: a query at
    /// position p sees the keys at positions p − window < k ≤ p.
    pub window_mask: Option<Tensor>,
    pub batch: usize,
    pub seq: usize,
    /// The flat indices (`b * seq + i`) of the real tokens, when some of the step's are padding.
    pub real: Option<Vec<usize>>,
}

impl KvCache {
    /// An empty cache for `n_layers` layers and `batch` sequences of up to `capacity` tokens.
    pub fn new(n_layers: usize, batch: usize, capacity: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            capacity: capacity.max(1),
            valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
        }
    }

    /// Number of cached slots (the same for every sequence).
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, |v| v.len())
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the keys and values cached so far, over every layer and sequence (what a step's
    /// attention reads, at most).
    pub fn bytes(&self) -> u64 {
        // A buffer's bytes per slot: all its dimensions but the slots' (the third).
        let slot = |t: &Tensor| t.dims().iter().enumerate().filter(|&(i, _)| i != 2).map(|(_, &d)| d).product::<usize>() * t.dtype().size_in_bytes();
        self.layers.iter().flatten().map(|(k, v)| ((slot(k) + slot(v)) * self.len()) as u64).sum()
    }

    /// The largest position any sequence has reached.
    pub fn max_position(&self) -> usize {
        self.next_pos.iter().copied().max().unwrap_or(0)
    }

    /// An independent copy (its buffers copied), to continue from the same point as this one.
    pub fn fork(&self) -> Result<Self> {
        let layers = self.layers.iter().map(|l| l.as_ref().map(|(k, v)| Ok((k.copy()?, v.copy()?))).transpose()).collect::<Result<_>>()?;
        Ok(Self { layers, capacity: self.capacity, valid: self.valid.clone(), next_pos: self.next_pos.clone() })
    }

    /// Forgets every slot from `len` on (their buffers are overwritten by the next steps).
    pub fn truncate(&mut self, len: usize) {
        for (valid, next) in self.valid.iter_mut().zip(&mut self.next_pos) {
            if len < valid.len() {
                *next -= valid[len..].iter().filter(|&&v| v).count();
                valid.truncate(len);
            }
        }
    }

    /// Registers `valid` (`[batch][seq]`, false = padding) as the next step and returns its
    /// positions and masks (`window`: also the mask of sliding-window layers).
    pub fn begin_step(&mut self, valid: &[Vec<bool>], window: Option<usize>, device: &Device) -> Result<Step> {
        let batch = valid.len();
        if batch != self.valid.len() {
            bail!("step has {batch} sequences, the cache {}", self.valid.len());
        }
        let seq = valid.first().map_or(0, |v| v.len());
        if seq == 0 || valid.iter().any(|v| v.len() != seq) {
            bail!("every sequence of a step needs the same, non-zero number of tokens");
        }
        let past = self.len();
        let total = past + seq;
        let mut positions = Vec::with_capacity(batch * seq);
        let mut mask = vec![f32::NEG_INFINITY; batch * seq * total];
        let mut window_mask = window.map(|_| vec![f32::NEG_INFINITY; batch * seq * total]);
        for (b, row) in valid.iter().enumerate() {
            for &is_real in row {
                if is_real {
                    positions.push(self.next_pos[b] as u32);
                    self.next_pos[b] += 1;
                } else {
                    positions.push(0);
                }
            }
            self.valid[b].extend_from_slice(row);
            for i in 0..seq {
                let q = past + i;
                let base = (b * seq + i) * total;
                for k in 0..=q {
                    if self.valid[b][k] || k == q {
                        mask[base + k] = 0.0;
                    }
                }
            }
            if let (Some(w), Some(wm)) = (window, window_mask.as_mut()) {
                // Each slot's position: the number of real tokens before it.
                let slot_pos: Vec<usize> = self.valid[b]
                    .iter()
                    .scan(0, |n, &v| {
                        let p = *n;
                        *n += v as usize;
                        Some(p)
                    })
                    .collect();
                for i in 0..seq {
                    let q = past + i;
                    let base = (b * seq + i) * total;
                    for k in 0..=q {
                        // A padding query keeps the causal row (its output is never used).
                        let in_window = !self.valid[b][q] || slot_pos[k] + w > slot_pos[q];
                        if mask[base + k] == 0.0 && in_window {
                            wm[base + k] = 0.0;
                        }
                    }
                }
            }
        }
        let shape = (batch, 1, seq, total);
        let real: Vec<usize> = valid.iter().flatten().enumerate().filter(|(_, &v)| v).map(|(i, _)| i).collect();
        Ok(Step {
            positions: Tensor::from_vec(positions, batch * seq, device)?,
            mask: Tensor::from_vec(mask, shape, device)?,
            window_mask: window_mask.map(|m| Tensor::from_vec(m, shape, device)).transpose()?,
            batch,
            seq,
            real: (real.len() < batch * seq).then_some(real),
        })
    }

    /// Writes this step's keys and values `[batch, kv_heads, seq, head_dim]` for `layer` (called
    /// after [`KvCache::begin_step`]) and returns views of all cached keys and values.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (b, kv_h, t, hd) = k.dims4()?;
        let total = self.len();
        let past = total - t;
        let buffers = match self.layers[layer].take() {
            Some((bk, bv)) if bk.dim(2)? >= total => (bk, bv),
            old => {
                while self.capacity < total {
                    self.capacity *= 2;
                }
                let alloc = || Tensor::zeros((b, kv_h, self.capacity, hd), DType::F32, k.device());
                let (bk, bv) = (alloc()?, alloc()?);
                if let Some((ok, ov)) = old {
                    bk.slice_set(&ok.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                    bv.slice_set(&ov.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                }
                (bk, bv)
            }
        };
        buffers.0.slice_set(&k.to_dtype(DType::F32)?.contiguous()?, 2, past)?;
        buffers.1.slice_set(&v.to_dtype(DType::F32)?.contiguous()?, 2, past)?;
        let views = (buffers.0.narrow(2, 0, total)?, buffers.1.narrow(2, 0, total)?);
        self.layers[layer] = Some(buffers);
        Ok(views)
    }
}

/// How attention scores are formed from `q · k`: `s = scale · (q · k)`, then, with a soft cap
/// `c`, `s = c · tanh(s / c)` (Gemma-2), before the mask and the softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl Scores {
    /// The usual `1 / sqrt(head_dim)`, no soft cap.
    pub fn standard(head_dim: usize) -> Self {
        Self { scale: 1.0 / (head_dim as f32).sqrt(), softcap: None }
    }

    #[inline(always)]
    fn apply(self, dot: f32) -> f32 {
        let s = dot * self.scale;
        match self.softcap {
            Some(c) => c * (s / c).tanh(),
            None => s,
        }
    }
}

/// Softmax attention: `q [b, h, t, hd]`, cached `k`, `v` `[b, kv_h, T, hd]`, grouped-query when
/// `kv_h < h`; `mask [b, 1, t, T]` is 0 where a query may look and -inf elsewhere. Returns
/// `[b, t, h * hd]`. On the CPU one fused pass per (sequence, head); elsewhere tensor ops.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scores: Scores) -> Result<Tensor> {
    if q.device().is_cpu() {
        return cpu::attend(q, k, v, mask, scores);
    }
    let (b, h, t, hd) = q.dims4()?;
    let kv_h = k.dim(1)?;
    let total = k.dim(2)?;
    let group = h / kv_h;
    // Grouped-query attention without copying keys: fold the heads that share a key/value head
    // into the query's sequence dimension.
    let q = q.reshape((b, kv_h, group * t, hd))?;
    let opts = scores;
    let scores = (q.matmul(&k.t()?)? * opts.scale as f64)?;
    let scores = match opts.softcap {
        Some(c) => ((scores / c as f64)?.tanh()? * c as f64)?,
        None => scores,
    };
    let scores = scores.reshape((b, kv_h, group, t, total))?;
    let mask = mask.unsqueeze(1)?; // [b, 1, 1, t, T]
    let scores = scores.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.reshape((b, kv_h, group * t, total))?)?;
    let out = probs.matmul(v)?; // [b, kv_h, group*t, hd]
    out.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b, t, h * hd))
        .map_err(Into::into)
}

/// Attention on the CPU without intermediate tensors: for each sequence and query head, the
/// scores against every visible cached key, their softmax (f32) and the weighted sum of values,
/// written straight into the `[b, t, h * hd]` output. Vectorised with AVX-512 or AVX2 when the
/// processor has them.
mod cpu {
    use anyhow::{bail, Result};
    use candle_core::{Device, Storage, Tensor};
    use rayon::prelude::*;

    use super::Scores;
    use crate::model::matmul::{Isa, SendPtr};
    use crate::model::pointwise::softmax_exp;

    /// A CPU f32 tensor's data from its start offset, with its strides.
    fn view(t: &Tensor) -> Result<(impl std::ops::Deref<Target = Storage> + '_, usize, Vec<usize>)> {
        let (storage, layout) = t.storage_and_layout();
        if !matches!(&*storage, Storage::Cpu(_)) || t.dtype() != candle_core::DType::F32 {
            bail!("CPU attention needs f32 tensors on the CPU");
        }
        Ok((storage, layout.start_offset(), layout.stride().to_vec()))
    }

    fn slice(storage: &Storage) -> Result<&[f32]> {
        match storage {
            Storage::Cpu(c) => Ok(c.as_slice::<f32>()?),
            _ => bail!("CPU attention needs tensors on the CPU"),
        }
    }

    /// Shapes and strides of one call.
    #[derive(Clone, Copy)]
    struct Dims {
        h: usize,
        kv_h: usize,
        t: usize,
        total: usize,
        hd: usize,
        scores: Scores,
        /// The instruction set the softmax's exponentials use.
        isa: Isa,
        /// Strides of k and v over sequences and heads (their rows are `hd` apart).
        k_seq: usize,
        k_head: usize,
        v_seq: usize,
        v_head: usize,
    }

    /// The data of one call: queries, keys, values and mask from their start offsets, and each
    /// query's visible keys `lo..hi` (by sequence, then query).
    #[derive(Clone, Copy)]
    struct Inputs<'a> {
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
        mask: &'a [f32],
        visible: &'a [(usize, usize)],
    }

    pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scores: Scores) -> Result<Tensor> {
        let q = q.contiguous()?;
        let mask = mask.contiguous()?;
        let (b, h, t, hd) = q.dims4()?;
        let (_, kv_h, total, _) = k.dims4()?;
        let (qs, qo, _) = view(&q)?;
        let (ks, ko, kst) = view(k)?;
        let (vs, vo, vst) = view(v)?;
        let (ms, mo, _) = view(&mask)?;
        if kst[2] != hd || kst[3] != 1 || vst[2] != hd || vst[3] != 1 || h % kv_h != 0 {
            bail!("CPU attention: keys and values must have contiguous rows");
        }
        let isa = Isa::detected();
        let d = Dims { h, kv_h, t, total, hd, scores, isa, k_seq: kst[0], k_head: kst[1], v_seq: vst[0], v_head: vst[1] };
        let (qv, kv, vv, mv) = (&slice(&qs)?[qo..], &slice(&ks)?[ko..], &slice(&vs)?[vo..], &slice(&ms)?[mo..]);
        // Each query's visible keys lie in lo..hi (a query always sees itself): found once for
        // all the heads, in parallel for a long prefill's mask.
        let visible: Vec<(usize, usize)> = if total == 0 {
            vec![(0, 0); b * t]
        } else {
            mv[..b * t * total]
                .par_chunks(total)
                .with_min_len((1 << 16) / total + 1)
                .map(|m| {
                    let lo = m.iter().position(|&m| m != f32::NEG_INFINITY).unwrap_or(0);
                    (lo, m.iter().rposition(|&m| m != f32::NEG_INFINITY).map_or(0, |j| j + 1))
                })
                .collect()
        };
        let x = Inputs { q: qv, k: kv, v: vv, mask: mv, visible: &visible };
        let mut out = vec![0f32; b * t * h * hd];
        let optr = SendPtr(out.as_mut_ptr());
        (0..b * h).into_par_iter().for_each(|bh| {
            // SAFETY: task (sequence, head) writes only the `hd` outputs of its head at each of
            // its queries; the instruction set was detected on this processor.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => head_avx512(bh, d, x, optr.get()),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => head_avx2(bh, d, x, optr.get()),
                    _ => head(bh, d, x, optr.get()),
                }
            }
        });
        Ok(Tensor::from_vec(out, (b, t, h * hd), &Device::Cpu)?)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    unsafe fn head_avx512(bh: usize, d: Dims, x: Inputs, out: *mut f32) {
        head(bh, d, x, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn head_avx2(bh: usize, d: Dims, x: Inputs, out: *mut f32) {
        head(bh, d, x, out)
    }

    /// Sixteen independent partial sums, so the compiler vectorises the dot product.
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0f32; 16];
        let mut ca = a.chunks_exact(16);
        let mut cb = b.chunks_exact(16);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..16 {
                lanes[l] = x[l].mul_add(y[l], lanes[l]);
            }
        }
        let mut s: f32 = lanes.iter().sum();
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            s += x * y;
        }
        s
    }

    /// Rows ahead of the one being read that are fetched meanwhile (the rows of a head are
    /// contiguous, but cross a page every 16 rows of 64, where the hardware prefetcher stops;
    /// 16 read a decode step's cache 10-20% faster than 8 at batch 8 and 32).
    const AHEAD: usize = 16;

    /// Asks for the cache lines of `data[at..at + len]` (nothing past the slice's end).
    #[inline(always)]
    fn prefetch_row(data: &[f32], at: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        if len > 0 && at + len <= data.len() {
            // SAFETY: a prefetch reads nothing architecturally; the addresses lie in `data`.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                let p = data.as_ptr().add(at) as *const i8;
                for line in (0..len * 4).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(line));
                }
                // The row's last line, when the row does not start on a line.
                _mm_prefetch::<_MM_HINT_T0>(p.add(len * 4 - 1));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (data, at, len);
    }

    /// Keys per block of scores in the transposed path.
    const KEYS: usize = 16;
    /// Outputs per block of the weighted sum of values: four vectors of sixteen, four
    /// independent chains of multiply-adds.
    const OUTS: usize = 64;
    /// Queries from which a step transposes its keys (below, transposing would cost about as
    /// much as the scores; both paths give the same scores, bit for bit).
    const TRANSPOSE_FROM: usize = 8;

    /// The scores `q · k` of `KEYS` keys (`kt` holds component c of the keys at `c * ld`), summed
    /// exactly as [`dot`] sums each: sixteen lanes (lane l takes components l, l + 16, ...) as
    /// chains of multiply-adds, the lanes added in order, then the tail unfused.
    #[inline(always)]
    fn dot_keys(q: &[f32], kt: &[f32], ld: usize) -> [f32; KEYS] {
        let mut lanes = [[0f32; KEYS]; 16];
        let full = q.len() / 16 * 16;
        for c0 in (0..full).step_by(16) {
            for (l, lane) in lanes.iter_mut().enumerate() {
                let qc = q[c0 + l];
                for (a, &kv) in lane.iter_mut().zip(&kt[(c0 + l) * ld..][..KEYS]) {
                    *a = qc.mul_add(kv, *a);
                }
            }
        }
        let mut s = lanes[0];
        for lane in &lanes[1..] {
            for (s, &a) in s.iter_mut().zip(lane) {
                *s += a;
            }
        }
        for (c, &qc) in q.iter().enumerate().skip(full) {
            for (s, &kv) in s.iter_mut().zip(&kt[c * ld..][..KEYS]) {
                *s += qc * kv;
            }
        }
        s
    }

    /// Queries whose scores the AVX-512 path sums together (each vector of keys loaded once for
    /// all of them).
    const QUERIES: usize = 4;

    /// [`dot_keys`] for `QUERIES` queries at once with AVX-512, each summed exactly as it sums
    /// one: the sixteen lanes four at a time (sixteen vectors of sums in registers), each lane's
    /// multiply-adds in order, the lanes added in order, then the tail unfused.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_keys4_avx512(q: [&[f32]; QUERIES], kt: &[f32], ld: usize) -> [[f32; KEYS]; QUERIES] {
        use std::arch::x86_64::*;
        let hd = q[0].len();
        let full = hd / 16 * 16;
        assert!(q.iter().all(|q| q.len() == hd) && kt.len() >= (hd - 1) * ld + KEYS, "dot_keys4: slices too short");
        let mut s = [_mm512_setzero_ps(); QUERIES];
        for l0 in (0..16).step_by(4) {
            let mut lanes = [[_mm512_setzero_ps(); 4]; QUERIES];
            for c0 in (0..full).step_by(16) {
                for l in 0..4 {
                    let c = c0 + l0 + l;
                    let keys = _mm512_loadu_ps(kt.as_ptr().add(c * ld));
                    for (lanes, q) in lanes.iter_mut().zip(&q) {
                        lanes[l] = _mm512_fmadd_ps(_mm512_set1_ps(*q.get_unchecked(c)), keys, lanes[l]);
                    }
                }
            }
            for (s, lanes) in s.iter_mut().zip(&lanes) {
                for (l, &lane) in lanes.iter().enumerate() {
                    *s = if l0 + l == 0 { lane } else { _mm512_add_ps(*s, lane) };
                }
            }
        }
        for c in full..hd {
            let keys = _mm512_loadu_ps(kt.as_ptr().add(c * ld));
            for (s, q) in s.iter_mut().zip(&q) {
                *s = _mm512_add_ps(*s, _mm512_mul_ps(_mm512_set1_ps(q[c]), keys));
            }
        }
        s.map(|v| std::mem::transmute::<__m512, [f32; KEYS]>(v))
    }

    /// One sequence and query head, every query of the step. With many queries (a prefill), the
    /// keys are first transposed to `[hd][total]`, so that the scores are summed 16 keys at a
    /// time without horizontal sums (for four queries at once with AVX-512); with few (a decode
    /// step), each key row is read once, as it lies in the cache. Both sum a score in the same
    /// order, so a query gets the same output whichever path runs it.
    #[inline(always)]
    unsafe fn head(bh: usize, d: Dims, x: Inputs, out: *mut f32) {
        let Inputs { q, k, v, mask, visible } = x;
        let (bi, head) = (bh / d.h, bh % d.h);
        let kvh = head / (d.h / d.kv_h);
        let (kbase, vbase) = (bi * d.k_seq + kvh * d.k_head, bi * d.v_seq + kvh * d.v_head);
        let ld = d.total.next_multiple_of(KEYS);
        let kt = (d.t >= TRANSPOSE_FROM).then(|| {
            let mut kt = vec![0f32; d.hd * ld];
            for j in 0..d.total {
                for (c, &x) in k[kbase + j * d.hd..][..d.hd].iter().enumerate() {
                    kt[c * ld + j] = x;
                }
            }
            kt
        });
        // The scores of up to QUERIES queries at a time.
        let mut ps = vec![f32::NEG_INFINITY; QUERIES * ld];
        let qrow = |i: usize| &q[((bi * d.h + head) * d.t + i) * d.hd..][..d.hd];
        let mrow = |i: usize| &mask[(bi * d.t + i) * d.total..][..d.total];
        let range = |i: usize| visible[bi * d.t + i];
        let score = |i: usize, j: usize, dot: f32| match mrow(i)[j] {
            f32::NEG_INFINITY => f32::NEG_INFINITY,
            m => d.scores.apply(dot) + m,
        };
        for i0 in (0..d.t).step_by(QUERIES) {
            let nq = QUERIES.min(d.t - i0);
            let ranges: [(usize, usize); QUERIES] = std::array::from_fn(|qi| if qi < nq { range(i0 + qi) } else { (0, 0) });
            // The keys any query of the group sees.
            let (lo, hi) = (ranges[..nq].iter().map(|r| r.0).min().unwrap_or(0), ranges[..nq].iter().map(|r| r.1).max().unwrap_or(0));
            match &kt {
                Some(kt) => {
                    // Each query keeps the scores of its visible keys (a short group repeats its
                    // last query in the four-query kernel).
                    let rows: [&[f32]; QUERIES] = std::array::from_fn(|qi| qrow(i0 + qi.min(nq - 1)));
                    for j0 in (lo / KEYS * KEYS..hi).step_by(KEYS) {
                        let dots = match d.isa {
                            // SAFETY: AVX-512 was detected; kt holds hd rows of ld ≥ j0 + KEYS.
                            #[cfg(target_arch = "x86_64")]
                            Isa::Avx512 => dot_keys4_avx512(rows, &kt[j0..], ld),
                            _ => std::array::from_fn(|qi| if qi < nq { dot_keys(rows[qi], &kt[j0..], ld) } else { [0.0; KEYS] }),
                        };
                        for (qi, &(qlo, qhi)) in ranges[..nq].iter().enumerate() {
                            let (a, b) = (j0.max(qlo), (j0 + KEYS).min(qhi));
                            match (d.isa, d.scores.softcap) {
                                // SAFETY: AVX-512 was detected; keys a..b lie within the mask row
                                // (b ≤ qhi ≤ total) and within ps's row (b ≤ ld).
                                #[cfg(target_arch = "x86_64")]
                                (Isa::Avx512, None) if a < b => scores16_avx512(&dots[qi], &mrow(i0 + qi)[j0..b], d.scores.scale, a - j0, &mut ps[qi * ld + j0..qi * ld + b]),
                                _ => {
                                    for j in a..b {
                                        ps[qi * ld + j] = score(i0 + qi, j, dots[qi][j - j0]);
                                    }
                                }
                            }
                        }
                    }
                }
                None => {
                    // Each key's value is fetched along with it, for the weighted sum that
                    // follows: two streams from memory at once instead of one after the other,
                    // both asked for from their first row.
                    let fetch = |j: usize| {
                        prefetch_row(k, kbase + j * d.hd, d.hd);
                        prefetch_row(v, vbase + j * d.hd, d.hd);
                    };
                    for (qi, &(lo, hi)) in ranges[..nq].iter().enumerate() {
                        let m = mrow(i0 + qi);
                        (lo..(lo + AHEAD).min(hi)).for_each(fetch);
                        for j in lo..hi {
                            if m.get(j + AHEAD).is_some_and(|&m| m != f32::NEG_INFINITY) {
                                fetch(j + AHEAD);
                            }
                            ps[qi * ld + j] = score(i0 + qi, j, dot(qrow(i0 + qi), &k[kbase + j * d.hd..][..d.hd]));
                        }
                    }
                }
            }
            // Each query's softmax, then the values weighted by it, OUTS outputs at a time: with
            // AVX-512 and many queries (a prefill), a whole block for the group's queries at
            // once, each row of values loaded once for all of them.
            let inv: [f32; QUERIES] = std::array::from_fn(|qi| if qi < nq { softmax_weights(d, &mut ps[qi * ld..][..ld], ranges[qi]) } else { 0.0 });
            let outs: [*mut f32; QUERIES] = std::array::from_fn(|qi| out.wrapping_add(((bi * d.t + i0 + qi) * d.h + head) * d.hd));
            for c0 in (0..d.hd).step_by(OUTS) {
                match d.isa {
                    // SAFETY: AVX-512 was detected; each query's outputs (hd of them, from outs[qi])
                    // are its own, and c0 + OUTS ≤ hd.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 if kt.is_some() && c0 + OUTS <= d.hd => weighted_block4_avx512::<{ OUTS / 16 }>(d, v, vbase, &ranges[..nq], (lo, hi), &ps, ld, &inv, c0, &outs, u16::MAX),
                    // A narrow head's whole block (8, 16 or 32 wide) likewise.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 if kt.is_some() && c0 == 0 && matches!(d.hd, 8 | 16) => weighted_block4_avx512::<1>(d, v, vbase, &ranges[..nq], (lo, hi), &ps, ld, &inv, c0, &outs, ((1u32 << d.hd) - 1) as u16),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 if kt.is_some() && c0 == 0 && d.hd == 32 => weighted_block4_avx512::<2>(d, v, vbase, &ranges[..nq], (lo, hi), &ps, ld, &inv, c0, &outs, u16::MAX),
                    _ => {
                        // A decode step fetched the values with the keys; a prefill fetches them here.
                        for (qi, &range) in ranges[..nq].iter().enumerate() {
                            let fetch = kt.is_some().then(|| mrow(i0 + qi));
                            weighted_block(d, v, vbase, fetch, range, &ps[qi * ld..][..ld], inv[qi], c0, outs[qi]);
                        }
                    }
                }
            }
        }
    }

    /// The scores `scale · dot + mask` (−∞ where the mask is) of keys `from..` of a block of
    /// [`KEYS`], as `score` forms them one at a time without a soft cap: `mask` and `out` hold
    /// the block's keys up to the last one written.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores16_avx512(dots: &[f32; KEYS], mask: &[f32], scale: f32, from: usize, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let to = mask.len().min(out.len());
        assert!(from < to && to <= KEYS, "scores16: keys {from}..{to} outside a block");
        let lanes = (((1u32 << to) - 1) & !((1u32 << from) - 1)) as u16;
        let m = _mm512_maskz_loadu_ps(lanes, mask.as_ptr());
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let s = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(dots.as_ptr()), _mm512_set1_ps(scale)), m);
        let s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m, ninf), s, ninf);
        _mm512_mask_storeu_ps(out.as_mut_ptr(), lanes, s);
    }

    /// A query's softmax: its scores `p[lo..hi]` (masked ones −∞) replaced by their
    /// exponentials; returns the reciprocal of their sum, by which each is weighted.
    #[inline(always)]
    fn softmax_weights(d: Dims, p: &mut [f32], (lo, hi): (usize, usize)) -> f32 {
        let max = p[lo..hi].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        1.0 / softmax_exp(d.isa, &mut p[lo..hi], max)
    }

    /// A query's outputs `out[c0..c0 + OUTS]` (fewer in a narrower last block): the sum of its
    /// visible values weighted by `p[j] · inv`, in the order of the keys. With `fetch` (the
    /// query's mask row), the value rows ahead are asked for meanwhile.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn weighted_block(d: Dims, v: &[f32], vbase: usize, fetch: Option<&[f32]>, range: (usize, usize), p: &[f32], inv: f32, c0: usize, out: *mut f32) {
        // A block of a width known here keeps its sums in registers (a narrow head's, 8 to 32
        // wide, as much as a whole block); any other width sums in memory.
        let width = OUTS.min(d.hd - c0);
        let sums = match width {
            OUTS => weighted_sums::<OUTS>(d, v, vbase, fetch, range, p, inv, c0, OUTS),
            32 => weighted_sums::<32>(d, v, vbase, fetch, range, p, inv, c0, 32),
            16 => weighted_sums::<16>(d, v, vbase, fetch, range, p, inv, c0, 16),
            8 => weighted_sums::<8>(d, v, vbase, fetch, range, p, inv, c0, 8),
            _ => weighted_sums::<OUTS>(d, v, vbase, fetch, range, p, inv, c0, width),
        };
        std::slice::from_raw_parts_mut(out.add(c0), width).copy_from_slice(&sums[..width]);
    }

    /// [`weighted_block`]'s sums of the first `width` (at most `W`) outputs from `c0`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn weighted_sums<const W: usize>(d: Dims, v: &[f32], vbase: usize, fetch: Option<&[f32]>, (lo, hi): (usize, usize), p: &[f32], inv: f32, c0: usize, width: usize) -> [f32; OUTS] {
        let mut acc = [0f32; W];
        for j in (lo..hi).filter(|&j| p[j] != 0.0) {
            if c0 == 0 && fetch.is_some_and(|m| m.get(j + AHEAD).is_some_and(|&m| m != f32::NEG_INFINITY)) {
                prefetch_row(v, vbase + (j + AHEAD) * d.hd, d.hd);
            }
            let w = p[j] * inv;
            for (a, &x) in acc.iter_mut().zip(&v[vbase + j * d.hd + c0..][..width]) {
                *a = w.mul_add(x, *a);
            }
        }
        let mut sums = [0f32; OUTS];
        sums[..W].copy_from_slice(&acc);
        sums
    }

    /// [`weighted_block`] of a block of `V` vectors of outputs from `c0` (the last one's lanes
    /// `last`: 0xff for a head 8 wide) for the queries of `ranges` (at most `QUERIES`, seeing
    /// keys within `lo..hi` together; their weights are rows of `p`, `ld` apart) with AVX-512:
    /// each row of values is loaded once for all of them, and each query's sums take exactly the
    /// multiply-adds, in the same order, that it takes alone.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_block4_avx512<const V: usize>(d: Dims, v: &[f32], vbase: usize, ranges: &[(usize, usize)], (lo, hi): (usize, usize), p: &[f32], ld: usize, inv: &[f32; QUERIES], c0: usize, outs: &[*mut f32; QUERIES], last: u16) {
        use std::arch::x86_64::*;
        let lanes = |c: usize| if c + 1 == V { last } else { u16::MAX };
        let width = 16 * (V - 1) + last.count_ones() as usize;
        let mut acc = [[_mm512_setzero_ps(); V]; QUERIES];
        for j in lo..hi {
            if c0 == 0 && j + AHEAD < hi {
                prefetch_row(v, vbase + (j + AHEAD) * d.hd, d.hd);
            }
            let row = v[vbase + j * d.hd + c0..][..width].as_ptr();
            let vals: [__m512; V] = std::array::from_fn(|c| _mm512_maskz_loadu_ps(lanes(c), row.add(16 * c)));
            for (qi, (acc, &(qlo, qhi))) in acc.iter_mut().zip(ranges).enumerate() {
                let w = p[qi * ld + j];
                // Only the query's visible keys (its row of p holds others' leftovers outside
                // qlo..qhi), and as alone, none whose weight is 0.
                if (qlo..qhi).contains(&j) && w != 0.0 {
                    let w = _mm512_set1_ps(w * inv[qi]);
                    for (a, &x) in acc.iter_mut().zip(&vals) {
                        *a = _mm512_fmadd_ps(w, x, *a);
                    }
                }
            }
        }
        for (acc, &out) in acc.iter().zip(outs).take(ranges.len()) {
            for (c, &a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(out.add(c0 + 16 * c), lanes(c), a);
            }
        }
    }
}

/// Normalizes `x` and passes the scale and the normalized value through their hook points;
/// returns the (possibly rewritten) normalized value.
pub fn hooked_norm(hooks: &mut Hooks, x: &Tensor, eps: f64, center: bool, scale_at: HookPoint, normalized_at: HookPoint) -> Result<Tensor> {
    let (normalized, scale) = normalize(x, eps, center)?;
    hooks.visit(scale_at, scale)?;
    hooks.visit(normalized_at, normalized)
}

/// Rotary `cos` / `sin` tables `[n_positions, head_dim / 2]` for base `theta`, with Llama-3
/// frequency scaling when given.
pub fn rotary_tables(
    head_dim: usize,
    theta: f64,
    n_positions: usize,
    scaling: Option<&Llama3RopeScaling>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let freq = match scaling {
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
                        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * freq / s.factor + smooth * freq
                    }
                }
            };
            freq as f32
        })
        .collect();
    let n = n_positions;
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?.reshape((n, 1))?;
    let angles = pos.broadcast_mul(&inv_freq)?;
    Ok((angles.cos()?.contiguous()?, angles.sin()?.contiguous()?))
}

/// Keeps every position, or only the last one, of `x [batch, seq, d]`.
pub fn select_positions(x: Tensor, at: LogitsAt) -> Result<Tensor> {
    Ok(match at {
        LogitsAt::All => x,
        LogitsAt::Last => {
            let t = x.dim(1)?;
            x.narrow(1, t - 1, 1)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which keys each query of sequence `b` may see, from a `[batch, 1, seq, total]` mask.
    fn visible(mask: &Tensor, b: usize) -> Vec<Vec<usize>> {
        let rows: Vec<Vec<f32>> = mask.get(b).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        rows.iter().map(|r| r.iter().enumerate().filter(|(_, &m)| m == 0.0).map(|(k, _)| k).collect()).collect()
    }

    /// The window counts positions, not slots: a left-padded sequence sees the same keys as
    /// one without padding, in the prefill and in cached steps.
    #[test]
    fn sliding_window_over_positions_with_padding_and_cache() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1, 2, 8);
        // Sequence 0: 4 real tokens; sequence 1: 2 padding slots, then 2 real tokens.
        let valid = vec![vec![true; 4], vec![false, false, true, true]];
        let step = cache.begin_step(&valid, Some(2), &dev).unwrap();
        let w = step.window_mask.as_ref().unwrap();
        assert_eq!(visible(w, 0), vec![vec![0], vec![0, 1], vec![1, 2], vec![2, 3]]);
        assert_eq!(visible(w, 1), vec![vec![0], vec![1], vec![2], vec![2, 3]]);
        assert_eq!(visible(&step.mask, 0)[3], vec![0, 1, 2, 3]);
        // One cached step: sequence 1 is at position 2, slot 4.
        let step = cache.begin_step(&[vec![true], vec![true]], Some(2), &dev).unwrap();
        let w = step.window_mask.unwrap();
        assert_eq!(visible(&w, 0), vec![vec![3, 4]]);
        assert_eq!(visible(&w, 1), vec![vec![3, 4]]);
        assert_eq!(visible(&step.mask, 1), vec![vec![2, 3, 4]]);
        let no_window = cache.begin_step(&[vec![true], vec![true]], None, &dev).unwrap();
        assert!(no_window.window_mask.is_none());
    }

    /// A fork goes on alone: what it appends leaves the original untouched, and the other way
    /// round.
    #[test]
    fn forked_cache_is_independent() {
        let dev = Device::Cpu;
        let kv = |v: f32, t: usize| Tensor::full(v, (1, 1, t, 2), &dev).unwrap();
        let mut a = KvCache::new(1, 1, 8);
        a.begin_step(&[vec![true; 2]], None, &dev).unwrap();
        a.append(0, kv(1.0, 2), kv(1.0, 2)).unwrap();
        let mut b = a.fork().unwrap();
        b.begin_step(&[vec![true]], None, &dev).unwrap();
        let (kb, vb) = b.append(0, kv(2.0, 1), kv(2.0, 1)).unwrap();
        a.begin_step(&[vec![true]], None, &dev).unwrap();
        let (ka, va) = a.append(0, kv(3.0, 1), kv(3.0, 1)).unwrap();
        let slots = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(slots(&kb), [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]);
        assert_eq!(slots(&vb), [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]);
        assert_eq!(slots(&ka), [1.0, 1.0, 1.0, 1.0, 3.0, 3.0]);
        assert_eq!(slots(&va), [1.0, 1.0, 1.0, 1.0, 3.0, 3.0]);
    }

    /// The cache's bytes count the slots in use, not its capacity, over layers, sequences, heads,
    /// keys and values, also once it has grown.
    #[test]
    fn cache_bytes_count_the_slots_in_use() {
        let dev = Device::Cpu;
        let (layers, b, kv_h, hd) = (2, 2, 3, 4);
        let mut cache = KvCache::new(layers, b, 8);
        assert_eq!(cache.bytes(), 0);
        for (t, total) in [(5usize, 5u64), (4, 9)] {
            cache.begin_step(&vec![vec![true; t]; b], None, &dev).unwrap();
            for l in 0..layers {
                let kv = || Tensor::zeros((b, kv_h, t, hd), DType::F32, &dev).unwrap();
                cache.append(l, kv(), kv()).unwrap();
            }
            assert_eq!(cache.bytes(), (layers * 2 * b * kv_h * hd * 4) as u64 * total);
        }
    }

    /// The fused CPU attention and the tensor-op path agree, with a scale and a soft cap.
    #[test]
    fn softcapped_scores_match_tensor_ops() {
        let dev = Device::Cpu;
        let q = (Tensor::randn(0f32, 1.0, (1, 4, 3, 8), &dev).unwrap() * 4.0).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &dev).unwrap();
        let mut cache = KvCache::new(1, 1, 3);
        let mask = cache.begin_step(&[vec![true; 3]], None, &dev).unwrap().mask;
        let scores = Scores { scale: 0.3, softcap: Some(2.0) };
        let fused = attend(&q, &k, &v, &mask, scores).unwrap();
        // Reference: repeat kv heads, cap, mask, softmax.
        let kr = Tensor::cat(&[k.narrow(1, 0, 1).unwrap(), k.narrow(1, 0, 1).unwrap(), k.narrow(1, 1, 1).unwrap(), k.narrow(1, 1, 1).unwrap()], 1).unwrap();
        let vr = Tensor::cat(&[v.narrow(1, 0, 1).unwrap(), v.narrow(1, 0, 1).unwrap(), v.narrow(1, 1, 1).unwrap(), v.narrow(1, 1, 1).unwrap()], 1).unwrap();
        let s = (q.matmul(&kr.t().unwrap()).unwrap() * 0.3).unwrap();
        let s = ((s / 2.0).unwrap().tanh().unwrap() * 2.0).unwrap().broadcast_add(&mask).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        let want = p.matmul(&vr).unwrap().transpose(1, 2).unwrap().reshape((1, 3, 32)).unwrap();
        let diff = (fused - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    /// Softmax attention by tensor ops, key and value heads repeated for grouped queries.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scores: Scores) -> Tensor {
        let (b, h, t, hd) = q.dims4().unwrap();
        let kv_h = k.dim(1).unwrap();
        let repeat = |x: &Tensor| {
            let heads: Vec<Tensor> = (0..h).map(|i| x.narrow(1, i / (h / kv_h), 1).unwrap()).collect();
            Tensor::cat(&heads, 1).unwrap().contiguous().unwrap()
        };
        let s = (q.matmul(&repeat(k).t().unwrap()).unwrap() * scores.scale as f64).unwrap();
        let s = match scores.softcap {
            Some(c) => ((s / c as f64).unwrap().tanh().unwrap() * c as f64).unwrap(),
            None => s,
        };
        let p = candle_nn::ops::softmax_last_dim(&s.broadcast_add(mask).unwrap()).unwrap();
        p.matmul(&repeat(v)).unwrap().transpose(1, 2).unwrap().reshape((b, t, h * hd)).unwrap()
    }

    /// The fused CPU attention against tensor ops through a cache: a left-padded prefill, a
    /// decode step with one sequence finished (a padding slot), a second multi-token step (whose
    /// visible keys then have a hole), another decode step; grouped queries, head widths with
    /// and without a tail (7, 8, 24, 32, 80, 130: the value sums' blocks of 8, 16, 32 and 64
    /// outputs, and others), key counts across several blocks. And each query of
    /// a multi-token step (keys transposed) gets bit for bit what it gets alone (a decode step).
    #[test]
    fn fused_attention_matches_tensor_ops_through_a_cache() {
        let dev = Device::Cpu;
        for (hd, softcap) in [(7, None), (8, None), (16, None), (24, Some(2.0)), (32, None), (80, None), (130, None)] {
            let scores = Scores { scale: 1.0 / (hd as f32).sqrt(), softcap };
            let (b, h, kv_h) = (2, 4, 2);
            let mut cache = KvCache::new(1, b, 8);
            let steps = [
                vec![[vec![false; 20], vec![true; 50]].concat(), vec![true; 70]],
                vec![vec![true], vec![false]],
                vec![vec![true; 70], vec![true; 70]],
                vec![vec![true], vec![true]],
            ];
            for valid in steps {
                let t = valid[0].len();
                let step = cache.begin_step(&valid, None, &dev).unwrap();
                let q = Tensor::randn(0f32, 1.0, (b, h, t, hd), &dev).unwrap();
                let k = Tensor::randn(0f32, 1.0, (b, kv_h, t, hd), &dev).unwrap();
                let v = Tensor::randn(0f32, 1.0, (b, kv_h, t, hd), &dev).unwrap();
                let (k, v) = cache.append(0, k, v).unwrap();
                let fused = attend(&q, &k, &v, &step.mask, scores).unwrap();
                let want = reference(&q, &k, &v, &step.mask, scores);
                let diff = (&fused - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-5, "hd {hd}, step of {t}: {diff}");
                for i in (0..t).step_by(7) {
                    let q1 = q.narrow(2, i, 1).unwrap();
                    let one = attend(&q1, &k, &v, &step.mask.narrow(2, i, 1).unwrap(), scores).unwrap();
                    let all: Vec<f32> = fused.narrow(1, i, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    assert!(all == one.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "hd {hd}, step of {t}: query {i} alone differs");
                }
            }
        }
    }

    /// Read throughput of decode attention at GPT-2-small's shapes, batch 1 and 32 (12 layers of
    /// distinct caches), inside the pool as a decode step runs it (not a timed test: it asserts
    /// nothing; run it with `cargo test --release --lib attention_throughput -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore]
    fn attention_throughput() {
        let dev = Device::Cpu;
        let (h, hd, layers) = (12, 64, 12);
        for (b, total) in [(1usize, 144usize), (8, 256), (32, 144), (32, 512)] {
            let mut cache = KvCache::new(layers, b, total);
            cache.begin_step(&vec![vec![true; total - 1]; b], None, &dev).unwrap();
            for l in 0..layers {
                let kv = || Tensor::randn(0f32, 1.0, (b, h, total - 1, hd), &dev).unwrap();
                cache.append(l, kv(), kv()).unwrap();
            }
            let step = cache.begin_step(&vec![vec![true]; b], None, &dev).unwrap();
            let views: Vec<(Tensor, Tensor)> = (0..layers)
                .map(|l| {
                    let kv = || Tensor::randn(0f32, 1.0, (b, h, 1, hd), &dev).unwrap();
                    cache.append(l, kv(), kv()).unwrap()
                })
                .collect();
            let q = Tensor::randn(0f32, 1.0, (b, h, 1, hd), &dev).unwrap();
            let mut best = f64::INFINITY;
            rayon::scope(|_| {
                for _ in 0..8 {
                    let t = std::time::Instant::now();
                    for (k, v) in &views {
                        attend(&q, k, v, &step.mask, Scores::standard(hd)).unwrap();
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
            });
            let bytes = (layers * 2 * b * h * total * hd * 4) as f64;
            println!("batch {b}, {total} positions: {:.3} ms, {:.1} GB/s", best * 1e3, bytes / best / 1e9);
        }
    }
}
