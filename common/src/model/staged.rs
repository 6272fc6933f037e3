//! Backpropagation through the decoder, in one graph or layer by layer with recomputation
//! (gradient checkpointing, which candle lacks): run each layer without keeping its graph and
//! keep only its input; in the backward pass, rebuild one layer's graph from a fresh variable
//! holding that input and backpropagate `Σ output ⊙ upstream gradient` through it. One layer's
//! activations (and the gradients candle computes for frozen weights inside it) live at a time.

use super::decoder::Decoder;
use anyhow::{anyhow, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Gradients by parameter name.
pub type Grads = HashMap<String, Tensor>;

/// Add the gradients `g` holds for `vars` to `acc`.
pub fn add_grads(acc: &mut Grads, vars: &[(String, Var)], g: &GradStore) -> Result<()> {
    for (name, v) in vars {
        if let Some(gv) = g.get(v.as_tensor()) {
            let sum = match acc.remove(name) {
                Some(a) => (a + gv)?,
                None => gv.clone(),
            };
            acc.insert(name.clone(), sum);
        }
    }
    Ok(())
}

/// Backpropagate `head(final hidden states)` (a scalar whose gradient is the loss's) for
/// `ids` (b, t) through `dec`, adding the gradients of `vars` to `acc`. `rng`: the LoRA
/// dropout stream, rewound per layer so a recomputed layer draws the forward pass's masks.
pub fn backward(
    dec: &Decoder,
    ids: &Tensor,
    mut head: impl FnMut(&Tensor) -> Result<Tensor>,
    vars: &[(String, Var)],
    checkpointing: bool,
    rng: Option<&Arc<Mutex<ChaCha8Rng>>>,
    acc: &mut Grads,
) -> Result<()> {
    if !checkpointing {
        let s = head(&dec.forward_hidden(ids, None)?)?;
        return add_grads(acc, vars, &s.backward()?);
    }
    let t = ids.dim(1)?;
    let mask = dec.full_mask(t)?;
    let pos = || rng.map(|r| r.lock().expect("LoRA dropout RNG poisoned").get_word_pos());
    let set = |p: Option<u128>| {
        if let (Some(r), Some(p)) = (rng, p) {
            r.lock().expect("LoRA dropout RNG poisoned").set_word_pos(p);
        }
    };
    let mut inputs = Vec::with_capacity(dec.num_blocks());
    let mut x = dec.embed_tokens(ids)?.detach();
    for i in 0..dec.num_blocks() {
        inputs.push((x.clone(), pos()));
        x = dec.block(i, &x, mask.as_ref())?.detach();
    }
    let after = pos();
    let xv = Var::from_tensor(&x)?;
    let g = head(&dec.final_norm(xv.as_tensor())?)?.backward()?;
    add_grads(acc, vars, &g)?;
    let mut gx = g
        .get(xv.as_tensor())
        .ok_or_else(|| anyhow!("internal: no gradient at the last layer's output"))?
        .detach();
    drop(g);
    for i in (0..dec.num_blocks()).rev() {
        let (xi, p) = &inputs[i];
        set(*p);
        let xv = Var::from_tensor(xi)?;
        let out = dec.block(i, xv.as_tensor(), mask.as_ref())?;
        let g = (out * &gx)?.sum_all()?.backward()?;
        add_grads(acc, vars, &g)?;
        gx = g
            .get(xv.as_tensor())
            .ok_or_else(|| anyhow!("internal: no gradient at layer {i}'s input"))?
            .detach();
    }
    let e = dec.embed_tokens(ids)?;
    if e.track_op() {
        add_grads(acc, vars, &(e * &gx)?.sum_all()?.backward()?)?;
    }
    set(after);
    Ok(())
}
