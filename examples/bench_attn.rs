//! Training attention alone on the CPU (model::attention: the flash kernel), forward and
//! backward, for scripts/bench_train.py to set beside PyTorch's scaled_dot_product_attention.
//!
//!     cargo run --release --example bench_attn -- B HEADS KV_HEADS T HEAD_DIM
//!
//! Prints one JSON object: the median milliseconds of the forward pass and of forward plus
//! backward over 7 runs after one warm-up, f32, causal, scale 1/√head_dim.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use std::time::Instant;

fn main() -> Result<()> {
    cf_common::exit::threads_from_env();
    cf_common::exit::allocator_reuse();
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let [b, h, kvh, t, d] = a[..] else {
        bail!("usage: bench_attn B HEADS KV_HEADS T HEAD_DIM");
    };
    let dev = Device::Cpu;
    let var = |heads: usize| Var::from_tensor(&Tensor::randn(0f32, 1., (b, heads, t, d), &dev)?);
    let (q, k, v) = (var(h)?, var(kvh)?, var(kvh)?);
    let g = Tensor::randn(0f32, 1., (b, h, t, d), &dev)?;
    let scale = 1.0 / (d as f64).sqrt();
    let (mut fwd, mut all) = (Vec::new(), Vec::new());
    for run in 0..8 {
        let t0 = Instant::now();
        let o = cf_common::model::attention::causal_attention(&q, &k, &v, scale)?;
        let f = t0.elapsed().as_secs_f64();
        let grads = (o * &g)?.sum_all()?.backward()?;
        grads.get(&q).map(|x| x.dims().len());
        if run > 0 {
            fwd.push(f * 1e3);
            all.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{}",
        serde_json::json!({"forward_ms": median(fwd), "forward_backward_ms": median(all)})
    );
    Ok(())
}
