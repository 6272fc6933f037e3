//! Causal attention on the CPU as one kernel per block of queries, with its backward pass:
//! FlashAttention's scheme (no probabilities kept; the backward recomputes them), with each
//! block's scores over all the keys it may see held at once, so its softmax is the exact
//! two-pass one.
//!
//!   P = softmax(Q Kᵀ·s + causal mask), O = P V;
//!   dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O))·s, dQ = dS K, dK = dSᵀ Q.
//!
//! Why not candle's operations (model::attention composes them on other devices): each of its
//! batched products, scale, mask and softmax is one pass with its own allocation and thread
//! hand-off per head and block, and the custom op had to copy q, k and v to see them as
//! tensors. Measured at 8 heads × 2048 positions × 64 on 2 cores, that composition took 2.3×
//! PyTorch's scaled_dot_product_attention forward and backward. This kernel reads the op's
//! inputs where they are; the forward pass has one task per (row, head, block of queries), the
//! backward one per (row, head) (each accumulates its keys' gradients over its blocks), and
//! each task's products run on its own thread (the `gemm` crate that candle's CPU matmul calls,
//! without its threading). The scale must be positive (the softmax takes max(s·scale) as
//! max(s)·scale).
//!
//! Keys and values may have fewer heads than queries (grouped-query attention): query head h
//! reads key head h / (heads / kv_heads), and the keys' gradients are summed over each group.
//! The queries are the last `t` of the `keys` positions: query i sees keys 0..=keys − t + i.

use num_traits::Float;
use rayon::prelude::*;

/// Queries per task: a 64-row block's scores over 8192 keys are 2 MB in f32.
const BQ: usize = 64;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Queries per row.
    pub t: usize,
    /// Keys per row (≥ t: the queries are the last t positions).
    pub keys: usize,
    pub d: usize,
}

impl Dims {
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Offset of (row, query head)'s keys or values.
    fn kv_at(&self, bh: usize) -> usize {
        let (row, h) = (bh / self.heads, bh % self.heads);
        (row * self.kv_heads + h / self.rep()) * self.keys * self.d
    }
}

/// A matrix in a slice: (elements, row stride, column stride).
type Mat<'a, T> = (&'a [T], usize, usize);

/// dst (m × n, row stride `ld`) = lhs · rhs, or dst + lhs · rhs when `acc`; lhs is m × k and
/// rhs k × n. On the calling thread.
fn matmul<T: Elem>(
    dst: &mut [T],
    ld: usize,
    acc: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Every element the product touches is inside its slice.
    assert!(
        ld >= n && (m - 1) * ld + n <= dst.len(),
        "flash: dst out of range"
    );
    assert!(k > 0, "flash: empty inner dimension");
    assert!(
        (m - 1) * lhs.1 + (k - 1) * lhs.2 < lhs.0.len(),
        "flash: lhs out of range"
    );
    assert!(
        (k - 1) * rhs.1 + (n - 1) * rhs.2 < rhs.0.len(),
        "flash: rhs out of range"
    );
    // SAFETY: the asserts above keep every access inside the slices; dst does not alias the
    // inputs (it is a &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            acc,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// An element type of the kernel: f64 exactly, f32 with a vectorised exponential.
pub(crate) trait Elem: Float + Send + Sync + 'static {
    /// `row[..see]` (scores) into softmax(row·scale) in place.
    fn softmax(row: &mut [Self], scale: Self);
}

impl Elem for f64 {
    fn softmax(row: &mut [f64], scale: f64) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x * scale));
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x * scale - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

impl Elem for f32 {
    fn softmax(row: &mut [f32], scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { softmax32_avx2(row, scale) };
        }
        softmax32(row, scale)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn softmax32_avx2(row: &mut [f32], scale: f32) {
    softmax32(row, scale)
}

/// f32 softmax written so that the compiler vectorises it: the maximum by comparison, the
/// sum in eight lanes, and [`exp32`].
#[inline(always)]
fn softmax32(row: &mut [f32], scale: f32) {
    // scale > 0: max(x·scale) = max(x)·scale.
    let max = row
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
        * scale;
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (x, l) in c.iter_mut().zip(&mut lanes) {
            *x = exp32(*x * scale - max);
            *l += *x;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp32(*x * scale - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// eˣ in f32 (Cephes' expf: x = n·ln2 + r with |r| ≤ ln2/2, a degree-7 polynomial in r, times
/// 2ⁿ built in the exponent bits), within 2 ulp; below −87.3 it gives 2⁻¹²⁶·e^r (≈ 1e-38)
/// instead of underflowing, which a softmax's sum of at least 1 does not see.
#[inline(always)]
pub(crate) fn exp32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let x = x.clamp(-87.33654, 88.37626);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    e * f32::from_bits(((ni + 127) << 23) as u32)
}

/// Scores (n × m) into probabilities in place: row i sees its first `sees + i` entries (the
/// rest become 0), scaled by `scale`, softmax over them.
fn softmax_rows<T: Elem>(s: &mut [T], m: usize, sees: usize, scale: T) {
    for (i, row) in s.chunks_mut(m).enumerate() {
        let see = (sees + i).min(m);
        T::softmax(&mut row[..see], scale);
        row[see..].fill(T::zero());
    }
}

/// The keys queries q0..q0+n see: all up to the last one's position.
fn seen(x: &Dims, q0: usize, n: usize) -> usize {
    x.keys - x.t + q0 + n
}

/// P for queries q0..q0+n of one head (its queries `qh`, keys `kh`) into `p` (n × m, m the
/// keys the last of them sees).
fn probs<T: Elem>(p: &mut [T], (qh, kh): (&[T], &[T]), q0: usize, n: usize, x: &Dims, scale: T) {
    let (d, m) = (x.d, seen(x, q0, n));
    matmul(p, m, false, (n, m, d), (&qh[q0 * d..], d, 1), (kh, 1, d));
    softmax_rows(p, m, seen(x, q0, 1), scale);
}

/// O (b, heads, t, d) for q (b, heads, t, d), k and v (b, kv_heads, keys, d), contiguous.
pub(crate) fn forward<T: Elem>(q: &[T], k: &[T], v: &[T], x: Dims, scale: T) -> Vec<T> {
    let (t, d) = (x.t, x.d);
    let mut out = vec![T::zero(); x.b * x.heads * t * d];
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, oh)| {
        let qh = &q[bh * t * d..(bh + 1) * t * d];
        let at = x.kv_at(bh);
        let (kh, vh) = (&k[at..at + x.keys * d], &v[at..at + x.keys * d]);
        // Tasks reuse a scores buffer within each of rayon's split jobs.
        oh.par_chunks_mut(BQ * d)
            .enumerate()
            .for_each_init(Vec::new, |p, (blk, ob)| {
                let (q0, n) = (blk * BQ, ob.len() / d);
                let m = seen(&x, q0, n);
                p.resize(n * m, T::zero());
                probs(p, (qh, kh), q0, n, &x, scale);
                matmul(ob, d, false, (n, d, m), (p, m, 1), (vh, d, 1));
            });
    });
    out
}

/// Sums per-query-head key (or value) gradients (b, heads, keys, d) over each group of heads
/// that shares a key head: (b, kv_heads, keys, d).
fn group_sum<T: Float + Send + Sync>(g: Vec<T>, x: &Dims) -> Vec<T> {
    let rep = x.rep();
    if rep == 1 {
        return g;
    }
    let per = x.keys * x.d;
    let mut out = vec![T::zero(); x.b * x.kv_heads * per];
    out.par_chunks_mut(per).enumerate().for_each(|(bk, o)| {
        let (row, kh) = (bk / x.kv_heads, bk % x.kv_heads);
        for r in 0..rep {
            let h = row * x.heads + kh * rep + r;
            for (o, &v) in o.iter_mut().zip(&g[h * per..(h + 1) * per]) {
                *o = *o + v;
            }
        }
    });
    out
}

/// (dq, dk, dv) for the forward's inputs, its output `o` and the output's gradient `go`.
pub(crate) fn backward<T: Elem>(
    (q, k, v): (&[T], &[T], &[T]),
    o: &[T],
    go: &[T],
    x: Dims,
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, d, keys) = (x.t, x.d, x.keys);
    let mut dq = vec![T::zero(); x.b * x.heads * t * d];
    // Each query head's own keys' and values' gradients (its task accumulates them over its
    // blocks of queries), summed per group at the end.
    let mut dk = vec![T::zero(); x.b * x.heads * keys * d];
    let mut dv = vec![T::zero(); x.b * x.heads * keys * d];
    dq.par_chunks_mut(t * d)
        .zip(dk.par_chunks_mut(keys * d))
        .zip(dv.par_chunks_mut(keys * d))
        .enumerate()
        .for_each(|(bh, ((dqh, dkh), dvh))| {
            let span = bh * t * d..(bh + 1) * t * d;
            let (qh, oh, goh) = (&q[span.clone()], &o[span.clone()], &go[span]);
            let at = x.kv_at(bh);
            let (kh, vh) = (&k[at..at + keys * d], &v[at..at + keys * d]);
            let mut p = Vec::new();
            let mut ds = Vec::new();
            for q0 in (0..t).step_by(BQ) {
                let n = BQ.min(t - q0);
                let m = seen(&x, q0, n);
                p.resize(n * m, T::zero());
                ds.resize(n * m, T::zero());
                probs(&mut p, (qh, kh), q0, n, &x, scale);
                let gob: Mat<T> = (&goh[q0 * d..], d, 1);
                // dV += Pᵀ dO over the keys this block sees.
                matmul(&mut dvh[..m * d], d, true, (m, d, n), (&p, 1, m), gob);
                // dP = dO Vᵀ, then dS = P ⊙ (dP − rowsum(dO ⊙ O))·s in place.
                matmul(&mut ds, m, false, (n, m, d), gob, (vh, 1, d));
                for i in 0..n {
                    let row = (q0 + i) * d..(q0 + i + 1) * d;
                    let r = goh[row.clone()]
                        .iter()
                        .zip(&oh[row])
                        .fold(T::zero(), |a, (&g, &o)| a + g * o);
                    for (s, &p) in ds[i * m..(i + 1) * m]
                        .iter_mut()
                        .zip(&p[i * m..(i + 1) * m])
                    {
                        *s = p * (*s - r) * scale;
                    }
                }
                // dQ = dS K; dK += dSᵀ Q.
                let dqb = &mut dqh[q0 * d..(q0 + n) * d];
                matmul(dqb, d, false, (n, d, m), (&ds, m, 1), (kh, d, 1));
                matmul(
                    &mut dkh[..m * d],
                    d,
                    true,
                    (m, d, n),
                    (&ds, 1, m),
                    (&qh[q0 * d..], d, 1),
                );
            }
        });
    (dq, group_sum(dk, &x), group_sum(dv, &x))
}
