//! AdamW with decoupled weight decay and f32 moments, as `torch.optim.AdamW` computes it;
//! learning-rate schedules as transformers' `get_*_schedule_with_warmup`; clipping by global
//! norm as `torch.nn.utils.clip_grad_norm_`.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// One trainable tensor and its optimiser state.
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Weight decay applies (not to norms and biases).
    pub decay: bool,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimiser steps taken.
    pub step: u64,
    pub params: Vec<Param>,
}

/// Norm weights and biases get no weight decay (transformers' Trainer does the same).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.ends_with("norm.weight"))
}

impl AdamW {
    pub fn new(
        vars: Vec<(String, Var)>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<AdamW> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                // Two tensors, not one shared: the CPU update writes them in place.
                let z = || Tensor::zeros(var.shape(), DType::F32, var.device());
                Ok(Param {
                    decay: decays(&name),
                    name,
                    exp_avg: z()?,
                    exp_avg_sq: z()?,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            params,
        })
    }

    /// One update with learning rate `lr` from the summed gradients (by parameter name).
    pub fn apply(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            if p.var.device().is_cpu() && p.var.dtype() == DType::F32 {
                let s = Scalars {
                    beta2: self.beta2 as f32,
                    one_minus_beta1: (1.0 - self.beta1) as f32,
                    one_minus_beta2: (1.0 - self.beta2) as f32,
                    decay: if p.decay {
                        (1.0 - lr * self.weight_decay) as f32
                    } else {
                        1.0
                    },
                    step_size: (lr / bc1) as f32,
                    bc2_sqrt: bc2_sqrt as f32,
                    eps: self.eps as f32,
                };
                update_in_place(p, &g.contiguous()?, s)?;
                continue;
            }
            let mut w = p.var.as_tensor().to_dtype(DType::F32)?;
            if p.decay && self.weight_decay != 0.0 {
                w = (w * (1.0 - lr * self.weight_decay))?;
            }
            p.exp_avg = ((&p.exp_avg * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            p.exp_avg_sq = ((&p.exp_avg_sq * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((p.exp_avg_sq.sqrt()? / bc2_sqrt)? + self.eps)?;
            let w = (w - ((&p.exp_avg / denom)? * (lr / bc1))?)?;
            p.var.set(&w.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (for checkpoints: written at once, as the next step updates
    /// them in place).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        for p in &self.params {
            m.insert(format!("exp_avg.{}", p.name), p.exp_avg.clone());
            m.insert(format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone());
        }
        m
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for p in &mut self.params {
            let get = |k: String| -> Result<Tensor> {
                match state.get(&k) {
                    // A copy of its own: the CPU update writes it in place.
                    Some(t) if t.dims() == p.var.dims() => {
                        Ok(t.to_dtype(DType::F32)?.to_device(p.var.device())?.copy()?)
                    }
                    Some(_) => bail!("optimizer state {k} has the wrong shape"),
                    None => bail!("optimizer state {k} is missing"),
                }
            };
            p.exp_avg = get(format!("exp_avg.{}", p.name))?;
            p.exp_avg_sq = get(format!("exp_avg_sq.{}", p.name))?;
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of all gradients, and the gradients scaled to `max_norm` when above it
/// (clip coefficient max_norm / (norm + 1e-6), capped at 1, as PyTorch). `max_norm` 0: no clip.
pub fn clip(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.values() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// The learning-rate multiplier for optimiser step `step` (0-based) of `total`, after `warmup`
/// linear warm-up steps (transformers' lambdas, which give 0 at step 0 when warming up).
pub fn lr_factor(schedule: Schedule, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((total as f64 - step as f64) / span).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers_lambdas() {
        // get_linear_schedule_with_warmup(warmup=2, total=10)
        assert_eq!(lr_factor(Schedule::Linear, 0, 2, 10), 0.0);
        assert_eq!(lr_factor(Schedule::Linear, 1, 2, 10), 0.5);
        assert_eq!(lr_factor(Schedule::Linear, 2, 2, 10), 1.0);
        assert_eq!(lr_factor(Schedule::Linear, 6, 2, 10), 0.5);
        assert!((lr_factor(Schedule::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_factor(Schedule::Constant, 9, 2, 10), 1.0);
    }

    #[test]
    fn no_decay_on_norms_and_biases() {
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        assert!(!decays("model.layers.0.self_attn.q_proj.bias"));
        assert!(decays("model.layers.0.self_attn.q_proj.weight"));
        assert!(decays("model.embed_tokens.weight"));
    }
}

/// The step's constants in f32, as torch's kernels cast its Python floats.
#[derive(Clone, Copy)]
struct Scalars {
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    /// 1 − lr·weight_decay (1 without decay).
    decay: f32,
    /// lr / (1 − β₁ᵗ).
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

/// One AdamW update of an f32 CPU parameter and its moments in place, in three threaded passes
/// with torch's single-tensor AdamW's operations in its order:
/// `exp_avg.lerp_(g, 1 − β₁)`, `exp_avg_sq.mul_(β₂).addcmul_(g, g, 1 − β₂)`,
/// `param.mul_(1 − lr·wd)`, `param.addcdiv_(exp_avg, exp_avg_sq.sqrt() / √bc₂ + ε, −step)`.
/// candle's operations would take twelve passes, each allocating its result.
fn update_in_place(p: &Param, g: &Tensor, s: Scalars) -> Result<()> {
    p.exp_avg.inplace_op2(g, &Moment { s, second: false })?;
    p.exp_avg_sq.inplace_op2(g, &Moment { s, second: true })?;
    p.var
        .as_tensor()
        .inplace_op3(&p.exp_avg, &p.exp_avg_sq, &Step(s))?;
    Ok(())
}

fn f32s<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: a contiguous f32 tensor is needed"),
    }
}

fn f32s_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: a contiguous f32 tensor is needed"),
    }
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// exp_avg ← lerp(exp_avg, g, 1 − β₁) (torch's lerp: from the nearer end), or
/// exp_avg_sq ← exp_avg_sq·β₂ + (1 − β₂)·g·g.
struct Moment {
    s: Scalars,
    second: bool,
}

impl candle_core::InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "cf-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (m, g) = (f32s_mut(s1, l1)?, f32s(s2, l2)?);
        if m.len() != g.len() {
            candle_core::bail!("adamw: moment and gradient sizes differ");
        }
        let s = self.s;
        let second = self.second;
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                if second {
                    for (v, &g) in m.iter_mut().zip(g) {
                        *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
                    }
                } else {
                    let w = s.one_minus_beta1;
                    for (m, &g) in m.iter_mut().zip(g) {
                        *m = if w < 0.5 {
                            *m + w * (g - *m)
                        } else {
                            g - (g - *m) * (1.0 - w)
                        };
                    }
                }
            });
        Ok(())
    }
}

/// param ← param·(1 − lr·wd) − step·exp_avg / (√exp_avg_sq / √bc₂ + ε).
struct Step(Scalars);

impl candle_core::InplaceOp3 for Step {
    fn name(&self) -> &'static str {
        "cf-adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (w, m, v) = (f32s_mut(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        if w.len() != m.len() || w.len() != v.len() {
            candle_core::bail!("adamw: parameter and moment sizes differ");
        }
        let s = self.0;
        w.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(w, (m, v))| {
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() / s.bc2_sqrt + s.eps;
                    *w = *w * s.decay + -s.step_size * m / denom;
                }
            });
        Ok(())
    }
}
