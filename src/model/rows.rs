//! Picking rows of a matrix, each at most once, with a backward that is a pick too.
//!
//! The multimodal batch is gathered from the rows [text embeddings; image features] in one
//! `select` (`LlavaModel::prepare_inputs`). burn differentiates `select` with `select_add` on a
//! zeroed matrix, and burn's GPU kernel for it gives each column one thread that walks every
//! picked row in turn: 2048 threads over 19 456 rows, 8.7 ms of a stage-1 step on an H200.
//! When no row is picked twice, each source row's gradient is the output gradient of the one
//! place it went to (or zero): a `select` of the output gradient, parallel over every element.

use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::TensorPrimitive;

/// Rows of `source` (`[n, d]`) in the order `index` names them (`[index.len(), d]`); an entry
/// `None` gives a row of zeros. A row may be named at most once: its gradient is then the
/// output gradient of the one row it became. Panics naming the row otherwise, or when an
/// entry is `n` or more.
pub fn pick_rows<B: Backend>(source: Tensor<B, 2>, index: &[Option<usize>]) -> Tensor<B, 2> {
    let [n, d] = source.dims();
    let device = source.device();
    let picked = index.len();
    // The forward picks from [source; a zero row] (row `n`); the backward from [dy; a zero row]
    // (row `picked`), by where each source row went.
    let mut forward = Vec::with_capacity(picked);
    let mut backward = vec![picked as i64; n];
    for (at, entry) in index.iter().enumerate() {
        match *entry {
            Some(row) => {
                assert!(row < n, "pick_rows: entry {at} names row {row} of a source with {n} rows");
                assert_eq!(backward[row], picked as i64, "pick_rows: row {row} is named twice (entries {} and {at})", backward[row]);
                backward[row] = at as i64;
                forward.push(row as i64);
            }
            None => forward.push(n as i64),
        }
    }
    let forward = Tensor::<B, 1, Int>::from_data(TensorData::new(forward, [picked]), &device);
    let primitive = source.into_primitive().tensor();
    let out = match autodiff::pick_rows::<B>(primitive, forward.into_primitive(), &backward, d) {
        Ok(out) => out,
        // Not under autodiff (or under one this module does not know): the plain pick.
        Err((source, forward)) => pick_with_zero_row::<B>(source, forward, d),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `[x; zeros(1, d)]` picked by `index` on `x`'s own backend.
fn pick_with_zero_row<B: Backend>(x: FloatTensor<B>, index: IntTensor<B>, d: usize) -> FloatTensor<B> {
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
    let zero = Tensor::<B, 2>::zeros([1, d], (&x.device(), x.dtype()));
    let index = Tensor::<B, 1, Int>::from_primitive(index);
    Tensor::cat(vec![x, zero], 0).select(0, index).into_primitive().tensor()
}

mod autodiff {
    use super::pick_with_zero_row;
    use crate::backend::downcast;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::prelude::{Backend, Int, Tensor};
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn::tensor::TensorData;
    use std::any::TypeId;

    #[derive(Debug)]
    struct PickRowsBackward;

    impl<I: Backend> Backward<I, 1> for PickRowsBackward {
        /// Where each source row went (or the zero row), and the width.
        type State = (IntTensor<I>, usize);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let dy = grads.consume::<I>(&ops.node);
            let (backward, d) = ops.state;
            if let [Some(node)] = ops.parents {
                grads.register::<I>(node.id, pick_with_zero_row::<I>(dy, backward, d));
            }
        }
    }

    /// The pick recorded on `Autodiff<I>` with [`PickRowsBackward`] when `B` is that backend
    /// (`backward` goes to the device only then: inference has no use for it).
    fn on<B: Backend, I: Backend>(
        source: FloatTensor<B>,
        forward: IntTensor<B>,
        backward: &[i64],
        d: usize,
    ) -> Result<FloatTensor<B>, (FloatTensor<B>, IntTensor<B>)> {
        type Ad<I> = Autodiff<I, NoCheckpointing>;
        if TypeId::of::<B>() != TypeId::of::<Ad<I>>() {
            return Err((source, forward));
        }
        let device = B::float_device(&source);
        // Autodiff keeps its inner backend's integer tensors as they are.
        let int_on_inner = |t: IntTensor<B>| downcast::<_, IntTensor<I>>(t).ok().expect("B is Autodiff<I>");
        let source = downcast::<_, FloatTensor<Ad<I>>>(source).ok().expect("B is Autodiff<I>");
        let forward = int_on_inner(forward);
        let out = match PickRowsBackward.prepare::<NoCheckpointing>([source.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let backward = Tensor::<B, 1, Int>::from_data(TensorData::new(backward.to_vec(), [backward.len()]), &device);
                prep.finish((int_on_inner(backward.into_primitive()), d), pick_with_zero_row::<I>(source.primitive, forward, d))
            }
            OpsKind::UnTracked(prep) => prep.finish(pick_with_zero_row::<I>(source.primitive, forward, d)),
        };
        Ok(downcast::<FloatTensor<Ad<I>>, FloatTensor<B>>(out).ok().expect("B is Autodiff<I>"))
    }

    /// [`on`] for each autodiff backend the trainer runs on (the CUDA ones as
    /// `crate::backend::autodiff_cuda_backends` lists them); the operands back otherwise.
    pub(super) fn pick_rows<B: Backend>(source: FloatTensor<B>, forward: IntTensor<B>, backward: &[i64], d: usize) -> Result<FloatTensor<B>, (FloatTensor<B>, IntTensor<B>)> {
        let operands = (source, forward);
        // `$ops` named at the call: a macro's own `let` would not shadow the caller's binding.
        macro_rules! try_on {
            ($ops:ident: $($inner:ty),*) => {$(
                let $ops = match on::<B, $inner>($ops.0, $ops.1, backward, d) {
                    Ok(out) => return Ok(out),
                    Err(operands) => operands,
                };
            )*};
        }
        #[cfg(feature = "flex")]
        try_on!(operands: burn::backend::Flex);
        #[cfg(feature = "ndarray")]
        try_on!(operands: burn::backend::NdArray);
        #[cfg(feature = "wgpu")]
        try_on!(operands: burn::backend::Wgpu<f32>);
        #[cfg(feature = "cuda")]
        let operands = {
            use burn::backend::Cuda;
            use burn::tensor::{bf16, f16};
            macro_rules! try_on_cuda {
                ($($inner:ty, $strategy:ty);*) => {{
                    try_on!(operands: $($inner),*);
                    operands
                }};
            }
            crate::backend::autodiff_cuda_backends!(try_on_cuda)
        };
        Err(operands)
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type Ad = Autodiff<Flex>;

    /// Values and gradients as burn's own `select` gives them, zero rows included, on the
    /// autodiff backend (the custom backward) and without autodiff (the plain pick).
    #[test]
    fn picked_rows_and_their_gradients_match_select() {
        let device = Default::default();
        let (n, d) = (5, 3);
        let values: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin()).collect();
        // Row 2 is never picked (zero gradient); two padding rows.
        let index = [Some(3), None, Some(0), Some(4), None, Some(1)];
        let weights: Vec<f32> = (0..index.len() * d).map(|i| 1.0 + i as f32).collect();

        let source = Tensor::<Ad, 2>::from_data(TensorData::new(values.clone(), [n, d]), &device).require_grad();
        let picked = pick_rows(source.clone(), &index);
        let w = Tensor::<Ad, 2>::from_data(TensorData::new(weights.clone(), [index.len(), d]), &device);
        let grads = (picked.clone() * w.clone()).sum().backward();
        let grad = source.grad(&grads).expect("the source's gradient").into_data().to_vec::<f32>().unwrap();

        let reference = Tensor::<Ad, 2>::from_data(TensorData::new(values.clone(), [n, d]), &device).require_grad();
        let padded = Tensor::cat(vec![reference.clone(), Tensor::zeros([1, d], &device)], 0);
        let rows: Vec<i64> = index.iter().map(|e| e.map_or(n as i64, |r| r as i64)).collect();
        let expected = padded.select(0, Tensor::<Ad, 1, Int>::from_data(TensorData::new(rows, [index.len()]), &device));
        let expected_grads = (expected.clone() * w).sum().backward();
        let expected_grad = reference.grad(&expected_grads).unwrap().into_data().to_vec::<f32>().unwrap();

        let expected_values = expected.into_data().to_vec::<f32>().unwrap();
        assert_eq!(picked.into_data().to_vec::<f32>().unwrap(), expected_values);
        assert_eq!(grad, expected_grad);
        assert!(grad[2 * d..3 * d].iter().all(|&g| g == 0.0), "row 2 was not picked: {grad:?}");

        let plain = pick_rows(Tensor::<Flex, 2>::from_data(TensorData::new(values.clone(), [n, d]), &device), &index);
        assert_eq!(plain.into_data().to_vec::<f32>().unwrap(), expected_values);

        // The autodiff backend takes the custom backward, not burn's select.
        let source = Tensor::<Ad, 2>::from_data(TensorData::new(values, [n, d]), &device).into_primitive().tensor();
        let forward = Tensor::<Ad, 1, Int>::from_data(TensorData::new(vec![0i64], [1]), &device).into_primitive();
        assert!(autodiff::pick_rows::<Ad>(source, forward, &[0, 1, 1, 1, 1], d).is_ok());
    }

    /// A row named twice, or past the end, is refused with the row named.
    #[test]
    fn twice_named_or_missing_rows_are_refused() {
        let device = Default::default();
        let source = || Tensor::<Flex, 2>::zeros([3, 2], &device);
        let twice = std::panic::catch_unwind(|| pick_rows(source(), &[Some(1), None, Some(1)])).expect_err("row 1 twice");
        assert!(twice.downcast_ref::<String>().unwrap().contains("row 1 is named twice (entries 0 and 2)"));
        let past = std::panic::catch_unwind(|| pick_rows(source(), &[Some(3)])).expect_err("row 3 of 3");
        assert!(past.downcast_ref::<String>().unwrap().contains("entry 0 names row 3 of a source with 3 rows"));
    }
}
