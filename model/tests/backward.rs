//! The vendored candle-core's backward (vendor/README.md): the first gradient reaching a node is
//! stored as it is, not added to a fresh zero tensor, and a slice's gradient is written into its
//! place in its argument's, not padded with zeros and added; with upstream's values and checks.

use candle_core::{DType, Device, Tensor, Var};

fn var(v: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn a_first_gradient_is_stored_without_a_copy() {
    // d/da and d/db of sum(a + b) are one upstream tensor; upstream candle made each its own
    // zeros + add
    let (a, b) = (var(&[1., 2., 3.], &[3]), var(&[4., 5., 6.], &[3]));
    let loss = (a.as_tensor() + b.as_tensor()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let (ga, gb) = (
        grads.get(a.as_tensor()).unwrap(),
        grads.get(b.as_tensor()).unwrap(),
    );
    assert_eq!(ga.id(), gb.id(), "the gradient was copied");
    assert_eq!(ga.to_vec1::<f32>().unwrap(), vec![1., 1., 1.]);
}

#[test]
fn gradients_that_arrive_strided_or_twice_are_whole_and_summed() {
    // x [2, 3] reaches the loss twice: transposed (its gradient arrives as a strided view) and
    // broadcast over a new leading dimension (its gradient arrives as a sum)
    let x = var(&[1., 2., 3., 4., 5., 6.], &[2, 3]);
    let c = Tensor::from_slice(&[1f32, 10., 100., 1000., 1e4, 1e5], (3, 2), &Device::Cpu).unwrap();
    let xt = x.as_tensor().t().unwrap(); // [3, 2]
    let wide = x.as_tensor().broadcast_as((4, 2, 3)).unwrap();
    let loss = ((xt * &c).unwrap().sum_all().unwrap() + wide.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    assert!(g.is_contiguous());
    // cᵀ + 4 everywhere
    let want = [5f32, 1e2 + 4., 1e4 + 4., 10. + 4., 1e3 + 4., 1e5 + 4.];
    assert_eq!(g.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);

    // a transpose alone: the gradient is stored contiguous, not as the transposed view
    let y = var(&[1., 2., 3., 4., 5., 6.], &[2, 3]);
    let loss = (y.as_tensor().t().unwrap() * &c)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let g = g.get(y.as_tensor()).unwrap();
    assert!(g.is_contiguous());
    assert_eq!(
        g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        [1f32, 100., 1e4, 10., 1000., 1e5]
    );
}

#[test]
fn a_gradient_of_the_wrong_dtype_or_shape_is_an_error() {
    // a hand-written backward (model::attach) returning what upstream's `zeros.add` rejected
    let x = var(&[1., 2.], &[2]);
    for bad in [
        Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    ] {
        let value = x.as_tensor().detach();
        let y = model::attach::attach(x.as_tensor(), x.as_tensor(), x.as_tensor(), value, {
            move |_, _, _, _, _| Ok([Some(bad.clone()), None, None])
        })
        .unwrap();
        assert!(y.sum_all().unwrap().backward().is_err());
    }
}

/// x [2, 4] as f32s, row-major.
fn x24() -> Var {
    var(&[1., 2., 3., 4., 5., 6., 7., 8.], &[2, 4])
}

fn grad_of(x: &Var, loss: &Tensor) -> Vec<f32> {
    let grads = loss.backward().unwrap();
    let g = grads.get(x.as_tensor()).expect("a gradient");
    assert!(g.is_contiguous());
    g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Σ (x.narrow(dim, start, len) ⊙ c) for the constant `c` of the slice's shape.
fn weighted(x: &Var, dim: usize, start: usize, len: usize, c: &[f32]) -> Tensor {
    let s = x.as_tensor().narrow(dim, start, len).unwrap();
    let c = Tensor::from_slice(c, s.shape(), &Device::Cpu).unwrap();
    (s * c).unwrap().sum_all().unwrap()
}

#[test]
fn slices_gradients_are_written_into_their_places() {
    // x split into its columns 0..1, 1..3 and 3..4, each weighted by its own constant: the
    // gradient is the constants in place. The last slice's weights are −0.0: written in place
    // they stay −0.0, where upstream's zero padding and adds (0 + −0 = +0) lost the sign
    let x = x24();
    let loss = [
        weighted(&x, 1, 0, 1, &[1., 5.]),
        weighted(&x, 1, 1, 2, &[2., 3., 6., 7.]),
        weighted(&x, 1, 3, 1, &[-0., -0.]),
    ];
    let loss = (&(&loss[0] + &loss[1]).unwrap() + &loss[2]).unwrap();
    let g = grad_of(&x, &loss);
    assert_eq!(g, [1., 2., 3., 0., 5., 6., 7., 0.]);
    assert!(g[3].is_sign_negative() && g[7].is_sign_negative(), "{g:?}");
    // rows (dim 0), one of them left untouched: zeros there
    let loss = weighted(&x, 0, 1, 1, &[1., 2., 3., 4.]);
    assert_eq!(grad_of(&x, &loss), [0., 0., 0., 0., 1., 2., 3., 4.]);
}

#[test]
fn overlapping_slices_and_other_uses_add_up() {
    let x = x24();
    // columns 0..2 and 1..3 overlap in column 1: summed there
    let loss = (weighted(&x, 1, 0, 2, &[1., 2., 5., 6.])
        + weighted(&x, 1, 1, 2, &[10., 20., 50., 60.]))
    .unwrap();
    assert_eq!(grad_of(&x, &loss), [1., 12., 20., 0., 5., 56., 60., 0.]);
    // a slice along each dimension: row 0, then column 2
    let loss =
        (weighted(&x, 0, 0, 1, &[1., 2., 3., 4.]) + weighted(&x, 1, 2, 1, &[10., 20.])).unwrap();
    assert_eq!(grad_of(&x, &loss), [1., 2., 13., 4., 0., 0., 20., 0.]);
    // x itself besides two slices: its gradient (all 100s) adds to theirs, whichever comes first
    for whole_first in [true, false] {
        let whole = (x.as_tensor() * 100.).unwrap().sum_all().unwrap();
        let parts = (weighted(&x, 1, 0, 2, &[1., 2., 5., 6.])
            + weighted(&x, 1, 2, 2, &[3., 4., 7., 8.]))
        .unwrap();
        let loss = match whole_first {
            true => (&whole + &parts).unwrap(),
            false => (&parts + &whole).unwrap(),
        };
        let want: Vec<f32> = (1..=8).map(|k| 100. + k as f32).collect();
        assert_eq!(grad_of(&x, &loss), want, "whole first: {whole_first}");
    }
}

#[test]
fn a_slices_gradient_of_the_wrong_dtype_or_shape_is_an_error() {
    // a hand-written backward's wrong gradient for a slice is caught as it is accumulated for
    // the slice, so that the slice's backward only ever places gradients of its own shape
    let x = x24();
    for bad in [
        Tensor::zeros((2, 2), DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
    ] {
        let s = x.as_tensor().narrow(1, 1, 2).unwrap();
        let value = s.detach();
        let y = model::attach::attach(&s, &s, &s, value, {
            move |_, _, _, _, _| Ok([Some(bad.clone()), None, None])
        })
        .unwrap();
        assert!(y.sum_all().unwrap().backward().is_err());
    }
}
