//! The CUDA kernels of `kernels/ferrite.cu`, run on the CPU: the source is compiled with the host
//! C++ compiler against `kernels/emu/cuda_emu.h` (one fiber per CUDA thread, barriers, warp
//! shuffles, shared memory, atomics) and each kernel is launched with the geometry that
//! `model::cuda` uses on the GPU (`model::launch`), then compared with the composed candle ops
//! that are the kernels' reference. This checks the kernels' formulas, indexing, reductions and
//! synchronisation on every CI run; what it cannot check (the PTX, the cudarc launchers'
//! argument marshalling, the GPU's fast-math intrinsics) is `ferrite gpu-check`'s on the GPU.
//!
//! Needs a C++20 compiler (`$CXX`, else `c++`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use half::{bf16, f16};
use model::launch::{self, Geometry, FLASH_KEYS};
use model::ops::composed;
use model::rng::Rng;
use model::sampling::SamplingParams;

const SOURCE: &str = include_str!("../kernels/ferrite.cu");

/// The kernels' names, in source order.
fn kernel_names() -> Vec<String> {
    SOURCE
        .lines()
        .filter_map(|l| l.strip_prefix("extern \"C\" __global__ void "))
        .map(|rest| rest.split('(').next().unwrap_or_default().to_string())
        .collect()
}

/// A `__shared__` declaration of `ferrite.cu` as `cuda_emu.h`'s race-checked array; any other
/// line as it is.
fn rewrite_shared(line: &str) -> String {
    /// `T name[n];` or `T name;` as (T, name, n or None); T may be several words.
    fn decl(rest: &str) -> Option<(&str, &str, Option<&str>)> {
        let rest = rest.strip_suffix(';')?;
        let (declarator, n) = match rest.split_once('[') {
            Some((d, n)) => (d, Some(n.strip_suffix(']')?)),
            None => (rest, None),
        };
        let (ty, name) = declarator.trim().rsplit_once(' ')?;
        Some((ty, name, n))
    }
    let t = line.trim();
    if let Some((ty, name, n)) = t.strip_prefix("extern __shared__ ").and_then(decl) {
        assert_eq!(n, Some(""), "extern __shared__ T name[];");
        return format!("EMU_DYNAMIC_SHARED({ty}, {name});");
    }
    if let Some((ty, name, n)) = t.strip_prefix("__shared__ ").and_then(decl) {
        return format!("EMU_SHARED({ty}, {name}, {});", n.unwrap_or("1"));
    }
    line.to_string()
}

/// Writes, once per test process, what the emulator's sources include (into
/// `target/tmp/kernel-emulation`, where `scripts/fake-gpu.sh` finds them too): `kernels.inc`,
/// `ferrite.cu` with its shared memory rewritten for `cuda_emu.h`, and `registry.inc`, one
/// `{"name", runner(name)},` per kernel. Returns the directory.
fn generated_sources() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-emulation");
        std::fs::create_dir_all(&dir).unwrap();
        let kernels: String = SOURCE.lines().map(|l| rewrite_shared(l) + "\n").collect();
        assert!(
            !kernels.contains("__shared__ "),
            "unrewritten shared memory"
        );
        std::fs::write(dir.join("kernels.inc"), kernels).unwrap();
        let registry: String = kernel_names()
            .iter()
            .map(|k| format!("{{\"{k}\", runner({k})}},\n"))
            .collect();
        std::fs::write(dir.join("registry.inc"), registry).unwrap();
        dir
    })
}

/// Builds the emulator once per test process: the generated sources and `driver.cpp`.
fn emulator() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = generated_sources();
        let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emu");
        let bin = dir.join("emulator");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-g", "-pthread", "-fsanitize=address"])
            .arg("-I")
            .arg(&emu)
            .arg("-I")
            .arg(dir)
            .arg(emu.join("driver.cpp"))
            .arg("-o")
            .arg(&bin)
            .output()
            .unwrap_or_else(|e| panic!("running the C++ compiler `{cxx}` (set CXX): {e}"));
        assert!(
            out.status.success(),
            "compiling the kernel emulator failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        bin
    })
}

/// A kernel argument: a buffer (read and written back) or a scalar.
#[derive(Debug, Clone, PartialEq)]
enum Arg {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    U32(Vec<u32>),
    Int(i32),
    Size(usize),
    Float(f32),
    /// A table of device addresses (`const u64*`) of its buffers (None: address 0).
    Table(Vec<Option<Arg>>),
}

impl Arg {
    fn f32s(&self) -> Vec<f32> {
        match self {
            Arg::F32(v) => v.clone(),
            Arg::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Arg::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            a => panic!("not a float buffer: {a:?}"),
        }
    }
}

/// The tag and little-endian bytes of an argument as `driver.cpp` reads it (a buffer's element
/// count first).
fn encode(a: &Arg) -> (u8, Vec<u8>) {
    fn buffer<const N: usize>(n: usize, xs: impl Iterator<Item = [u8; N]>) -> Vec<u8> {
        (n as u64)
            .to_le_bytes()
            .into_iter()
            .chain(xs.flatten())
            .collect()
    }
    match a {
        Arg::F32(v) => (b'F', buffer(v.len(), v.iter().map(|x| x.to_le_bytes()))),
        Arg::Bf16(v) => (
            b'B',
            buffer(v.len(), v.iter().map(|x| x.to_bits().to_le_bytes())),
        ),
        Arg::F16(v) => (
            b'H',
            buffer(v.len(), v.iter().map(|x| x.to_bits().to_le_bytes())),
        ),
        Arg::U32(v) => (b'U', buffer(v.len(), v.iter().map(|x| x.to_le_bytes()))),
        Arg::Int(x) => (b'i', x.to_le_bytes().to_vec()),
        Arg::Size(x) => (b'z', (*x as u64).to_le_bytes().to_vec()),
        Arg::Float(x) => (b'f', x.to_le_bytes().to_vec()),
        Arg::Table(entries) => {
            let mut bytes = (entries.len() as u64).to_le_bytes().to_vec();
            for e in entries {
                match e {
                    Some(buffer) => {
                        let (tag, b) = encode(buffer);
                        bytes.push(tag);
                        bytes.extend(b);
                    }
                    None => bytes.push(b'n'),
                }
            }
            (b'P', bytes)
        }
    }
}

/// The first `n` bytes of `rest`, which moves past them.
fn split<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    head
}

/// Runs `kernel` with `args`; returns the buffers after the launch, in argument order.
fn try_launch(kernel: &str, g: Geometry, args: &[Arg]) -> Result<Vec<Arg>, String> {
    emulate(kernel, g, args).map(|(buffers, _)| buffers)
}

/// Runs `kernel` with `args`: the buffers after the launch, in argument order, and the keys the
/// flash kernels' blocks visited (the forward's walk, dQ's: `EMU_COUNT_KEYS` in ferrite.cu).
/// Every launch of more than one thread runs twice, its blocks and each block's threads first
/// to last, then last to first, and must give the same bits both ways: a GPU runs blocks in any
/// order and a block's warps in any order between barriers, so a result that depends on it (a
/// thread reading global memory another wrote with no barrier between, floats added atomically)
/// would be a race or differ from run to run.
fn emulate(kernel: &str, g: Geometry, args: &[Arg]) -> Result<(Vec<Arg>, [u64; 2]), String> {
    let first = emulate_in(false, kernel, g, args)?;
    if g.grid > 1 || g.block > 1 {
        let last = emulate_in(true, kernel, g, args)?;
        if let Some(at) = first_difference(&first.0, &last.0) {
            return Err(format!(
                "{kernel}: its result depends on the order its {} blocks of {} threads run: \
                 {at} differs between first to last and last to first",
                g.grid, g.block
            ));
        }
    }
    Ok(first)
}

/// Where two launches' buffers first differ in their bits: the buffer's argument position and
/// the element.
fn first_difference(a: &[Arg], b: &[Arg]) -> Option<String> {
    a.iter().zip(b).enumerate().find_map(|(i, (a, b))| {
        let (a, b) = (encode(a).1, encode(b).1);
        let byte = a.iter().zip(&b).position(|(x, y)| x != y)?;
        Some(format!("output buffer {i} near byte {byte}"))
    })
}

/// Runs `kernel` once, its blocks last to first where `reversed` (`EMU_BLOCK_ORDER`, cuda_emu.h).
fn emulate_in(
    reversed: bool,
    kernel: &str,
    g: Geometry,
    args: &[Arg],
) -> Result<(Vec<Arg>, [u64; 2]), String> {
    let mut input = Vec::new();
    input.extend((kernel.len() as u32).to_le_bytes());
    input.extend(kernel.as_bytes());
    for x in [g.grid, g.block, g.shared_bytes, args.len() as u32] {
        input.extend(x.to_le_bytes());
    }
    for (tag, bytes) in args.iter().map(encode) {
        input.push(tag);
        input.extend(bytes);
    }
    let mut child = Command::new(emulator())
        .env(
            "EMU_BLOCK_ORDER",
            if reversed { "reverse" } else { "forward" },
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    // a launch that fails early closes its input: the exit status says why
    let _ = child.stdin.take().unwrap().write_all(&input);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{kernel}: {}: {err}", out.status));
    }
    let mut rest = out.stdout.as_slice();
    let mut buffers = Vec::new();
    for a in args {
        match a {
            Arg::F32(_) | Arg::U32(_) | Arg::Bf16(_) | Arg::F16(_) => {
                buffers.push(decode(&mut rest, a))
            }
            Arg::Table(entries) => buffers.push(Arg::Table(
                entries
                    .iter()
                    .map(|e| e.as_ref().map(|b| decode(&mut rest, b)))
                    .collect(),
            )),
            _ => {}
        }
    }
    let keys_visited: [u64; 2] =
        std::array::from_fn(|_| u64::from_le_bytes(split(&mut rest, 8).try_into().unwrap()));
    Ok((buffers, keys_visited))
}

/// The next buffer of the emulator's output, of `like`'s type.
fn decode(rest: &mut &[u8], like: &Arg) -> Arg {
    let width = match like {
        Arg::Bf16(_) | Arg::F16(_) => 2,
        _ => 4,
    };
    let n = u64::from_le_bytes(split(rest, 8).try_into().unwrap()) as usize;
    let chunks = split(rest, width * n).chunks(width);
    match like {
        Arg::F32(_) => Arg::F32(
            chunks
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        Arg::Bf16(_) => Arg::Bf16(
            chunks
                .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())))
                .collect(),
        ),
        Arg::F16(_) => Arg::F16(
            chunks
                .map(|c| f16::from_bits(u16::from_le_bytes(c.try_into().unwrap())))
                .collect(),
        ),
        Arg::U32(_) => Arg::U32(
            chunks
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        a => panic!("not a buffer: {a:?}"),
    }
}

fn launch(kernel: &str, g: Geometry, args: &[Arg]) -> Vec<Arg> {
    try_launch(kernel, g, args).unwrap_or_else(|e| panic!("{e}"))
}

/// The element type a kernel runs in: its name's suffix and its buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ty {
    F32,
    Bf16,
    F16,
}

/// The element types every kernel but the flash kernels (bf16 only) has an entry point for.
const TYS: [Ty; 3] = [Ty::F32, Ty::Bf16, Ty::F16];

impl Ty {
    fn name(self, kernel: &str) -> String {
        match self {
            Ty::F32 => format!("{kernel}_f32"),
            Ty::Bf16 => format!("{kernel}_bf16"),
            Ty::F16 => format!("{kernel}_f16"),
        }
    }

    fn buffer(self, t: &Tensor) -> Arg {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        match self {
            Ty::F32 => Arg::F32(v),
            Ty::Bf16 => Arg::Bf16(v.into_iter().map(bf16::from_f32).collect()),
            Ty::F16 => Arg::F16(v.into_iter().map(f16::from_f32).collect()),
        }
    }

    /// `t` as the kernel sees it: rounded to bf16 or f16 for those kernels.
    fn round(self, t: &Tensor) -> Tensor {
        match self {
            Ty::F32 => t.clone(),
            Ty::Bf16 | Ty::F16 => t
                .to_dtype(self.dtype())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        }
    }

    fn dtype(self) -> DType {
        match self {
            Ty::F32 => DType::F32,
            Ty::Bf16 => DType::BF16,
            Ty::F16 => DType::F16,
        }
    }

    /// Tolerance of the largest difference relative to the largest reference value.
    fn tol(self) -> f32 {
        match self {
            Ty::F32 => 1e-5,
            Ty::Bf16 => 1e-2,
            // 3 more mantissa bits than bf16
            Ty::F16 => 2e-3,
        }
    }
}

fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `max |got − want| / max |want|`, infinite where `got` is NaN (which `f32::max` would skip).
fn max_rel(got: &[f32], want: &Tensor) -> f32 {
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len(), "lengths");
    let scale = want.iter().fold(1e-12f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(&want)
        .map(|(a, b)| {
            if a.is_nan() {
                f32::INFINITY
            } else {
                (a - b).abs()
            }
        })
        .fold(0f32, f32::max)
        / scale
}

fn assert_close(what: &str, got: &Arg, want: &Tensor, tol: f32) {
    let e = max_rel(&got.f32s(), want);
    assert!(
        e < tol,
        "{what}: max relative difference {e:.2e} ≥ {tol:.0e}"
    );
}

/// `f(x…)`, and the gradients of `Σ f(x…) ∘ u` with respect to every `x`.
fn with_grads(
    xs: &[&Tensor],
    u: &Tensor,
    f: impl Fn(&[Tensor]) -> Tensor,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let grads = (&y * u).unwrap().sum_all().unwrap().backward().unwrap();
    let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
    (y, g)
}

/// A smaller grid than the launcher's, to run the grid-stride loops more than once per block.
fn fewer_blocks(g: Geometry, grid: u32) -> Geometry {
    Geometry { grid, ..g }
}

#[test]
fn row_gather_scatter_and_the_embedding_backward_match_index_select_and_index_add() {
    let m = 13;
    // token 4 three times, 12 (the last row) twice, an id past the table (13) once
    let ids = [4u32, 12, 0, 4, 13, 7, 4, 12, 2, 9];
    let valid: Vec<u32> = ids.iter().copied().filter(|&i| i < m as u32).collect();
    let positions: Vec<u32> = (0..ids.len() as u32)
        .filter(|&p| ids[p as usize] < 13)
        .collect();
    let n = ids.len();
    for h in [40usize, 1500] {
        let x = random(&[m, h], 30, 1.0);
        let g = random(&[n, h], 31, 1.0);
        let pick = |t: &Tensor, rows: &[u32]| {
            t.index_select(&Tensor::new(rows, &Device::Cpu).unwrap(), 0)
                .unwrap()
        };
        for ty in TYS {
            let (x, g) = (ty.round(&x), ty.round(&g));
            let at = format!("{ty:?}, h = {h}");
            for geometry in [launch::elems(n * h), fewer_blocks(launch::elems(n * h), 1)] {
                let out = launch(
                    &ty.name("gather_rows"),
                    geometry,
                    &[
                        ty.buffer(&x),
                        Arg::U32(ids.to_vec()),
                        ty.buffer(&g.zeros_like().unwrap()),
                        Arg::Int(h as i32),
                        Arg::Int(m as i32),
                        Arg::Size(n * h),
                    ],
                );
                let y = out[2].f32s();
                assert!(y[4 * h..5 * h].iter().all(|v| v.is_nan()), "NaN row {at}");
                let rows: Vec<f32> = positions
                    .iter()
                    .flat_map(|&p| y[p as usize * h..(p as usize + 1) * h].to_vec())
                    .collect();
                assert_close(
                    &format!("gather_rows {at}"),
                    &Arg::F32(rows),
                    &pick(&x, &valid),
                    1e-7,
                );

                // distinct rows 0, 3, 5, 12 and one past the end (skipped) into m zero rows
                let rows = [0u32, 3, 5, 12, 13];
                let v = random(&[5, h], 32, 1.0);
                let v = ty.round(&v);
                let out = launch(
                    &ty.name("scatter_rows"),
                    geometry,
                    &[
                        ty.buffer(&v),
                        Arg::U32(rows.to_vec()),
                        ty.buffer(&x.zeros_like().unwrap()),
                        Arg::Int(h as i32),
                        Arg::Int(m as i32),
                        Arg::Size(5 * h),
                    ],
                );
                let want = x
                    .zeros_like()
                    .unwrap()
                    .index_add(
                        &Tensor::new(&rows[..4], &Device::Cpu).unwrap(),
                        &v.narrow(0, 0, 4).unwrap(),
                        0,
                    )
                    .unwrap();
                assert_close(&format!("scatter_rows {at}"), &out[2], &want, 1e-7);
            }
            let (table, u) = model::ops::token_segments(&ids, m);
            let want = x
                .zeros_like()
                .unwrap()
                .index_add(
                    &Tensor::new(valid.as_slice(), &Device::Cpu).unwrap(),
                    &pick(&g, &positions),
                    0,
                )
                .unwrap();
            // whole segments (the launcher's pieces of 64), and pieces of 2: token 4's three
            // positions split in two, merged by the second kernel
            for piece in [launch::EMBEDDING_PIECE, 2] {
                let starts = &table[u..2 * u + 1];
                let (pieces, merges, slots) = launch::embedding_pieces(starts, piece);
                let (n_pieces, n_merges) = (pieces.len() / 4, merges.len() / 3);
                assert_eq!(
                    (n_pieces, n_merges, slots),
                    if piece == 2 { (7, 1, 2) } else { (6, 0, 0) }
                );
                let geometry = launch::embedding_bwd(n_pieces, h);
                for geometry in [geometry, fewer_blocks(geometry, 2)] {
                    let out = launch(
                        &ty.name("embedding_bwd"),
                        geometry,
                        &[
                            ty.buffer(&g),
                            Arg::U32(table.clone()),
                            Arg::U32(pieces.clone()),
                            ty.buffer(&x.zeros_like().unwrap()),
                            Arg::F32(vec![f32::NAN; (slots * h).max(1)]),
                            Arg::Int(u as i32),
                            Arg::Int(n_pieces as i32),
                            Arg::Int(h as i32),
                        ],
                    );
                    let mut dw = out[3].clone();
                    if n_merges > 0 {
                        let out = launch(
                            &ty.name("embedding_merge"),
                            launch::embedding_bwd(n_merges, h),
                            &[
                                Arg::U32(table.clone()),
                                Arg::U32(merges.clone()),
                                out[4].clone(),
                                dw,
                                Arg::Int(n_merges as i32),
                                Arg::Int(h as i32),
                            ],
                        );
                        dw = out[3].clone();
                    }
                    let at = format!("{at}, pieces of {piece}, {} blocks", geometry.grid);
                    assert_close(&format!("embedding_bwd {at}"), &dw, &want, ty.tol());
                }
            }
        }
    }
}

#[test]
fn bias_add_matches_broadcast_add() {
    let (rows, out) = (37, 96);
    let (x, b) = (random(&[rows, out], 40, 1.0), random(&[out], 41, 1.0));
    for ty in TYS {
        let (x, b) = (ty.round(&x), ty.round(&b));
        let want = x.broadcast_add(&b).unwrap();
        let n = rows * out;
        for g in [launch::elems(n), fewer_blocks(launch::elems(n), 2)] {
            let y = launch(
                &ty.name("bias_add"),
                g,
                &[
                    ty.buffer(&x),
                    ty.buffer(&b),
                    ty.buffer(&x.zeros_like().unwrap()),
                    Arg::Int(out as i32),
                    Arg::Size(n),
                ],
            );
            let at = format!("{ty:?}, {} blocks", g.grid);
            assert_close(&format!("bias_add {at}"), &y[2], &want, ty.tol());
        }
    }
}

#[test]
fn the_attention_bias_is_built_as_the_host_builds_it() {
    // 3 rows of 20 queries after 5 cached slots; slots missing here and there (padding anywhere)
    let (b, t, q_offset) = (3, 20, 5);
    let s = q_offset + t;
    let mut rng = Rng::new(17);
    let valid: Vec<Vec<bool>> = (0..b)
        .map(|_| (0..s).map(|_| rng.below(4) != 0).collect())
        .collect();
    let want = model::ops::attention_bias(&valid, t, q_offset, -1e9, &Device::Cpu).unwrap();
    let flags: Vec<u32> = valid.iter().flatten().map(|&v| u32::from(v)).collect();
    let n = b * t * s;
    for geometry in [launch::elems(n), fewer_blocks(launch::elems(n), 1)] {
        let out = launch(
            "attention_bias_f32",
            geometry,
            &[
                Arg::U32(flags.clone()),
                Arg::F32(vec![f32::NAN; n]),
                Arg::Int(t as i32),
                Arg::Int(s as i32),
                Arg::Int(q_offset as i32),
                Arg::Float(-1e9),
                Arg::Size(n),
            ],
        );
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(out[1], Arg::F32(want));
    }
}

#[test]
fn the_decode_bias_is_built_as_the_host_builds_it() {
    // 5 rows at slot 30 (S = 31): a full row, padded ones, one that sees only its own slot
    let (s, starts) = (31usize, [0usize, 3, 17, 29, 30]);
    let want = model::ops::decode_bias(&starts, s, -1e9, &Device::Cpu).unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = starts.len() * s;
    for geometry in [launch::elems(n), fewer_blocks(launch::elems(n), 1)] {
        let out = launch(
            "decode_bias_f32",
            geometry,
            &[
                Arg::U32(starts.iter().map(|&x| x as u32).collect()),
                Arg::F32(vec![f32::NAN; n]),
                Arg::Int(s as i32),
                Arg::Float(-1e9),
                Arg::Size(n),
            ],
        );
        assert_eq!(out[1], Arg::F32(want.clone()));
    }
}

#[test]
fn rms_norm_forward_and_backward_match_the_composed_op() {
    let eps = 1e-6;
    // h = 40: a partly idle block of 64; h = 1500: 1024 threads striding the row
    for (rows, h) in [(5usize, 40usize), (3, 1500)] {
        let x = random(&[rows, h], 1, 1.0);
        let w = (random(&[h], 2, 0.2) + 1.0).unwrap();
        let u = random(&[rows, h], 3, 1.0);
        for ty in TYS {
            let (x, w, u) = (ty.round(&x), ty.round(&w), ty.round(&u));
            let at = format!("{ty:?} [{rows}, {h}]");
            let y = launch(
                &ty.name("rms_norm_fwd"),
                launch::rows(rows, h),
                &[
                    ty.buffer(&x),
                    ty.buffer(&w),
                    ty.buffer(&x.zeros_like().unwrap()),
                    Arg::Int(h as i32),
                    Arg::Float(eps as f32),
                ],
            );
            let (want, grads) = with_grads(&[&x, &w], &u, |t| {
                composed::rms_norm(&t[0], &t[1], eps).unwrap()
            });
            assert_close(&format!("rms_norm_fwd {at}"), &y[2], &want, ty.tol());
            let geometry = launch::rms_norm_bwd(rows, h).unwrap();
            for g in [geometry, fewer_blocks(geometry, 2)] {
                let out = launch(
                    &ty.name("rms_norm_bwd"),
                    g,
                    &[
                        ty.buffer(&x),
                        ty.buffer(&w),
                        ty.buffer(&u),
                        ty.buffer(&x.zeros_like().unwrap()),
                        Arg::F32(vec![f32::NAN; g.grid as usize * h]),
                        Arg::Int(rows as i32),
                        Arg::Int(h as i32),
                        Arg::Float(eps as f32),
                    ],
                );
                let at = format!("{at}, {} blocks", g.grid);
                assert_close(
                    &format!("rms_norm_bwd dx {at}"),
                    &out[3],
                    &grads[0],
                    ty.tol(),
                );
                // each block's share of dw is its row, every row written (NaN where not):
                // summed over the blocks as the caller sums them
                let dw = launch(
                    "column_sum_f32",
                    launch::column_sum(h),
                    &[
                        out[4].clone(),
                        Arg::F32(vec![f32::NAN; h]),
                        Arg::Int(g.grid as i32),
                        Arg::Int(h as i32),
                    ],
                );
                assert_close(&format!("rms_norm_bwd dw {at}"), &dw[1], &grads[1], 1e-4);
            }
        }
    }
}

#[test]
fn the_column_sum_adds_in_its_documented_order() {
    // 5 rows: warps past the last row add nothing; 1024 and 1030 rows of 1500 and 40 columns:
    // 32 rows a warp and more, a partly idle last block of columns
    for (rows, h) in [(5usize, 40usize), (1030, 40), (1024, 1500)] {
        let x = random(&[rows, h], 21, 1.0)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let out = launch(
            "column_sum_f32",
            launch::column_sum(h),
            &[
                Arg::F32(x.clone()),
                Arg::F32(vec![f32::NAN; h]),
                Arg::Int(rows as i32),
                Arg::Int(h as i32),
            ],
        );
        // warp y's partial sum of rows y, y + 32, …, then the partials in the order y = 0..31
        let want: Vec<f32> = (0..h)
            .map(|c| {
                let partial = |y: usize| (y..rows).step_by(32).fold(0f32, |s, r| s + x[r * h + c]);
                (0..32).fold(0f32, |s, y| s + partial(y))
            })
            .collect();
        let got = out[1].f32s();
        let differ = (0..h)
            .filter(|&c| got[c].to_bits() != want[c].to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "column_sum_f32 [{rows}, {h}]: {differ} of {h} sums differ"
        );
        // and it is the sum, to f32's rounding
        let exact: Vec<f32> = (0..h)
            .map(|c| (0..rows).map(|r| x[r * h + c] as f64).sum::<f64>() as f32)
            .collect();
        let exact = Tensor::new(exact, &Device::Cpu).unwrap();
        assert_close(
            &format!("column_sum_f32 [{rows}, {h}]"),
            &out[1],
            &exact,
            1e-5,
        );
    }
}

#[test]
fn add_rms_norm_is_the_add_then_rms_norm_bit_for_bit() {
    let eps = 1e-6;
    for (rows, h) in [(5usize, 40usize), (3, 1500)] {
        let x = random(&[rows, h], 11, 1.0);
        let r = random(&[rows, h], 12, 1.0);
        let w = (random(&[h], 13, 0.2) + 1.0).unwrap();
        for ty in TYS {
            let (x, r, w) = (ty.round(&x), ty.round(&r), ty.round(&w));
            let at = format!("{ty:?} [{rows}, {h}]");
            let out = launch(
                &ty.name("add_rms_norm"),
                launch::rows(rows, h),
                &[
                    ty.buffer(&x),
                    ty.buffer(&r),
                    ty.buffer(&w),
                    ty.buffer(&x.zeros_like().unwrap()),
                    ty.buffer(&x.zeros_like().unwrap()),
                    Arg::Int(h as i32),
                    Arg::Float(eps as f32),
                ],
            );
            // the add as a separate op stores it (rounded to the dtype), then rms_norm_fwd on it
            let sum = ty.round(&(&x + &r).unwrap());
            assert_eq!(out[3], ty.buffer(&sum), "the sum, {at}");
            let y = launch(
                &ty.name("rms_norm_fwd"),
                launch::rows(rows, h),
                &[
                    ty.buffer(&sum),
                    ty.buffer(&w),
                    ty.buffer(&x.zeros_like().unwrap()),
                    Arg::Int(h as i32),
                    Arg::Float(eps as f32),
                ],
            );
            assert_eq!(out[4], y[2], "the norm, {at}");
            let want = composed::rms_norm(&sum, &w, eps).unwrap();
            assert_close(&format!("add_rms_norm {at}"), &out[4], &want, ty.tol());
        }
    }
}

#[test]
fn swiglu_forward_and_backward_match_the_composed_op() {
    let n = 1000;
    let (a, b, u) = (
        random(&[n], 4, 2.0),
        random(&[n], 5, 1.0),
        random(&[n], 6, 1.0),
    );
    for ty in TYS {
        let (a, b, u) = (ty.round(&a), ty.round(&b), ty.round(&u));
        let (want, grads) = with_grads(&[&a, &b], &u, |t| (t[0].silu().unwrap() * &t[1]).unwrap());
        for g in [launch::elems(n), fewer_blocks(launch::elems(n), 1)] {
            let at = format!("{ty:?}, {} blocks", g.grid);
            let y = launch(
                &ty.name("swiglu_fwd"),
                g,
                &[
                    ty.buffer(&a),
                    ty.buffer(&b),
                    ty.buffer(&a.zeros_like().unwrap()),
                    Arg::Size(n),
                ],
            );
            assert_close(&format!("swiglu_fwd {at}"), &y[2], &want, ty.tol());
            let out = launch(
                &ty.name("swiglu_bwd"),
                g,
                &[
                    ty.buffer(&a),
                    ty.buffer(&b),
                    ty.buffer(&u),
                    ty.buffer(&Tensor::zeros(2 * n, DType::F32, &Device::Cpu).unwrap()),
                    Arg::Size(n),
                ],
            );
            let dab = Tensor::cat(&grads, 0).unwrap();
            assert_close(&format!("swiglu_bwd {at}"), &out[3], &dab, ty.tol());
        }
    }
}

#[test]
fn swiglu_of_a_packed_projection_is_swiglu_fwd_of_its_halves_bit_for_bit() {
    // rows [gate (n), up (n)], as a packed layer's one matmul gives them
    let (rows, n) = (7usize, 150usize);
    let gu = random(&[rows, 2 * n], 31, 2.0);
    for ty in TYS {
        let gu = ty.round(&gu);
        let half = |at: usize| gu.narrow(1, at, n).unwrap().contiguous().unwrap();
        let (gate, up) = (half(0), half(n));
        let count = rows * n;
        let zeros = gate.zeros_like().unwrap();
        let y = launch(
            &ty.name("swiglu_fwd"),
            launch::elems(count),
            &[
                ty.buffer(&gate),
                ty.buffer(&up),
                ty.buffer(&zeros),
                Arg::Size(count),
            ],
        );
        for g in [launch::elems(count), fewer_blocks(launch::elems(count), 1)] {
            let out = launch(
                &ty.name("swiglu_packed_fwd"),
                g,
                &[
                    ty.buffer(&gu),
                    ty.buffer(&zeros),
                    Arg::Int(n as i32),
                    Arg::Size(count),
                ],
            );
            let at = format!("{ty:?}, {} blocks", g.grid);
            assert_eq!(out[1], y[2], "swiglu_packed_fwd {at}");
            let want = (gate.silu().unwrap() * &up).unwrap();
            assert_close(&format!("swiglu_packed_fwd {at}"), &out[1], &want, ty.tol());
        }
    }
}

/// The rotation and its adjoint, each read and written head-major (`[B, H, T, D]` contiguous)
/// and in a projection's token-major order (`[B, T, H, D]`): the forward reads a projection's
/// rows in place, the backward writes its gradient back in their order.
#[test]
fn rope_and_its_adjoint_match_the_composed_op() {
    let (b, h, t, d) = (2, 3, 5, 8);
    let x = random(&[b, h, t, d], 7, 1.0);
    let u = random(&[b, h, t, d], 8, 1.0);
    // positions differ per batch row (left padding), so the cos / sin rows must be B's own
    let angles = random(&[b, 1, t, d], 9, 2.0);
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let pairs = b * h * t * d / 2;
    let head_major = [h * t * d, t * d, d];
    let token_major = [t * h * d, d, h * d];
    // [B, H, T, D] stored in token-major order, and back
    let to_tokens = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
    for ty in TYS {
        let (x, u, cos, sin) = (ty.round(&x), ty.round(&u), ty.round(&cos), ty.round(&sin));
        let (want, grads) = with_grads(&[&x], &u, |v| composed::rope(&v[0], &cos, &sin).unwrap());
        let cases = [
            (&x, 0, head_major, head_major, want.clone()),
            (&u, 1, head_major, head_major, grads[0].clone()),
            (&to_tokens(&x), 0, token_major, head_major, want.clone()),
            (&u, 1, head_major, token_major, to_tokens(&grads[0])),
        ];
        for (input, transpose, xs, ys, want) in cases {
            let y = launch(
                &ty.name("rope"),
                launch::elems(pairs),
                &[
                    ty.buffer(input),
                    ty.buffer(&cos),
                    ty.buffer(&sin),
                    ty.buffer(&x.zeros_like().unwrap()),
                    Arg::Int(h as i32),
                    Arg::Int(t as i32),
                    Arg::Int(d as i32),
                    Arg::Size(pairs),
                    Arg::Int(transpose),
                    Arg::Size(xs[0]),
                    Arg::Size(xs[1]),
                    Arg::Size(xs[2]),
                    Arg::Size(ys[0]),
                    Arg::Size(ys[1]),
                    Arg::Size(ys[2]),
                ],
            );
            let order = if xs == ys {
                "head-major"
            } else {
                "token-major"
            };
            assert_close(
                &format!("rope {ty:?} transpose={transpose} {order}"),
                &y[3],
                &want,
                ty.tol(),
            );
        }
    }
}

/// Causal mask with left padding on batch row 1 (its first 3 keys masked), finite as the
/// model's batches have it: `[B, 1, 1, T, S]` with the queries at the last T of S positions.
fn causal_bias(b: usize, t: usize, s: usize) -> Tensor {
    let mut v = vec![0f32; b * t * s];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..s {
                if j > s - t + i || (bi == 1 && j < 3) {
                    v[(bi * t + i) * s + j] = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 1, 1, t, s), &Device::Cpu).unwrap()
}

#[test]
fn masked_softmax_matches_the_composed_op() {
    let (b, hkv, g, t, s) = (2, 2, 3, 4, 37);
    let x = random(&[b, hkv, g, t, s], 10, 3.0);
    let bias = causal_bias(b, t, s);
    let scale = 0.3;
    let rows = b * hkv * g * t;
    for ty in TYS {
        let x = ty.round(&x);
        let want = composed::masked_softmax(&x, &bias, scale).unwrap();
        let y = launch(
            &ty.name("masked_softmax_fwd"),
            launch::rows(rows, s),
            &[
                ty.buffer(&x),
                Ty::F32.buffer(&bias),
                Arg::F32(vec![f32::NAN; rows * s]),
                Arg::Int((hkv * g) as i32),
                Arg::Int(t as i32),
                Arg::Int(s as i32),
                Arg::Float(scale as f32),
            ],
        );
        // f32 out from either input type: only the input's rounding differs
        assert_close(&format!("masked_softmax_fwd {ty:?}"), &y[2], &want, 1e-5);
    }
}

#[test]
fn chunked_attention_probabilities_match_the_composed_ops() {
    // a chunk of 4 query rows at rows 3..7 of 7 (the bias's rows for them), 37 keys
    let (b, hkv, g, len, s) = (2, 2, 3, 4, 37);
    let x = random(&[b, hkv, g, len, s], 21, 3.0);
    let dp = random(&[b, hkv, g, len, s], 22, 1.0);
    let bias = causal_bias(b, 7, s)
        .narrow(3, 3, len)
        .unwrap()
        .contiguous()
        .unwrap();
    let scale = 0.3;
    let rows = b * hkv * g * len;
    for ty in TYS {
        let (x, dp) = (ty.round(&x), ty.round(&dp));
        let p = composed::masked_softmax(&x, &bias, scale).unwrap(); // f32
        let dot = (&p * &dp).unwrap().sum_keepdim(D::Minus1).unwrap();
        let ds = ((dp.broadcast_sub(&dot).unwrap() * &p).unwrap() * scale).unwrap();
        let args = |extra: Vec<Arg>| {
            let mut a = vec![ty.buffer(&x), Ty::F32.buffer(&bias)];
            a.extend(extra);
            a.extend([
                Arg::Int((hkv * g) as i32),
                Arg::Int(len as i32),
                Arg::Int(s as i32),
                Arg::Float(scale as f32),
            ]);
            a
        };
        // the forward: probabilities in the scores' own type
        let forward = match ty {
            Ty::F32 => "masked_softmax_fwd_f32",
            Ty::Bf16 => "masked_softmax_fwd_bf16_bf16",
            Ty::F16 => "masked_softmax_fwd_f16_f16",
        };
        let y = launch(
            forward,
            launch::rows(rows, s),
            &args(vec![ty.buffer(&x.zeros_like().unwrap())]),
        );
        assert_close(forward, &y[2], &p, ty.tol());
        let empty = || ty.buffer(&x.zeros_like().unwrap());
        let out = launch(
            &ty.name("attention_probs_bwd"),
            launch::rows(rows, s),
            &args(vec![ty.buffer(&dp), empty(), empty()]),
        );
        assert_close(
            &format!("attention_probs_bwd p {ty:?}"),
            &out[3],
            &p,
            ty.tol(),
        );
        assert_close(
            &format!("attention_probs_bwd ds {ty:?}"),
            &out[4],
            &ds,
            ty.tol(),
        );
    }
}

#[test]
fn softmax_forward_and_backward_match_the_composed_op() {
    let (rows, n) = (3, 1300);
    let x = random(&[rows, n], 11, 4.0);
    let u = random(&[rows, n], 12, 1.0);
    let scale = 0.7;
    for ty in TYS {
        let (x, u) = (ty.round(&x), ty.round(&u));
        let want = composed::softmax_last_dim(&x).unwrap();
        let y = launch(
            &ty.name("softmax_fwd"),
            launch::rows(rows, n),
            &[
                ty.buffer(&x),
                ty.buffer(&x.zeros_like().unwrap()),
                Arg::Int(n as i32),
            ],
        );
        assert_close(&format!("softmax_fwd {ty:?}"), &y[1], &want, ty.tol());
        // backward of y = softmax(scale·x) in y's type, from the rounded probabilities
        let p = ty.round(&want);
        let dot = (&p * &u).unwrap().sum_keepdim(D::Minus1).unwrap();
        let dx = ((u.broadcast_sub(&dot).unwrap() * &p).unwrap() * scale).unwrap();
        let out = launch(
            &ty.name("softmax_bwd"),
            launch::rows(rows, n),
            &[
                ty.buffer(&p),
                ty.buffer(&u),
                ty.buffer(&x.zeros_like().unwrap()),
                Arg::Int(n as i32),
                Arg::Float(scale as f32),
            ],
        );
        assert_close(&format!("softmax_bwd {ty:?}"), &out[2], &dx, ty.tol());
    }
}

#[test]
fn log_probs_and_entropies_forward_and_backward_match_the_composed_ops() {
    let (rows, v) = (5, 3001);
    let targets = Tensor::new(&[0u32, 1500, 3000, 77, 2999], &Device::Cpu).unwrap();
    // the upstream of log-prob and entropy; none for the log-partition, an output the losses
    // do not take
    let g = Tensor::cat(
        &[
            random(&[rows, 2], 14, 1.0),
            Tensor::zeros((rows, 1), DType::F32, &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    // four random rows, and one rising: each thread's running max moves at every element
    let rising = Tensor::arange(0f32, v as f32, &Device::Cpu)
        .unwrap()
        .affine(8.0 / v as f64, -4.0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    for ty in TYS {
        for temperature in [1.0f64, 0.7] {
            let z = Tensor::cat(&[random(&[rows - 1, v], 13, 3.0), rising.clone()], 0).unwrap();
            let z = ty.round(&z);
            // the composed ops on the logits the kernel reads, at the temperature
            let f = |z: &Tensor| {
                let x = (z / temperature).unwrap();
                let lp = composed::logprob_gather(&x, &targets).unwrap();
                let h = composed::entropy(&x).unwrap();
                let m = x.max_keepdim(1).unwrap();
                let l = (x
                    .broadcast_sub(&m)
                    .unwrap()
                    .exp()
                    .unwrap()
                    .sum_keepdim(1)
                    .unwrap())
                .log()
                .unwrap()
                .add(&m)
                .unwrap()
                .squeeze(1)
                .unwrap();
                Tensor::stack(&[&lp, &h, &l], 1).unwrap() // [N, 3]
            };
            let (y, grads) = with_grads(&[&z], &g, |t| f(&t[0]));
            let inv_t = Arg::Float((1.0 / temperature) as f32);
            let what = format!("{ty:?} at T={temperature}");
            let out = launch(
                &ty.name("logprob_entropy_fwd"),
                launch::rows(rows, v),
                &[
                    ty.buffer(&z),
                    Arg::U32(targets.to_vec1().unwrap()),
                    Arg::F32(vec![f32::NAN; 3 * rows]),
                    Arg::Int(v as i32),
                    inv_t.clone(),
                ],
            );
            assert_close(&format!("logprob_entropy_fwd {what}"), &out[2], &y, 1e-5);
            let out = launch(
                &ty.name("logprob_entropy_bwd"),
                launch::rows(rows, v),
                &[
                    ty.buffer(&z),
                    Arg::U32(targets.to_vec1().unwrap()),
                    Arg::F32(y.flatten_all().unwrap().to_vec1().unwrap()),
                    Arg::F32(g.flatten_all().unwrap().to_vec1().unwrap()),
                    ty.buffer(&z.zeros_like().unwrap()),
                    Arg::Int(v as i32),
                    inv_t,
                ],
            );
            // dz in the logits' type: rounded to bf16 for bf16 kernels
            let tol = if ty == Ty::F32 { 1e-4 } else { 1e-2 };
            assert_close(
                &format!("logprob_entropy_bwd {what}"),
                &out[4],
                &grads[0],
                tol,
            );
        }
    }
}

#[test]
fn the_sampler_draws_what_the_host_draws() {
    // v = 700: the block's last 324 threads scan empty segments; v = 5000: five logits each.
    // (temperature, top_k, top_p): the full softmax, top-k alone (its k-th value tied), top-p
    // alone, both, a top-p that keeps one token, and greedy (which ignores truncation)
    let cases = [
        (0.7f32, 0usize, 1.0f32),
        (1.0, 40, 1.0),
        (0.7, 0, 0.9),
        (1.3, 25, 0.6),
        (1.0, 0, 1e-6),
        (0.0, 5, 0.5),
    ];
    for v in [700usize, 5000] {
        let rows = 4;
        let mut z = random(&[rows, v], 15, 3.0).to_vec2::<f32>().unwrap();
        // greedy ties: the first maximum wins, in another thread's segment than the second
        z[3][v / 3] = 20.0;
        z[3][v - 2] = 20.0;
        // row 0's maximum is the last of its segment (v = 5000), after four tokens just below it
        // that a top-p of 1e-6 must skip
        z[0][39] = 25.0;
        z[0][35..39].fill(24.99);
        // row 1's 40th largest logit tied three times
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| z[1][b].total_cmp(&z[1][a]));
        let kth = z[1][order[39]];
        z[1][order[40]] = kth;
        z[1][order[41]] = kth;
        let mut rng = Rng::new(16);
        // row 2 draws at the very end of the distribution
        let u: Vec<f32> = (0..rows)
            .map(|i| {
                if i == 2 {
                    0.999_999
                } else {
                    rng.uniform() as f32
                }
            })
            .collect();
        // bf16 and f16: the logits as a 16-bit output layer writes them, widened by the kernel
        // (the host draws from the same rounded values)
        for (ty, &(temperature, top_k, top_p)) in TYS
            .into_iter()
            .flat_map(|ty| cases.iter().map(move |c| (ty, c)))
        {
            let z: Vec<Vec<f32>> = match ty {
                Ty::F32 => z.clone(),
                Ty::Bf16 => z
                    .iter()
                    .map(|r| r.iter().map(|&x| bf16::from_f32(x).to_f32()).collect())
                    .collect(),
                Ty::F16 => z
                    .iter()
                    .map(|r| r.iter().map(|&x| f16::from_f32(x).to_f32()).collect())
                    .collect(),
            };
            let inv_t = if temperature > 0.0 {
                1.0 / temperature
            } else {
                0.0
            };
            let out = launch(
                &ty.name("sample_rows"),
                launch::sample_rows(rows),
                &[
                    ty.buffer(&Tensor::new(z.concat(), &Device::Cpu).unwrap()),
                    Arg::F32(u.clone()),
                    Arg::Float(inv_t),
                    Arg::Int(top_k as i32),
                    Arg::Float(top_p),
                    Arg::U32(vec![u32::MAX; rows]),
                    Arg::F32(vec![f32::NAN; rows]),
                    Arg::F32(vec![f32::NAN; rows]),
                    Arg::Int(v as i32),
                ],
            );
            let (Arg::U32(ids), lps, hs) = (&out[2], out[3].f32s(), out[4].f32s()) else {
                panic!("ids");
            };
            let p = SamplingParams {
                temperature,
                top_k,
                top_p,
            };
            for (i, row) in z.iter().enumerate() {
                let (want, lp, h) = model::sampling::draw(row, u[i] as f64, &p);
                let at = format!("{ty:?}, v {v}, {p:?}, row {i}");
                assert_eq!(ids[i] as usize, want, "token, {at}");
                assert!((lps[i] as f64 - lp).abs() < 1e-4, "log-prob, {at}");
                assert!((hs[i] as f64 - h).abs() < 1e-4, "entropy, {at}");
            }
            if temperature == 0.0 {
                assert_eq!(ids[3] as usize, v / 3, "the first of two maxima");
            }
            if top_p < 1e-3 {
                // only the maximum is kept (row 3: both of its tied maxima)
                for (i, row) in z.iter().enumerate() {
                    let best = row[model::sampling::argmax(row)];
                    assert_eq!(
                        row[ids[i] as usize], best,
                        "top-p keeps the maximum, row {i}"
                    );
                }
            }
        }
    }
}

#[test]
fn decode_qkv_adds_the_biases_rotates_and_writes_the_cache_slot() {
    // 3 rows, 6 query heads over 2 KV heads of 8, a cache of 5 slots written at slot 3
    let (b, hq, hkv, d, cap, slot) = (3usize, 6usize, 2usize, 8usize, 5usize, 3usize);
    let pairs = b * (hq + 2 * hkv) * d / 2;
    for ty in TYS {
        let r = |shape: &[usize], seed| ty.round(&random(shape, seed, 1.0));
        let (q, k, v) = (
            r(&[b, hq * d], 21),
            r(&[b, hkv * d], 22),
            r(&[b, hkv * d], 23),
        );
        let (qb, kb, vb) = (r(&[hq * d], 24), r(&[hkv * d], 25), r(&[hkv * d], 26));
        let (cos, sin) = (r(&[b, 1, 1, d], 27), r(&[b, 1, 1, d], 28));
        let (k_cache, v_cache) = (r(&[b, hkv, cap, d], 29), r(&[b, hkv, cap, d], 30));
        for with_bias in [true, false] {
            // the composed decode path: bias adds rounded to the type, rope, the cache's slice_set
            let add = |x: &Tensor, bias: &Tensor, heads: usize| {
                let x = if with_bias {
                    ty.round(&x.broadcast_add(bias).unwrap())
                } else {
                    x.clone()
                };
                x.reshape((b, heads, 1, d)).unwrap()
            };
            let rot = |x: Tensor| ty.round(&composed::rope(&x, &cos, &sin).unwrap());
            let want_q = rot(add(&q, &qb, hq));
            let at_slot = |cache: &Tensor, new: &Tensor| {
                cache
                    .slice_assign(&[0..b, 0..hkv, slot..slot + 1, 0..d], new)
                    .unwrap()
            };
            let want_k = at_slot(&k_cache, &rot(add(&k, &kb, hkv)));
            let want_v = at_slot(&v_cache, &add(&v, &vb, hkv));
            // the launcher's geometry (one block here), and 64 threads striding the 120 pairs
            let striding = Geometry {
                grid: 2,
                block: 32,
                shared_bytes: 0,
            };
            // q, k and v as three matmuls' outputs, or as column slices of one packed matmul's
            // rows [q | k | v]: k's buffer starts at row 0's k, v's at its v
            let (nq, nkv) = (hq * d, hkv * d);
            let packed = Tensor::cat(&[&q, &k, &v], 1).unwrap(); // [B, nq + 2·nkv]
            let from = |at: usize| {
                let flat = packed.flatten_all().unwrap();
                flat.narrow(0, at, flat.dim(0).unwrap() - at).unwrap()
            };
            let separate = [(q.clone(), nq), (k.clone(), nkv), (v.clone(), nkv)];
            let sliced = [
                (from(0), nq + 2 * nkv),
                (from(nq), nq + 2 * nkv),
                (from(nq + nkv), nq + 2 * nkv),
            ];
            for (layout, geometry) in [
                ("separate", launch::elems(pairs)),
                ("separate", striding),
                ("packed", launch::elems(pairs)),
            ] {
                let [(q, q_row), (k, k_row), (v, v_row)] = match layout {
                    "separate" => separate.clone(),
                    _ => sliced.clone(),
                };
                let rows = [
                    ty.buffer(&q),
                    ty.buffer(&k),
                    ty.buffer(&v),
                    Arg::Int(q_row as i32),
                    Arg::Int(k_row as i32),
                    Arg::Int(v_row as i32),
                    ty.buffer(&qb),
                    ty.buffer(&kb),
                    ty.buffer(&vb),
                    Arg::Int(i32::from(with_bias)),
                ];
                let inputs = [&cos, &sin, &k_cache, &v_cache];
                let dims = (b, hkv, hq / hkv, d, cap, slot);
                let out = decode_qkv_launch(ty, &rows, inputs, dims, geometry);
                let what = format!("decode_qkv {ty:?}, bias {with_bias}, {layout}, {geometry:?}");
                assert_close(&format!("{what}: q"), &out[8], &want_q, ty.tol());
                assert_close(&format!("{what}: k cache"), &out[9], &want_k, ty.tol());
                assert_close(&format!("{what}: v cache"), &out[10], &want_v, ty.tol());
            }
        }
    }
}

#[test]
fn decode_attention_matches_the_composed_ops_over_a_cache_view() {
    // (B, Hkv, G, D, S, capacity): Qwen2.5-0.5B's G and D; the kernel's largest G and D with
    // fewer keys than warps; a D that is no multiple of 32
    for (case, &(b, hkv, g, d, s, cap)) in [
        (3, 2, 7, 64, 37, 50),
        (2, 1, 16, 128, 3, 8),
        (2, 3, 1, 48, 20, 20),
    ]
    .iter()
    .enumerate()
    {
        let seed = 100 + 10 * case as u64;
        let q = random(&[b, hkv, g, d], seed, 1.0);
        let k_cache = random(&[b, hkv, cap, d], seed + 1, 1.0);
        let v_cache = random(&[b, hkv, cap, d], seed + 2, 1.0);
        let bias = causal_bias(b, 1, s); // [B, 1, 1, 1, S]: row 1 left-padded
        let scale = 1.0 / (d as f64).sqrt();
        for ty in TYS {
            let (q, k_cache, v_cache) = (ty.round(&q), ty.round(&k_cache), ty.round(&v_cache));
            let (k, v) = (
                k_cache.narrow(2, 0, s).unwrap(),
                v_cache.narrow(2, 0, s).unwrap(),
            );
            let scores = q
                .matmul(&k.t().unwrap())
                .unwrap()
                .reshape((b, hkv, g, 1, s))
                .unwrap();
            let probs = composed::masked_softmax(&scores, &bias, scale)
                .unwrap()
                .reshape((b, hkv, g, s))
                .unwrap();
            // [B, Hkv, G, D]
            let want = probs.matmul(&v.contiguous().unwrap()).unwrap();
            // the general kernel takes every D; the launcher picks the D ≤ 64 one when it can
            let families: &[&str] = if d <= 64 {
                &["decode_attention", "decode_attention_d64"]
            } else {
                &["decode_attention"]
            };
            assert_eq!(
                launch::decode_attention_kernel(d),
                *families.last().unwrap()
            );
            for family in families {
                let out = launch(
                    &ty.name(family),
                    launch::decode_attention(b * hkv),
                    &[
                        ty.buffer(&q),
                        ty.buffer(&k_cache),
                        ty.buffer(&v_cache),
                        Ty::F32.buffer(&bias),
                        ty.buffer(&q.zeros_like().unwrap()),
                        Arg::Int(hkv as i32),
                        Arg::Int(g as i32),
                        Arg::Int(s as i32),
                        Arg::Int(d as i32),
                        Arg::Size(cap * d),
                        Arg::Float(scale as f32),
                    ],
                );
                let at = format!("{family} {ty:?} B{b} Hkv{hkv} G{g} D{d} S{s}");
                assert_close(&at, &out[4], &want, ty.tol());
            }
        }
    }
}

/// A decode step's shapes: (B, Hkv, G, D, cache capacity, slot).
type DecodeDims = (usize, usize, usize, usize, usize, usize);

/// A decode step's inputs beside the projection rows: cos, sin `[B, D]`, the caches
/// `[B, Hkv, cap, D]` and the attention bias `[B, 1, 1, 1, slot + 1]`.
struct DecodeInputs {
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    bias: Tensor,
}

/// `decode_qkv` on `rows` (q, k, v, their row strides, their biases, the bias flag) with
/// `[cos, sin, k_cache, v_cache]` and `geometry`: its buffers (the rotated q at 8, the key and
/// value caches at 9, 10).
fn decode_qkv_launch(
    ty: Ty,
    rows: &[Arg],
    [cos, sin, k_cache, v_cache]: [&Tensor; 4],
    (b, hkv, g, d, cap, slot): DecodeDims,
    geometry: Geometry,
) -> Vec<Arg> {
    let hq = hkv * g;
    let mut args = rows.to_vec();
    args.extend([
        ty.buffer(cos),
        ty.buffer(sin),
        ty.buffer(&Tensor::zeros((b, hq * d), DType::F32, &Device::Cpu).unwrap()),
        ty.buffer(k_cache),
        ty.buffer(v_cache),
        Arg::Int(hq as i32),
        Arg::Int(hkv as i32),
        Arg::Int(d as i32),
        Arg::Int(cap as i32),
        Arg::Int(slot as i32),
        Arg::Size(b * (hq + 2 * hkv) * d / 2),
    ]);
    launch(&ty.name("decode_qkv"), geometry, &args)
}

/// The unfused step: `decode_qkv` on `rows` (q, k, v, their row strides, their biases, the bias
/// flag), then `decode_attention` over the cache it wrote: the two launches' buffers (the
/// epilogue's rotated q, key and value caches at 8, 9, 10; the attention at 4).
fn decode_two_launches(
    ty: Ty,
    rows: &[Arg],
    x: &DecodeInputs,
    dims: DecodeDims,
) -> (Vec<Arg>, Vec<Arg>) {
    let (b, hkv, g, d, cap, slot) = dims;
    let inputs = [&x.cos, &x.sin, &x.k_cache, &x.v_cache];
    let pairs = b * (hkv * g + 2 * hkv) * d / 2;
    let epilogue = decode_qkv_launch(ty, rows, inputs, dims, launch::elems(pairs));
    let zeros = Tensor::zeros((b, hkv * g * d), DType::F32, &Device::Cpu).unwrap();
    let attention = launch(
        &ty.name(launch::decode_attention_kernel(d)),
        launch::decode_attention(b * hkv),
        &[
            epilogue[8].clone(),
            epilogue[9].clone(),
            epilogue[10].clone(),
            Ty::F32.buffer(&x.bias),
            ty.buffer(&zeros),
            Arg::Int(hkv as i32),
            Arg::Int(g as i32),
            Arg::Int((slot + 1) as i32),
            Arg::Int(d as i32),
            Arg::Size(cap * d),
            Arg::Float((1.0 / (d as f64).sqrt()) as f32),
        ],
    );
    (epilogue, attention)
}

/// The fused step, `family` (`decode_qkv_attention` or its `_d64` entry) on `rows` as above and
/// `norm` (Qwen3's q and k norm weights `[D]` and epsilon) if any: its buffers (the key and value
/// caches at 10, 11; the attention at 13).
fn decode_fused(
    ty: Ty,
    family: &str,
    rows: &[Arg],
    norm: Option<(&Tensor, &Tensor, f32)>,
    x: &DecodeInputs,
    dims: DecodeDims,
) -> Vec<Arg> {
    let (b, hkv, g, d, cap, slot) = dims;
    let zeros = Tensor::zeros((b, hkv * g * d), DType::F32, &Device::Cpu).unwrap();
    let mut args = rows.to_vec();
    // without norms the norm weights' buffers are not read: cos stands in
    let (qn, kn, eps) = norm.unwrap_or((&x.cos, &x.cos, 1e-6));
    args.extend([
        ty.buffer(qn),
        ty.buffer(kn),
        Arg::Int(i32::from(norm.is_some())),
        Arg::Float(eps),
        ty.buffer(&x.cos),
        ty.buffer(&x.sin),
        ty.buffer(&x.k_cache),
        ty.buffer(&x.v_cache),
        Ty::F32.buffer(&x.bias),
        ty.buffer(&zeros),
        Arg::Int(hkv as i32),
        Arg::Int(g as i32),
        Arg::Int(d as i32),
        Arg::Int(cap as i32),
        Arg::Int(slot as i32),
        Arg::Float((1.0 / (d as f64).sqrt()) as f32),
    ]);
    launch(&ty.name(family), launch::decode_attention(b * hkv), &args)
}

/// A decode step's random inputs in `ty`'s precision, seeded.
fn decode_inputs(ty: Ty, dims: DecodeDims, seed: u64) -> DecodeInputs {
    let (b, hkv, _, d, cap, slot) = dims;
    let r = |shape: &[usize], k: u64| ty.round(&random(shape, seed + k, 1.0));
    DecodeInputs {
        cos: r(&[b, d], 2),
        sin: r(&[b, d], 3),
        k_cache: r(&[b, hkv, cap, d], 4),
        v_cache: r(&[b, hkv, cap, d], 5),
        bias: causal_bias(b, 1, slot + 1), // row 1 left-padded
    }
}

/// The projection rows' arguments: one packed matmul's rows `[q | k | v]` of `packed` (k's
/// buffer starts at row 0's k, v's at its v), the biases, and whether to add them.
fn decode_rows(
    ty: Ty,
    packed: &[f32],
    biases: &[Vec<f32>; 3],
    dims: DecodeDims,
    has_bias: bool,
) -> Vec<Arg> {
    let (_, hkv, g, d, ..) = dims;
    let (nq, nkv) = (hkv * g * d, hkv * d);
    let host = |v: &[f32]| ty.buffer(&Tensor::new(v, &Device::Cpu).unwrap());
    let row = Arg::Int((nq + 2 * nkv) as i32);
    vec![
        host(packed),
        host(&packed[nq..]),
        host(&packed[nq + nkv..]),
        row.clone(),
        row.clone(),
        row,
        host(&biases[0]),
        host(&biases[1]),
        host(&biases[2]),
        Arg::Int(i32::from(has_bias)),
    ]
}

/// A decode step's projections, flat `[B, Hq·D + 2·Hkv·D]`, and its q, k and v biases, seeded.
fn decode_projections(ty: Ty, dims: DecodeDims, seed: u64) -> (Vec<f32>, [Vec<f32>; 3]) {
    let (b, hkv, g, d, ..) = dims;
    let (nq, nkv) = (hkv * g * d, hkv * d);
    let host = |shape: &[usize], k: u64| {
        let t = ty.round(&random(shape, seed + k, 1.0));
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let biases = [host(&[nq], 6), host(&[nkv], 7), host(&[nkv], 8)];
    (host(&[b, nq + 2 * nkv], 1), biases)
}

#[test]
fn decode_qkv_attention_is_decode_qkv_then_decode_attention_bit_for_bit() {
    // (B, Hkv, G, D, capacity, slot): Qwen2.5-0.5B's G and D (the _d64 entry); the kernel's
    // largest G and D with fewer keys than warps; a D that is no multiple of 32
    for (case, &dims) in [
        (3, 2, 7, 64, 50, 36),
        (2, 1, 16, 128, 8, 2),
        (2, 3, 1, 48, 20, 19),
    ]
    .iter()
    .enumerate()
    {
        let seed = 300 + 10 * case as u64;
        let (b, hkv, g, d, _, slot) = dims;
        for ty in TYS {
            let (packed, biases) = decode_projections(ty, dims, seed);
            let rows = decode_rows(ty, &packed, &biases, dims, true);
            let x = decode_inputs(ty, dims, seed);
            let (epilogue, attention) = decode_two_launches(ty, &rows, &x, dims);
            // the general kernel takes every D; the launcher picks the D ≤ 64 one when it can
            let families: &[&str] = if d <= 64 {
                &["decode_qkv_attention", "decode_qkv_attention_d64"]
            } else {
                &["decode_qkv_attention"]
            };
            assert_eq!(
                launch::decode_qkv_attention_kernel(d),
                *families.last().unwrap()
            );
            for family in families {
                let fused = decode_fused(ty, family, &rows, None, &x, dims);
                let at = format!("{family} {ty:?} B{b} Hkv{hkv} G{g} D{d} slot {slot}");
                assert_eq!(fused[10], epilogue[9], "{at}: the key cache");
                assert_eq!(fused[11], epilogue[10], "{at}: the value cache");
                assert_eq!(fused[13], attention[4], "{at}: the attention");
            }
        }
    }
}

#[test]
fn decode_qkv_attention_norms_each_head_as_the_rms_norm_kernel_before_it_rotates() {
    // Qwen3's q/k norms: the fused launch against the two launches fed the heads normed on the
    // host as the RMSNorm kernel computes them (x·r·w rounded, r from the biased, rounded heads)
    // (B, Hkv, G, D, capacity, slot): Qwen3's D = 128; the _d64 entry at the kernel's largest G
    for (case, &dims) in [(2, 2, 3, 128, 12, 7), (1, 1, 16, 64, 5, 4)]
        .iter()
        .enumerate()
    {
        let seed = 400 + 10 * case as u64;
        let (b, hkv, g, d, _, slot) = dims;
        let (hq, eps) = (hkv * g, 1e-6f32);
        let (nq, nkv) = (hq * d, hkv * d);
        for ty in TYS {
            let (packed, biases) = decode_projections(ty, dims, seed);
            let r = |k: u64| ty.round(&random(&[d], seed + k, 1.0));
            let (qn, kn) = (ty.round(&r(9).affine(0.3, 1.0).unwrap()), r(10));
            let host = |t: &Tensor| t.to_vec1::<f32>().unwrap();
            let round = |x: f32| host(&ty.round(&Tensor::new(&[x], &Device::Cpu).unwrap()))[0];
            // the row with its biases added (rounded), each q and k head normed (rounded)
            let mut normed = packed.clone();
            let [qw, kw] = [host(&qn), host(&kn)];
            for row in normed.chunks_mut(nq + 2 * nkv) {
                for (at, bias) in [(0, &biases[0]), (nq, &biases[1]), (nq + nkv, &biases[2])] {
                    for (x, b) in row[at..at + bias.len()].iter_mut().zip(bias) {
                        *x = round(*x + b);
                    }
                }
                let weights = std::iter::repeat_n(&qw, hq).chain(std::iter::repeat_n(&kw, hkv));
                for (head, w) in row[..nq + nkv].chunks_mut(d).zip(weights) {
                    let ss: f32 = head.iter().map(|x| x * x).sum();
                    let inv = 1.0 / (ss / d as f32 + eps).sqrt();
                    for (x, w) in head.iter_mut().zip(w) {
                        *x = round(*x * inv * w);
                    }
                }
            }
            let x = decode_inputs(ty, dims, seed);
            // the reference: the epilogue on the normed row (no biases: added), the attention
            let (epilogue, attention) = decode_two_launches(
                ty,
                &decode_rows(ty, &normed, &biases, dims, false),
                &x,
                dims,
            );
            // the one launch, from the raw row with its biases and norms
            let family = launch::decode_qkv_attention_kernel(d);
            let rows = decode_rows(ty, &packed, &biases, dims, true);
            let fused = decode_fused(ty, family, &rows, Some((&qn, &kn, eps)), &x, dims);
            let at = format!("{family} with norms {ty:?} B{b} Hkv{hkv} G{g} D{d} slot {slot}");
            let t = |a: &Arg| Tensor::new(a.f32s().as_slice(), &Device::Cpu).unwrap();
            assert_eq!(fused[11], epilogue[10], "{at}: the value cache");
            assert_close(
                &format!("{at}: the key cache"),
                &fused[10],
                &t(&epilogue[9]),
                ty.tol(),
            );
            assert_close(
                &format!("{at}: the attention"),
                &fused[13],
                &t(&attention[4]),
                ty.tol(),
            );
        }
    }
}

/// What the flash kernels' three launches give: the forward's output (token-major) and rows'
/// log-partitions, dQ and Δ, each query head's dK and dV shares, and the keys the forward's and
/// dQ's walks visited.
struct Flash {
    y: Arg,
    lse: Arg,
    dq: Arg,
    delta: Arg,
    dk: Arg,
    dv: Arg,
    keys_visited: [u64; 2],
}

impl Flash {
    /// dK and dV, each query head's share summed over the G heads of its K/V head (`shares`:
    /// `[B, Hkv, G, S, D]`), against the composed ops' gradients of k and v.
    fn assert_dkv(&self, shares: (usize, usize, usize, usize, usize), want: &[Tensor], at: &str) {
        for (name, got, want) in [("dk", &self.dk, &want[0]), ("dv", &self.dv, &want[1])] {
            let got = Tensor::from_vec(got.f32s(), shares, &Device::Cpu)
                .unwrap()
                .sum(2)
                .unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&format!("{name} {at}"), &Arg::F32(got), want, 2e-2);
        }
    }
}

/// The flash kernels' forward, dQ and dK/dV (`kernels`), as the launchers run them, over `heads`
/// query heads (batch rows included) of `t` query rows against `s` keys of `d` columns: `args`
/// puts each launch's own buffers after q, k, v and the bias, and before the dimensions (and a
/// packed row's tables); `dy` is the upstream gradient, token-major.
fn flash_launches(
    ty: Ty,
    (fwd, dq_kernel, dkv_kernel): (&str, &str, &str),
    [heads, t, s, d]: [usize; 4],
    dy: Arg,
    args: impl Fn(&[Arg]) -> Vec<Arg>,
) -> Flash {
    let run = |kernel: &str, g: Geometry, rest: &[Arg]| {
        emulate(kernel, g, &args(rest)).unwrap_or_else(|e| panic!("{e}"))
    };
    let q_like = match ty {
        Ty::Bf16 => Arg::Bf16(vec![bf16::ZERO; heads * t * d]),
        Ty::F16 => Arg::F16(vec![f16::ZERO; heads * t * d]),
        Ty::F32 => panic!("the flash kernels are bf16 and f16"),
    };
    let rows = Arg::F32(vec![0f32; heads * t]);
    let geometry = launch::flash_attention(heads, t);
    let (out, [forward, _]) = run(fwd, geometry, &[q_like.clone(), rows.clone()]);
    let (y, lse) = (out[4].clone(), out[5].clone());
    let rest = [y.clone(), dy.clone(), lse.clone(), q_like, rows];
    let (out, [_, dq_walk]) = run(dq_kernel, geometry, &rest);
    let (dq, delta) = (out[7].clone(), out[8].clone());
    let per_head = Arg::F32(vec![0f32; heads * s * d]);
    let rest = [dy, lse.clone(), delta.clone(), per_head.clone(), per_head];
    let (out, _) = run(dkv_kernel, launch::flash_attention_dkv(heads, s), &rest);
    Flash {
        y,
        lse,
        dq,
        delta,
        dk: out[7].clone(),
        dv: out[8].clone(),
        keys_visited: [forward, dq_walk],
    }
}

#[test]
fn flash_attention_forward_and_backward_match_the_composed_ops() {
    // (B, Hkv, G, T, S, capacity, D): Qwen2.5-0.5B's G and D over two row tiles (the second
    // partial) and two key tiles; 37 rows after a 63-slot prompt, read from a cache view wider
    // than S; 5 rows after a 145-slot prompt (key tiles the rows see whole, and rows that fill
    // no warp); D = 128 over two partial row tiles and, in the backward, three key tiles of 32
    // and five query tiles of 16
    for (case, &(b, hkv, g, t, s, cap, d)) in [
        (2, 2, 7, 70, 70, 70, 64),
        (2, 1, 3, 37, 100, 120, 64),
        (2, 1, 1, 5, 150, 150, 64),
        (2, 1, 2, 70, 70, 80, 128),
    ]
    .iter()
    .enumerate()
    {
        let seed = 300 + 10 * case as u64;
        for ty in [Ty::Bf16, Ty::F16] {
            // q scaled up: peaked rows, whose max moves from one key tile to the next
            let q = ty.round(&random(&[b, hkv, g * t, d], seed, 2.0));
            let k_cache = ty.round(&random(&[b, hkv, cap, d], seed + 1, 1.0));
            let v_cache = ty.round(&random(&[b, hkv, cap, d], seed + 2, 1.0));
            let bias = causal_bias(b, t, s); // batch row 1 left-padded
                                             // query rows that see no valid key (padding queries): their output is never read and
                                             // their upstream gradient is 0, as in training (the kernels and the composed ops give
                                             // them different garbage)
            let sees: Vec<f32> = (0..b * hkv * g * t)
                .map(|i| {
                    let (bi, row) = (i / (hkv * g * t), i % t);
                    let visible = bias.i((bi, 0, 0, row)).unwrap().to_vec1::<f32>().unwrap();
                    f32::from(u8::from(visible.contains(&0.0)))
                })
                .collect();
            let sees = Tensor::from_vec(sees, (b, hkv, g * t, 1), &Device::Cpu).unwrap();
            // the upstream dO, 0 on padding queries
            let u = Ty::Bf16
                .round(&random(&[b, hkv, g * t, d], seed + 3, 1.0))
                .broadcast_mul(&sees)
                .unwrap();
            // the kernels' y and dy are token-major, [B, T, Hq·D] (model::attention::token_major):
            // back to [B, Hkv, G·T, D]
            let head_major = |a: &Arg| {
                let x = Tensor::from_vec(a.f32s(), (b, t, hkv * g, d), &Device::Cpu).unwrap();
                let x = x.transpose(1, 2).unwrap().contiguous().unwrap();
                Arg::F32(x.flatten_all().unwrap().to_vec1().unwrap())
            };
            // a kernel's rows with the padding queries' zeroed
            let seen = |a: &Arg, cols: usize| {
                let x = Tensor::from_vec(a.f32s(), (b, hkv, g * t, cols), &Device::Cpu).unwrap();
                Arg::F32(
                    x.broadcast_mul(&sees)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                )
            };
            let scale = 1.0 / (d as f64).sqrt();
            let (k, v) = (
                k_cache.narrow(2, 0, s).unwrap().contiguous().unwrap(),
                v_cache.narrow(2, 0, s).unwrap().contiguous().unwrap(),
            );
            let scores = |x: &[Tensor]| {
                x[0].matmul(&x[1].t().unwrap())
                    .unwrap()
                    .reshape((b, hkv, g, t, s))
                    .unwrap()
            };
            let (want, want_grads) = with_grads(&[&q, &k, &v], &u, |x| {
                composed::masked_softmax(&scores(x), &bias, scale)
                    .unwrap()
                    .reshape((b, hkv, g * t, s))
                    .unwrap()
                    .matmul(&x[2])
                    .unwrap() // [B, Hkv, G·T, D]
            });
            // the rows' log-partitions, over x = scale·S + bias
            let x = (scores(&[q.clone(), k.clone()]) * scale)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let want_lse = x.exp().unwrap().sum(D::Minus1).unwrap().log().unwrap();

            let kernel = launch::flash_attention_kernel(d, ty.dtype()).unwrap();
            let at = format!("B{b} Hkv{hkv} G{g} T{t} S{s} D{d} {ty:?}");
            let dims = [
                Arg::Int(hkv as i32),
                Arg::Int(g as i32),
                Arg::Int(t as i32),
                Arg::Int(s as i32),
                Arg::Size(cap * d),
                Arg::Float(scale as f32),
            ];
            let inputs = [
                ty.buffer(&q),
                ty.buffer(&k_cache),
                ty.buffer(&v_cache),
                Ty::F32.buffer(&bias),
            ];
            let args = |rest: &[Arg]| -> Vec<Arg> {
                inputs.iter().chain(rest).chain(&dims).cloned().collect()
            };
            let (dq_kernel, dkv_kernel) =
                launch::flash_attention_backward_kernels(d, ty.dtype()).unwrap();
            let dy = ty.buffer(&model::attention::token_major(&u, t).unwrap());
            let run = flash_launches(
                ty,
                (&kernel, &dq_kernel, &dkv_kernel),
                [b * hkv * g, t, s, d],
                dy,
                args,
            );
            let (y, lse) = (&run.y, &run.lse);
            let want = want.broadcast_mul(&sees).unwrap();
            let want_lse = want_lse
                .reshape((b, hkv, g * t, 1))
                .unwrap()
                .broadcast_mul(&sees)
                .unwrap();
            assert_close(
                &format!("{kernel} {at}"),
                &seen(&head_major(y), d),
                &want,
                ty.tol(),
            );
            assert_close(
                &format!("{kernel} lse {at}"),
                &seen(lse, 1),
                &want_lse,
                1e-5,
            );

            let (dq, delta) = (&run.dq, &run.delta);
            assert_close(&format!("{dq_kernel} {at}"), dq, &want_grads[0], 2e-2);
            // Δ = rowsum(dO∘O) from the kernel's own (bf16) output
            let y_t =
                Tensor::from_vec(head_major(y).f32s(), (b, hkv, g * t, d), &Device::Cpu).unwrap();
            let want_delta = (&u * &y_t).unwrap().sum(D::Minus1).unwrap();
            assert_close(&format!("{dq_kernel} delta {at}"), delta, &want_delta, 1e-5);

            run.assert_dkv(
                (b, hkv, g, s, d),
                &want_grads[1..],
                &format!("{dkv_kernel} {at}"),
            );
        }
    }
    assert_flash_names(
        |d, dtype| {
            launch::flash_attention_kernel(d, dtype)
                .zip(launch::flash_attention_backward_kernels(d, dtype))
                .map(|(f, (dq, dkv))| [f, dq, dkv])
        },
        [
            [
                [
                    "flash_attention_d64_bf16",
                    "flash_attention_bwd_dq_d64_bf16",
                    "flash_attention_bwd_dkv_d64_bf16",
                ],
                [
                    "flash_attention_d128_bf16",
                    "flash_attention_bwd_dq_d128_bf16",
                    "flash_attention_bwd_dkv_d128_bf16",
                ],
            ],
            [
                [
                    "flash_attention_d64_f16",
                    "flash_attention_bwd_dq_d64_f16",
                    "flash_attention_bwd_dkv_d64_f16",
                ],
                [
                    "flash_attention_d128_f16",
                    "flash_attention_bwd_dq_d128_f16",
                    "flash_attention_bwd_dkv_d128_f16",
                ],
            ],
        ],
    );
}

/// The flash kernels (forward, dQ, dK/dV) that `names(d, dtype)` gives: `want`'s for D = 64 and
/// 128 in bf16 and in f16 (as the source declares them), none for D = 96 or in f32.
fn assert_flash_names(
    names: impl Fn(usize, DType) -> Option<[String; 3]>,
    want: [[[&str; 3]; 2]; 2],
) {
    for (dtype, [d64, d128]) in [DType::BF16, DType::F16].into_iter().zip(want) {
        let want = [
            Some(d64.map(String::from)),
            Some(d128.map(String::from)),
            None,
        ];
        assert_eq!([64, 128, 96].map(|d| names(d, dtype)), want, "{dtype:?}");
    }
    assert_eq!([64, 128].map(|d| names(d, DType::F32)), [None, None]);
}

/// The flash kernels over a packed row (`_varlen`) against the composed ops under the dense mask
/// of its segments: a prompt head with three rows after it, a lone row, a second head with two,
/// over three tiles of query rows and of keys (the last tile's rows skip the first rows' keys
/// between the prompt and their own; some see none of its first key tile: the online softmax's
/// "nothing yet"), at D = 64 with G = 2 and at D = 128 with two K/V heads.
#[test]
fn varlen_flash_attention_matches_the_composed_ops_over_segments() {
    use model::attention::{varlen_rows, Segment};
    let lens = [
        (20, None),
        (70, Some(0)),
        (5, Some(0)),
        (41, Some(0)),
        (12, None),
    ];
    let lens = [&lens[..], &[(7, None), (20, Some(5)), (15, Some(5))]].concat();
    let mut segments: Vec<Segment> = Vec::new();
    for &(len, prefix) in &lens {
        let start = segments.last().map_or(0, |s| s.start + s.len);
        let prefix = prefix.map(|i: usize| (segments[i].start, segments[i].len));
        segments.push(Segment { start, len, prefix });
    }
    let n = segments.iter().map(|s| s.len).sum::<usize>();
    assert_eq!(n, 190);
    // the dense mask: row i sees its prefix and its own segment up to itself
    let mut visible = vec![false; n * n];
    for s in &segments {
        for i in s.start..s.start + s.len {
            for j in s.start..=i {
                visible[i * n + j] = true;
            }
            if let Some((p, len)) = s.prefix {
                for j in p..p + len {
                    visible[i * n + j] = true;
                }
            }
        }
    }
    let dense: Vec<f32> = visible
        .iter()
        .map(|&v| if v { 0.0 } else { -1e9 })
        .collect();
    let bias = Tensor::from_vec(dense, (1, 1, 1, n, n), &Device::Cpu).unwrap();
    // the tiles' bounds, from the mask
    let (seg, bounds) = varlen_rows(&segments, n);
    let tiles = n.div_ceil(64);
    let visible = &visible;
    for t in 0..tiles {
        let rows = t * 64..((t + 1) * 64).min(n);
        // a query tile's spans hold every key its rows see, and skip none it could
        let seen: Vec<bool> = (0..n)
            .map(|j| rows.clone().any(|i| visible[i * n + j]))
            .collect();
        let [a0, a1, b0] = [0, 1, 2].map(|i| bounds[3 * t + i] as usize);
        assert_eq!(Some(a0), seen.iter().position(|&s| s), "query tile {t}");
        assert!(seen[a0..]
            .iter()
            .enumerate()
            .all(|(j, &s)| !s || a0 + j < a1 || a0 + j >= b0));
        assert!(
            a1 == b0 || seen[a1 - 1] && seen[b0],
            "query tile {t}: [{a0}, {a1}), {b0}.."
        );
        let viewers = rows.flat_map(|j| (0..n).filter(move |&i| visible[i * n + j]));
        assert_eq!(
            bounds[3 * tiles + t] as usize,
            viewers.max().unwrap() + 1,
            "key tile {t}"
        );
    }
    // the last tile's rows of the first head's last row see its prompt and then their own keys
    assert_eq!(bounds[6..9], [0, 20, 95]);
    for (case, &(hkv, g, d)) in [(1usize, 2usize, 64usize), (2, 1, 128)].iter().enumerate() {
        let seed = 700 + 10 * case as u64;
        for ty in [Ty::Bf16, Ty::F16] {
            let q = ty.round(&random(&[1, hkv, g * n, d], seed, 2.0));
            let k = ty.round(&random(&[1, hkv, n, d], seed + 1, 1.0));
            let v = ty.round(&random(&[1, hkv, n, d], seed + 2, 1.0));
            let u = ty.round(&random(&[1, hkv, g * n, d], seed + 3, 1.0));
            let scale = 1.0 / (d as f64).sqrt();
            let scores = |x: &[Tensor]| {
                x[0].matmul(&x[1].t().unwrap())
                    .unwrap()
                    .reshape((1, hkv, g, n, n))
                    .unwrap()
            };
            let (want, want_grads) = with_grads(&[&q, &k, &v], &u, |x| {
                composed::masked_softmax(&scores(x), &bias, scale)
                    .unwrap()
                    .reshape((1, hkv, g * n, n))
                    .unwrap()
                    .matmul(&x[2])
                    .unwrap()
            });
            let (fwd, dq_kernel, dkv_kernel) =
                launch::flash_attention_varlen_kernels(d, ty.dtype()).unwrap();
            let at = format!("packed Hkv{hkv} G{g} N{n} D{d} {ty:?}");
            let dims = [
                Arg::Int(hkv as i32),
                Arg::Int(g as i32),
                Arg::Int(n as i32),
                Arg::Int(n as i32),
                Arg::Size(n * d),
                Arg::Float(scale as f32),
            ];
            let packing = [Arg::U32(seg.clone()), Arg::U32(bounds.clone())];
            let inputs = [
                ty.buffer(&q),
                ty.buffer(&k),
                ty.buffer(&v),
                Ty::F32.buffer(&bias.narrow(3, n - 1, 1).unwrap()), // never read
            ];
            let args = |rest: &[Arg]| -> Vec<Arg> {
                inputs
                    .iter()
                    .chain(rest)
                    .chain(&dims)
                    .chain(&packing)
                    .cloned()
                    .collect()
            };
            let dy = ty.buffer(&model::attention::token_major(&u, n).unwrap());
            let run = flash_launches(
                ty,
                (&fwd, &dq_kernel, &dkv_kernel),
                [hkv * g, n, n, d],
                dy,
                args,
            );
            let y_heads = Tensor::from_vec(run.y.f32s(), (1, n, hkv * g, d), &Device::Cpu)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            assert_close(
                &format!("{fwd} {at}"),
                &Arg::F32(y_heads.flatten_all().unwrap().to_vec1().unwrap()),
                &want,
                ty.tol(),
            );
            assert_close(&format!("{dq_kernel} {at}"), &run.dq, &want_grads[0], 2e-2);
            // the forward and dQ walk the key tiles that model::attention::varlen_work counts (dQ's
            // tiles of KT keys: FLASH_KEYS at D = 64, half at D = 128), for every query head
            let dq_tile = if d == 64 { FLASH_KEYS } else { FLASH_KEYS / 2 };
            let walks = [FLASH_KEYS, dq_tile].map(|tile| {
                let [visited, ..] = model::attention::varlen_work(&segments, n, tile);
                (hkv * g * visited) as u64
            });
            assert_eq!(
                run.keys_visited, walks,
                "{at}: keys the forward and dQ visit"
            );
            run.assert_dkv(
                (1, hkv, g, n, d),
                &want_grads[1..],
                &format!("{dkv_kernel} {at}"),
            );
        }
    }
    assert_flash_names(
        |d, dtype| launch::flash_attention_varlen_kernels(d, dtype).map(<[String; 3]>::from),
        [
            [
                [
                    "flash_attention_varlen_d64_bf16",
                    "flash_attention_varlen_bwd_dq_d64_bf16",
                    "flash_attention_varlen_bwd_dkv_d64_bf16",
                ],
                [
                    "flash_attention_varlen_d128_bf16",
                    "flash_attention_varlen_bwd_dq_d128_bf16",
                    "flash_attention_varlen_bwd_dkv_d128_bf16",
                ],
            ],
            [
                [
                    "flash_attention_varlen_d64_f16",
                    "flash_attention_varlen_bwd_dq_d64_f16",
                    "flash_attention_varlen_bwd_dkv_d64_f16",
                ],
                [
                    "flash_attention_varlen_d128_f16",
                    "flash_attention_varlen_bwd_dq_d128_f16",
                    "flash_attention_varlen_bwd_dkv_d128_f16",
                ],
            ],
        ],
    );
}

#[test]
fn the_launch_limits_match_the_kernel_source() {
    let define = |name: &str| -> usize {
        let line = SOURCE
            .lines()
            .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("no #define {name}"));
        line.trim().parse().unwrap()
    };
    assert_eq!(define("DECODE_MAX_G"), launch::DECODE_MAX_G);
    assert_eq!(define("DECODE_MAX_D"), launch::DECODE_MAX_D);
    assert_eq!(define("DECODE_SMALL_D"), launch::DECODE_SMALL_D);
    assert_eq!(define("DECODE_WARPS"), launch::DECODE_WARPS);
    assert_eq!(define("FLASH_WARPS"), launch::FLASH_WARPS);
    assert_eq!(define("FLASH_KEYS"), launch::FLASH_KEYS);
    assert_eq!(
        launch::flash_attention(1, 1).block as usize,
        32 * launch::FLASH_WARPS
    );
    assert_eq!(
        launch::decode_attention(1).block as usize,
        32 * launch::DECODE_WARPS
    );
}

/// Chunk tables for the multi-tensor kernels: three tensors over chunks of 300 elements (one of
/// several chunks with a short last one, one shorter than a chunk, one a chunk and one element).
const MULTI_SIZES: [usize; 3] = [1000, 7, 301];
const MULTI_CHUNK: usize = 300;

/// The arguments of a multi-tensor kernel that describe its tensors of `MULTI_SIZES` elements:
/// the sizes, and the chunk table (`chunk_param`, `chunk_index`, the chunk count).
fn multi_tensor_args() -> (Arg, [Arg; 3]) {
    let (param, index) = launch::chunk_table(&MULTI_SIZES, MULTI_CHUNK);
    let chunks = param.len() as i32;
    (
        Arg::U32(MULTI_SIZES.iter().map(|&n| n as u32).collect()),
        [Arg::U32(param), Arg::U32(index), Arg::Int(chunks)],
    )
}

#[test]
fn sum_squares_sums_each_chunk() {
    // f32 gradients, and bf16 ones as a bf16 parameter's backward leaves them
    for ty in TYS {
        let grads: Vec<Tensor> = MULTI_SIZES
            .iter()
            .enumerate()
            .map(|(i, &n)| ty.round(&random(&[n], 30 + i as u64, 1.0)))
            .collect();
        let (chunk_param, chunk_index) = launch::chunk_table(&MULTI_SIZES, MULTI_CHUNK);
        let values: Vec<Vec<f32>> = grads.iter().map(|g| g.to_vec1().unwrap()).collect();
        let want: Vec<f32> = chunk_param
            .iter()
            .zip(&chunk_index)
            .map(|(&i, &k)| {
                let g = &values[i as usize];
                let start = k as usize * MULTI_CHUNK;
                let end = (start + MULTI_CHUNK).min(g.len());
                g[start..end]
                    .iter()
                    .map(|&x| x as f64 * x as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let total: f64 = want.iter().map(|&x| x as f64).sum();
        let n_chunks = want.len();
        let want = Tensor::new(want, &Device::Cpu).unwrap();
        let (sizes, table) = multi_tensor_args();
        let geometry = launch::multi_tensor(n_chunks);
        for geometry in [geometry, fewer_blocks(geometry, 2)] {
            let mut args = vec![
                Arg::Table(grads.iter().map(|g| Some(ty.buffer(g))).collect()),
                sizes.clone(),
            ];
            args.extend(table.iter().cloned());
            args.extend([
                Arg::Int(MULTI_CHUNK as i32),
                Arg::F32(vec![f32::NAN; n_chunks]),
            ]);
            let out = launch(&ty.name("sum_squares"), geometry, &args);
            assert_close("sum_squares", &out[4], &want, 1e-6);
            let got: f64 = out[4].f32s().iter().map(|&x| x as f64).sum();
            assert!((got / total - 1.0).abs() < 1e-6, "{ty:?}: {got} vs {total}");
        }
    }
}

#[test]
fn adamw_matches_pytorchs_update() {
    // torch.optim.AdamW: m = β1 m + (1−β1) g, v = β2 v + (1−β2) g², w ← w(1 − lr·λ) −
    // lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + ε), on the clipped gradient, in f64 here; every
    // parameter in one launch, in place, the second without weight decay
    let (beta1, beta2, eps, lr, wd, step, clip) = (0.9, 0.95, 1e-8, 1e-3, 0.1, 3, 0.5);
    let (bias1, bias2) = (1.0 - f64::powi(beta1, step), 1.0 - f64::powi(beta2, step));
    let decays: Vec<f32> = [lr * wd, 0.0, lr * wd].iter().map(|&d| d as f32).collect();
    let vec = |t: Tensor| t.to_vec1::<f32>().unwrap();
    let params: Vec<[Vec<f32>; 4]> = MULTI_SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let seed = 17 + 4 * i as u64;
            [
                vec(random(&[n], seed, 1.0)),
                vec(random(&[n], seed + 1, 1.0)),
                vec(random(&[n], seed + 2, 0.1)),
                vec(random(&[n], seed + 3, 0.1).sqr().unwrap()),
            ]
        })
        .collect();
    let (sizes, table) = multi_tensor_args();
    let n_chunks = launch::chunk_table(&MULTI_SIZES, MULTI_CHUNK).0.len();
    // f32 parameters (no compute copy), bf16 and f16 ones (the copy rewritten from the master),
    // and bf16 and f16 ones whose gradient is in their dtype too (as their backward leaves it)
    for (ty, grad_ty, kernel) in [
        (Ty::F32, Ty::F32, "adamw_f32"),
        (Ty::Bf16, Ty::F32, "adamw_bf16"),
        (Ty::Bf16, Ty::Bf16, "adamw_bf16_bf16"),
        (Ty::F16, Ty::F32, "adamw_f16"),
        (Ty::F16, Ty::F16, "adamw_f16_f16"),
    ] {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|[_, g, _, _]| grad_ty.round(&Tensor::new(g.as_slice(), &Device::Cpu).unwrap()))
            .collect();
        let grad_values: Vec<Vec<f32>> = grads.iter().map(|g| vec(g.clone())).collect();
        let want: Vec<[Vec<f32>; 3]> = params
            .iter()
            .zip(&grad_values)
            .zip(&decays)
            .map(|(([w0, _, m0, v0], g0), &decay)| {
                let mut out = [vec![], vec![], vec![]];
                for i in 0..w0.len() {
                    let gi = g0[i] as f64 * clip;
                    let mi = beta1 * m0[i] as f64 + (1.0 - beta1) * gi;
                    let vi = beta2 * v0[i] as f64 + (1.0 - beta2) * gi * gi;
                    let wi = w0[i] as f64 * (1.0 - decay as f64)
                        - lr / bias1 * mi / (vi.sqrt() / bias2.sqrt() + eps);
                    out[0].push(wi as f32);
                    out[1].push(mi as f32);
                    out[2].push(vi as f32);
                }
                out
            })
            .collect();
        let addresses: Vec<Option<Arg>> = params
            .iter()
            .zip(&grads)
            .flat_map(|([w, _, m, v], g)| {
                let copy = match ty {
                    Ty::F32 => None,
                    Ty::Bf16 => Some(Arg::Bf16(vec![bf16::NAN; w.len()])),
                    Ty::F16 => Some(Arg::F16(vec![f16::NAN; w.len()])),
                };
                [
                    Some(Arg::F32(w.clone())),
                    Some(grad_ty.buffer(g)),
                    Some(Arg::F32(m.clone())),
                    Some(Arg::F32(v.clone())),
                    copy,
                ]
            })
            .collect();
        let geometry = launch::multi_tensor(n_chunks);
        for geometry in [geometry, fewer_blocks(geometry, 2)] {
            let mut args = vec![
                Arg::Table(addresses.clone()),
                sizes.clone(),
                Arg::F32(decays.clone()),
            ];
            args.extend(table.iter().cloned());
            args.extend([
                Arg::Int(MULTI_CHUNK as i32),
                Arg::Float(beta1 as f32),
                Arg::Float(beta2 as f32),
                Arg::Float(eps as f32),
                Arg::Float((lr / bias1) as f32),
                Arg::Float(bias2.sqrt() as f32),
                Arg::Float(clip as f32),
            ]);
            let out = launch(kernel, geometry, &args);
            let Arg::Table(got) = &out[0] else {
                panic!("no table")
            };
            for (i, want) in want.iter().enumerate() {
                let at = |what: &str| format!("{kernel}, {} blocks, {what} {i}", geometry.grid);
                let entry = |k: usize| got[5 * i + k].as_ref().unwrap();
                let t = |v: &Vec<f32>| Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
                for (k, what) in [(0, "w"), (2, "m"), (3, "v")] {
                    let slot = if k == 0 { 0 } else { k - 1 };
                    assert_close(&at(what), entry(k), &t(&want[slot]), 1e-6);
                }
                assert_eq!(entry(1), &grad_ty.buffer(&grads[i]), "{}", at("g"));
                if ty != Ty::F32 {
                    // the copy is the new master rounded to the parameter's dtype
                    let copy = Tensor::new(entry(0).f32s(), &Device::Cpu).unwrap();
                    assert_close(&at("copy"), entry(4), &ty.round(&copy), 1e-9);
                } else {
                    assert!(got[5 * i + 4].is_none());
                }
            }
        }
    }
}

#[test]
fn every_kernel_is_emulated_by_a_test() {
    let this = include_str!("kernel_emulation.rs");
    let names: BTreeSet<String> = kernel_names().into_iter().collect();
    assert!(names.len() >= 20, "found {} kernels", names.len());
    let untested: Vec<&String> = names
        .iter()
        .filter(|k| {
            let family = ["_f32", "_bf16", "_f16", "_bf16", "_f16"]
                .iter()
                .fold(k.as_str(), |k, suffix| k.trim_end_matches(suffix));
            // a family's kernels are launched as `ty.name("family")` (the family named in a
            // literal) or by their full name
            !this.contains(&format!("\"{k}\"")) && !this.contains(&format!("\"{family}\""))
        })
        .collect();
    assert!(untested.is_empty(), "kernels without a test: {untested:?}");
}

/// `kernels/emu/fake_cuda.cpp`, the CPU stand-in for the CUDA libraries that
/// `scripts/fake-gpu.sh` runs the `cuda` build against, compiles for each of its four libraries
/// with today's kernels (its launches read each kernel's parameters by its C++ signature), so that
/// it does not fall behind `ferrite.cu` on machines without the CUDA toolkit.
#[test]
fn the_fake_cuda_libraries_compile_against_the_kernels() {
    let dir = generated_sources();
    let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emu");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    for lib in 1..=4 {
        let out = Command::new(&cxx)
            .args(["-std=c++20", "-fsyntax-only", "-fPIC"])
            .arg(format!("-DFAKE_CUDA_LIB={lib}"))
            .arg("-I")
            .arg(&emu)
            .arg("-I")
            .arg(dir)
            .arg(emu.join("fake_cuda.cpp"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fake_cuda.cpp (library {lib}) does not compile:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_emulator_rejects_what_the_gpu_would_reject() {
    let args = [
        Arg::F32(vec![1.0; 64]),
        Arg::F32(vec![0.0; 64]),
        Arg::Int(64),
    ];
    // too many threads, too much shared memory, arguments of the wrong type or number
    let big = Geometry {
        grid: 1,
        block: 2048,
        shared_bytes: 0,
    };
    assert!(try_launch("softmax_fwd_f32", big, &args).is_err());
    let shared = Geometry {
        shared_bytes: 64 * 1024,
        ..launch::rows(1, 64)
    };
    assert!(try_launch("softmax_fwd_f32", shared, &args).is_err());
    let wrong = [
        Arg::F32(vec![1.0; 64]),
        Arg::F32(vec![0.0; 64]),
        Arg::Size(64),
    ];
    assert!(try_launch("softmax_fwd_f32", launch::rows(1, 64), &wrong).is_err());
    assert!(try_launch("softmax_fwd_f32", launch::rows(1, 64), &args[..2]).is_err());
    assert!(try_launch("no_such_kernel", launch::rows(1, 64), &args).is_err());
    // a shared-memory race, a read past the end of a buffer (see driver.cpp)
    let one_warp = launch::rows(1, 32);
    let err = try_launch("emu_racy", one_warp, &[Arg::F32(vec![0.0; 32])]).unwrap_err();
    assert!(err.contains("race on shared `cell`"), "{err}");
    let err = try_launch(
        "emu_overflow",
        one_warp,
        &[Arg::F32(vec![0.0; 32]), Arg::F32(vec![0.0; 32])],
    )
    .unwrap_err();
    assert!(err.contains("heap-buffer-overflow"), "{err}");
    // past a thread's own array, on its fiber's stack (thread 4 reads own[4])
    let err = try_launch(
        "emu_stack_overflow",
        one_warp,
        &[Arg::F32(vec![0.0; 32]), Arg::Int(0)],
    )
    .unwrap_err();
    assert!(err.contains("stack-buffer-overflow"), "{err}");
    let four = Geometry {
        grid: 1,
        block: 4,
        shared_bytes: 0,
    };
    let within = try_launch(
        "emu_stack_overflow",
        four,
        &[Arg::F32(vec![0.0; 4]), Arg::Int(0)],
    )
    .unwrap();
    assert_eq!(within[0].f32s(), [1.0, 2.0, 3.0, 4.0]);
    // a thread that reads what the grid's previous thread wrote (no barrier): right first to
    // last only, across blocks and within one
    let chain = |grid, block| {
        let g = Geometry {
            grid,
            block,
            shared_bytes: 0,
        };
        try_launch("emu_chain", g, &[Arg::F32(vec![0.0; 4])])
    };
    for (grid, block) in [(4, 1), (1, 4), (2, 2)] {
        let err = chain(grid, block).unwrap_err();
        let want = format!("depends on the order its {grid} blocks of {block} threads run");
        assert!(err.contains(&want), "{err}");
    }
    assert_eq!(chain(1, 1).unwrap()[0].f32s(), [1.0, 0.0, 0.0, 0.0]);
    // two bf16 elements loaded as one u32 at an odd element: a misaligned address
    let pair = |offset| {
        try_launch(
            "emu_misaligned",
            launch::rows(1, 32),
            &[
                Arg::Bf16(vec![bf16::ONE; 4]),
                Arg::F32(vec![0.0; 32]),
                Arg::Int(offset),
            ],
        )
    };
    assert_eq!(
        pair(2).unwrap()[1].f32s(),
        [f32::from(bf16::ONE.to_bits()); 32]
    );
    let err = pair(1).unwrap_err();
    assert!(err.contains("a misaligned 4-byte access"), "{err}");
    // a deadlock fails the launch rather than hanging it
    let two_warps = launch::rows(1, 64);
    let err = try_launch("emu_deadlock", two_warps, &[Arg::F32(vec![0.0; 64])]).unwrap_err();
    assert!(err.contains("deadlock"), "{err}");
    // cp.async: the data (and a copy that is not valid: zeros) once waited for before the
    // barrier; read while in flight (thread 0 waits after the barrier), a race
    let x: Vec<f32> = (1..=8).map(|i| i as f32).collect();
    let copied = try_launch(
        "emu_async_copy",
        one_warp,
        &[Arg::F32(x.clone()), Arg::F32(vec![0.0; 32]), Arg::Int(1)],
    )
    .unwrap();
    let want: Vec<f32> = (0..32)
        .map(|i| if i % 8 < 4 { x[i % 8] } else { 0.0 })
        .collect();
    assert_eq!(copied[1].f32s(), want);
    let err = try_launch(
        "emu_async_copy",
        one_warp,
        &[Arg::F32(x), Arg::F32(vec![0.0; 32]), Arg::Int(0)],
    )
    .unwrap_err();
    assert!(err.contains("race on shared `cell`"), "{err}");
    let ok = try_launch("softmax_fwd_f32", launch::rows(1, 64), &args).unwrap();
    assert!((ok[1].f32s().iter().sum::<f32>() - 1.0).abs() < 1e-6);
}
