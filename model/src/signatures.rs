//! The parameter lists of the kernels in `kernels/ferrite.cu`, read from their C signatures, and
//! the check that `cuda` (feature `cuda`) runs before every launch: that its arguments match the
//! kernel's parameters in number, kind, element type and writability.
//!
//! A CUDA launch takes an untyped list of argument addresses: an argument missing, swapped or of
//! the wrong type goes unnoticed until the kernel reads garbage, and an illegal address leaves
//! the CUDA context unusable for every later launch. The check turns such a mistake into an
//! error that names the kernel and the parameter. Plain Rust, built without the `cuda` feature,
//! so that its parser is tested against the real source on any machine.

use std::collections::HashMap;
use std::sync::OnceLock;

const SOURCE: &str = include_str!("../kernels/ferrite.cu");

/// The element type behind a pointer parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    Bf16,
    F16,
    U32,
    U64,
}

/// A kernel parameter as its signature declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// `const T*` (read only) or `T*` (written).
    Ptr { elem: Elem, written: bool },
    /// `int`
    Int,
    /// `float`
    Float,
    /// `size_t`
    Size,
}

/// An argument as a launch passes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// A device buffer of `elem`s; `writable` unless a read-only view.
    Buffer { elem: Elem, writable: bool },
    /// A raw device address (`u64`): matches a pointer parameter of any element type.
    Address,
    /// `i32`
    Int,
    /// `f32`
    Float,
    /// `usize`
    Size,
}

/// A parameter's C type (`const float*`, `int`, …) as a [`Param`]; None for a type no kernel
/// should take.
fn param(ty: &str) -> Option<Param> {
    let ty: String = ty.split_whitespace().collect::<Vec<_>>().join(" ");
    let (ty, pointer) = match ty.strip_suffix('*') {
        Some(t) => (t.trim(), true),
        None => (ty.as_str(), false),
    };
    if !pointer {
        return match ty {
            "int" => Some(Param::Int),
            "float" => Some(Param::Float),
            "size_t" => Some(Param::Size),
            _ => None,
        };
    }
    let (ty, written) = match ty.strip_prefix("const ") {
        Some(t) => (t, false),
        None => (ty, true),
    };
    let elem = match ty {
        "float" => Elem::F32,
        "bf16" => Elem::Bf16,
        "f16" => Elem::F16,
        "uint32_t" => Elem::U32,
        "u64" => Elem::U64,
        _ => return None,
    };
    Some(Param::Ptr { elem, written })
}

/// Every `extern "C" __global__` kernel of `source` with its parameters, or the first
/// declaration that does not parse.
fn parse(source: &str) -> Result<HashMap<String, Vec<Param>>, String> {
    const ENTRY: &str = "extern \"C\" __global__ void ";
    let mut kernels = HashMap::new();
    for (at, _) in source.match_indices(ENTRY) {
        let rest = &source[at + ENTRY.len()..];
        let (name, rest) = rest
            .split_once('(')
            .ok_or_else(|| format!("a kernel declaration without parameters at byte {at}"))?;
        let (list, _) = rest
            .split_once(')')
            .ok_or_else(|| format!("kernel {name}: unterminated parameter list"))?;
        let params = list
            .split(',')
            .map(|p| {
                let p = p.trim();
                // the type is all before the parameter's name (after a `*` or the last space)
                let cut = p.rfind(['*', ' ']).map_or(0, |i| i + 1);
                param(&p[..cut]).ok_or_else(|| format!("kernel {name}: parameter `{p}`"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if kernels.insert(name.trim().to_string(), params).is_some() {
            return Err(format!("kernel {name} declared twice"));
        }
    }
    Ok(kernels)
}

/// The kernels of `ferrite.cu` and their parameters, parsed once.
pub fn kernels() -> Result<&'static HashMap<String, Vec<Param>>, String> {
    static KERNELS: OnceLock<Result<HashMap<String, Vec<Param>>, String>> = OnceLock::new();
    KERNELS
        .get_or_init(|| parse(SOURCE))
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether argument `a` can be passed for parameter `p`.
fn fits(a: Arg, p: Param) -> bool {
    match (a, p) {
        (Arg::Buffer { elem, writable }, Param::Ptr { elem: e, written }) => {
            elem == e && (writable || !written)
        }
        (Arg::Address, Param::Ptr { .. }) => true,
        (Arg::Int, Param::Int) | (Arg::Float, Param::Float) | (Arg::Size, Param::Size) => true,
        _ => false,
    }
}

/// Checks a launch of `kernel` with `args` against the kernel's signature: an error naming the
/// kernel and the first parameter that does not match.
pub fn check(kernel: &str, args: &[Arg]) -> Result<(), String> {
    let params = kernels()?
        .get(kernel)
        .ok_or_else(|| format!("no kernel {kernel} in ferrite.cu"))?;
    if params.len() != args.len() {
        return Err(format!(
            "kernel {kernel} takes {} arguments, the launch passes {}",
            params.len(),
            args.len()
        ));
    }
    match params.iter().zip(args).position(|(&p, &a)| !fits(a, p)) {
        Some(i) => Err(format!(
            "kernel {kernel}: argument {i} is {:?}, the parameter is {:?}",
            args[i], params[i]
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_of_the_source_parses() {
        let k = kernels().unwrap();
        let declared = SOURCE.matches("extern \"C\" __global__ void ").count();
        assert!(declared > 40, "{declared}");
        assert_eq!(k.len(), declared);
        let f32_ = |written| Param::Ptr {
            elem: Elem::F32,
            written,
        };
        assert_eq!(
            k["rms_norm_fwd_f32"],
            [
                f32_(false),
                f32_(false),
                f32_(true),
                Param::Int,
                Param::Float
            ]
        );
        let bf16_in = Param::Ptr {
            elem: Elem::Bf16,
            written: false,
        };
        assert_eq!(
            k["bias_add_bf16"],
            [
                bf16_in,
                bf16_in,
                Param::Ptr {
                    elem: Elem::Bf16,
                    written: true
                },
                Param::Int,
                Param::Size
            ]
        );
        assert_eq!(
            k["sum_squares_f32"][..2],
            [
                Param::Ptr {
                    elem: Elem::U64,
                    written: false
                },
                Param::Ptr {
                    elem: Elem::U32,
                    written: false
                }
            ]
        );
    }

    #[test]
    fn a_declaration_that_does_not_parse_is_an_error() {
        let bad = "extern \"C\" __global__ void k(const double* x, int n) {}";
        assert!(parse(bad).unwrap_err().contains("const double* x"));
        let twice =
            "extern \"C\" __global__ void k(int n) {}\nextern \"C\" __global__ void k(int n) {}";
        assert!(parse(twice).unwrap_err().contains("twice"));
        let spaced = "extern \"C\" __global__ void k(const float *x,\n    float * y, size_t n) {}";
        let k = parse(spaced).unwrap();
        assert_eq!(
            k["k"],
            [
                Param::Ptr {
                    elem: Elem::F32,
                    written: false
                },
                Param::Ptr {
                    elem: Elem::F32,
                    written: true
                },
                Param::Size
            ]
        );
    }

    #[test]
    fn a_launch_must_match_the_signature() {
        let buf = |elem, writable| Arg::Buffer { elem, writable };
        let ok = [
            buf(Elem::F32, false),
            buf(Elem::F32, true),
            buf(Elem::F32, true),
        ];
        let with = |rest: &[Arg]| [&ok[..], rest].concat();
        assert_eq!(
            check("rms_norm_fwd_f32", &with(&[Arg::Int, Arg::Float])),
            Ok(())
        );
        // a raw address stands for any pointer
        let addressed = [buf(Elem::F32, false), buf(Elem::F32, true), Arg::Address];
        assert_eq!(
            check(
                "rms_norm_fwd_f32",
                &[&addressed[..], &[Arg::Int, Arg::Float]].concat()
            ),
            Ok(())
        );
        let err = |args: &[Arg]| check("rms_norm_fwd_f32", args).unwrap_err();
        assert!(err(&with(&[Arg::Int])).contains("takes 5 arguments, the launch passes 4"));
        assert!(err(&with(&[Arg::Float, Arg::Int])).contains("argument 3"));
        assert!(err(&with(&[Arg::Size, Arg::Float])).contains("argument 3"));
        // the wrong element type, and a read-only view where the kernel writes
        let bf16 = [
            buf(Elem::Bf16, false),
            buf(Elem::F32, true),
            buf(Elem::F32, true),
        ];
        assert!(err(&[&bf16[..], &[Arg::Int, Arg::Float]].concat()).contains("argument 0"));
        let view = [
            buf(Elem::F32, false),
            buf(Elem::F32, true),
            buf(Elem::F32, false),
        ];
        assert!(err(&[&view[..], &[Arg::Int, Arg::Float]].concat()).contains("argument 2"));
        assert!(check("rms_norm_fwd_f64", &[])
            .unwrap_err()
            .contains("no kernel"));
    }
}
