//! PEFT LoRA adapters as models: an adapter folder (adapter_config.json +
//! adapter_model.safetensors, as peft writes and loads them) names its base model; loading it
//! loads the base and puts the adapters on its projections, so every tool takes an adapter
//! wherever it takes a model. Merging writes W + (α/r)·B·A.

use super::decoder::Decoder;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The projections LoRA can adapt in the decoder, by their transformers names.
pub const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA settings as adapter_config.json records them.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// The base model: a folder or a hub id (without `@revision`).
    pub base: String,
    /// The base's revision, for a hub id (peft's `revision`).
    pub revision: Option<String>,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
}

impl AdapterConfig {
    /// The base as cf names a model: `org/name@revision` for a hub id with a revision.
    pub fn base_name(&self) -> String {
        match &self.revision {
            Some(r) => format!("{}@{r}", self.base),
            None => self.base.clone(),
        }
    }

    /// Settings for an adapter of the model named `model` (`org/name@rev` is split into
    /// peft's `base_model_name_or_path` and `revision`).
    pub fn new(model: &str, rank: usize, alpha: f64, dropout: f64, targets: Vec<String>) -> Self {
        let hub = !Path::new(model).exists() && model.matches('/').count() == 1;
        let (base, revision) = match (hub, model.split_once('@')) {
            (true, Some((b, r))) => (b.to_string(), Some(r.to_string())),
            _ => (model.to_string(), None),
        };
        AdapterConfig {
            base,
            revision,
            rank,
            alpha,
            dropout,
            targets,
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn to_json(&self) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base,
            "revision": self.revision,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    /// Read a folder's adapter_config.json, refusing what cf does not implement.
    pub fn read(dir: &Path) -> Result<AdapterConfig> {
        let p = dir.join("adapter_config.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid JSON: {e}", p.display()))?;
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        let bad = |what: String| anyhow!("{}: {what}", p.display());
        if field("peft_type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "LORA")
        {
            return Err(bad("peft_type is not LORA".into()));
        }
        for (k, ok) in [
            ("use_dora", json!(false)),
            ("use_rslora", json!(false)),
            ("fan_in_fan_out", json!(false)),
            ("bias", json!("none")),
        ] {
            if let Some(x) = field(k) {
                if *x != ok {
                    return Err(bad(format!("{k} = {x} is not supported")));
                }
            }
        }
        for k in ["modules_to_save", "layers_to_transform"] {
            if field(k).is_some_and(|x| x.as_array().is_none_or(|a| !a.is_empty())) {
                return Err(bad(format!("{k} is not supported")));
            }
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if field(k).is_some_and(|x| x.as_object().is_none_or(|o| !o.is_empty())) {
                return Err(bad(format!("{k} is not supported")));
            }
        }
        let base = field("base_model_name_or_path")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("base_model_name_or_path is missing".into()))?
            .to_string();
        let rank = field("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("r must be a positive integer".into()))? as usize;
        let alpha = field("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let targets: Vec<String> = match field("target_modules") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(String::from)
                        .ok_or_else(|| bad("target_modules holds a non-text item".into()))
                })
                .collect::<Result<_>>()?,
            Some(Value::String(s)) if s == "all-linear" => MODULES.map(String::from).to_vec(),
            _ => return Err(bad("target_modules must be a list of module names".into())),
        };
        if let Some(t) = targets.iter().find(|t| !MODULES.contains(&t.as_str())) {
            return Err(bad(format!(
                "target module {t:?} is not one of {}",
                MODULES.join(", ")
            )));
        }
        // An old cf-train wrote `org/name@rev` into base_model_name_or_path.
        let (base, revision) = match (
            field("revision").and_then(Value::as_str),
            base.split_once('@'),
        ) {
            (Some(r), _) => (base.clone(), Some(r.to_string())),
            (None, Some((b, r))) if !Path::new(&base).exists() => {
                (b.to_string(), Some(r.to_string()))
            }
            _ => (base.clone(), None),
        };
        Ok(AdapterConfig {
            base,
            revision,
            rank,
            alpha,
            dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            targets,
        })
    }
}

/// True for a folder holding a PEFT adapter and no model.
pub fn is_adapter(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file() && !dir.join("config.json").is_file()
}

/// The safetensors name of an adapter matrix (`ab`: "A" or "B") of a projection.
pub fn tensor_name(module: &str, ab: &str) -> String {
    format!("base_model.model.{module}.lora_{ab}.weight")
}

/// The adapter matrices of a folder, in f32, checked against the decoder's projections:
/// (module, A (r, in), B (out, r)) for every target projection.
pub fn load_tensors(
    dec: &mut Decoder,
    dir: &Path,
    cfg: &AdapterConfig,
    device: &Device,
) -> Result<Vec<(String, Tensor, Tensor)>> {
    let file = dir.join("adapter_model.safetensors");
    let t = candle_core::safetensors::load(&file, device)
        .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", file.display()))?;
    let mut out = Vec::new();
    dec.for_each_linear(|name, lin| {
        let short = name.rsplit('.').next().unwrap_or(name);
        if !cfg.targets.iter().any(|t| t == short) {
            return Ok(());
        }
        let (o, i) = lin.weight.dims2()?;
        let get = |ab: &str, shape: (usize, usize)| -> Result<Tensor> {
            let n = tensor_name(name, ab);
            let x = t
                .get(&n)
                .ok_or_else(|| anyhow!("{}: {n} is missing", file.display()))?;
            if x.dims2()? != shape {
                bail!(
                    "{}: {n} has shape {:?}, expected {shape:?}",
                    file.display(),
                    x.dims()
                );
            }
            Ok(x.to_dtype(DType::F32)?)
        };
        out.push((
            name.to_string(),
            get("A", (cfg.rank, i))?,
            get("B", (o, cfg.rank))?,
        ));
        Ok(())
    })?;
    if out.is_empty() {
        bail!(
            "{}: no target module of the adapter is in the model",
            dir.display()
        );
    }
    Ok(out)
}

/// Put an adapter folder's matrices on `dec`'s projections (for inference: no dropout).
pub fn attach(dec: &mut Decoder, dir: &Path, cfg: &AdapterConfig) -> Result<()> {
    let device = dec.device().clone();
    let mats: HashMap<String, (Tensor, Tensor)> = load_tensors(dec, dir, cfg, &device)?
        .into_iter()
        .map(|(n, a, b)| (n, (a, b)))
        .collect();
    let scale = cfg.scale();
    dec.for_each_linear(|name, lin| {
        if let Some((a, b)) = mats.get(name) {
            lin.lora = Some(super::decoder::Lora {
                a: a.clone(),
                b: b.clone(),
                scale,
                dropout: 0.0,
                rng: None,
            });
        }
        Ok(())
    })
}

/// W + (α/r)·B·A, in f32, for a projection's weight given its adapter matrices.
pub fn merged_weight(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let cpu = Device::Cpu;
    let delta = (b
        .to_device(&cpu)?
        .to_dtype(DType::F32)?
        .matmul(&a.to_device(&cpu)?.to_dtype(DType::F32)?)?
        * scale)?;
    Ok((w.to_device(&cpu)?.to_dtype(DType::F32)? + delta)?)
}
