//! `--l2-init λ`: the paper's ℓ2 baseline, λ/2·‖θ − θ₀‖² added to the loss, θ₀ the original
//! weights. Full fine-tuning keeps θ₀ (f32, read from --model) and adds λ(θ − θ₀) to the
//! gradient. With LoRA the adapted weights are W + s·B·A, so θ − θ₀ is s·B·A on each adapted
//! projection: the penalty λ/2·Σ‖s·B·A‖² has gradients λs²·(BA)Aᵀ for B and λs²·Bᵀ(BA) for A.

use crate::params::{lora_name, Trainable};
use crate::step::Grads;
use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use cf_common::model::{Decoder, Source, Weights};
use std::collections::HashMap;

pub struct L2Init {
    lambda: f64,
    /// Full fine-tuning: the original weights by name.
    theta0: HashMap<String, Tensor>,
}

fn add(grads: &mut Grads, name: &str, g: Tensor) -> Result<()> {
    let sum = match grads.remove(name) {
        Some(a) => (a + g)?,
        None => g,
    };
    grads.insert(name.to_string(), sum);
    Ok(())
}

impl L2Init {
    pub fn new(lambda: f64, t: &Trainable, device: &Device) -> Result<L2Init> {
        let mut theta0 = HashMap::new();
        if t.lora.is_none() {
            let w = Weights::open(&t.model.files.weights, DType::F32, device)?;
            for (name, shape) in Decoder::parameter_shapes(&t.model.cfg) {
                theta0.insert(name.clone(), w.get(&name, &shape)?);
            }
        }
        Ok(L2Init { lambda, theta0 })
    }

    /// Add the penalty's gradient to `grads`; returns the penalty.
    pub fn apply(&self, t: &Trainable, grads: &mut Grads) -> Result<f64> {
        let mut penalty = 0.0;
        match &t.lora {
            None => {
                for (name, v) in &t.vars {
                    let t0 = self
                        .theta0
                        .get(name)
                        .ok_or_else(|| anyhow!("internal: no original weight for {name}"))?;
                    let d = (v.as_tensor().to_dtype(DType::F32)? - t0)?;
                    penalty += d.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                    add(grads, name, (d * self.lambda)?)?;
                }
            }
            Some(spec) => {
                let s = spec.scale();
                let by: HashMap<&str, &Tensor> = t
                    .vars
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_tensor()))
                    .collect();
                let mut modules: Vec<&str> = t
                    .vars
                    .iter()
                    .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight"))
                    .collect();
                modules.sort_unstable();
                for m in modules {
                    let module = m.trim_start_matches("base_model.model.");
                    let (an, bn) = (lora_name(module, "A"), lora_name(module, "B"));
                    let (a, b) = (by[an.as_str()], by[bn.as_str()]);
                    let ba = b.matmul(a)?;
                    penalty += s * s * ba.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                    let k = self.lambda * s * s;
                    add(grads, &bn, (ba.matmul(&a.t()?)? * k)?)?;
                    add(grads, &an, (b.t()?.matmul(&ba)? * k)?)?;
                }
            }
        }
        Ok(self.lambda / 2.0 * penalty)
    }
}
