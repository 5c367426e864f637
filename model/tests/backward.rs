//! The vendored candle-core's backward (vendor/README.md): the first gradient reaching a node is
//! stored as it is, not added to a fresh zero tensor, with upstream's values and checks.

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
