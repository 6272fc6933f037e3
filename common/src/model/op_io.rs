//! Custom operations written as compositions of candle's own: their inputs wrapped as tensors
//! (copies: candle lends a custom op its storage only by reference), their output handed back
//! as storage. Used by the training attention (super::attention) and LoRA's linear layer
//! (super::decoder).

use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};

type R<T> = candle_core::Result<T>;

/// A tensor over a copy of an input, which must be contiguous from its start (the ops here make
/// their inputs so).
fn wrap(s: Storage, l: &Layout) -> R<Tensor> {
    if !(l.is_contiguous() && l.start_offset() == 0) {
        candle_core::bail!("custom op: inputs must be contiguous");
    }
    Ok(Tensor::from_storage(
        s,
        l.shape().clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

pub(crate) fn cpu_in(s: &CpuStorage, l: &Layout) -> R<Tensor> {
    wrap(Storage::Cpu(s.clone()), l)
}

/// The op's result as its output storage and shape.
pub(crate) fn cpu_out(y: &Tensor) -> R<(CpuStorage, Shape)> {
    let y = y.contiguous()?;
    let (st, _) = y.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => Ok((c.clone(), y.shape().clone())),
        _ => candle_core::bail!("custom op: the result is not on the CPU"),
    }
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_in(s: &candle_core::CudaStorage, l: &Layout) -> R<Tensor> {
    use candle_core::backend::BackendStorage;
    wrap(Storage::Cuda(s.try_clone(l)?), l)
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_out(y: &Tensor) -> R<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let y = y.contiguous()?;
    let (st, l) = y.storage_and_layout();
    match &*st {
        Storage::Cuda(c) => Ok((c.try_clone(l)?, y.shape().clone())),
        _ => candle_core::bail!("custom op: the result is not on the GPU"),
    }
}
