//! The weight's gradient of a 3x3 convolution by F(2x2, 3x3), transposed.
//!
//! `∂L/∂g[o, i] = Σ over 2x2 output tiles of the 3x3 correlation of the tile's 4x4 input
//! patch `d` with its 2x2 output gradient `e`. Written as the forward pass's trilinear
//! form `Σ e·Y = Σ_ξ (A e Aᵀ)_ξ (G g Gᵀ)_ξ (Bᵀ d B)_ξ`, that is
//! `Gᵀ [Σ_tiles (A e Aᵀ) ⊙ (Bᵀ d B)] G`: the sum over tiles happens between the
//! transforms, as sixteen `[outputs, tiles] x [tiles, inputs]` products, 16
//! multiplications per tile and channel pair where the direct sum spends 36. The inputs
//! take the forward pass's transform; the gradients' transform and the last one use
//! only 0, ±1 and ±½ as well.
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{
    input_transform, parallel_for, rank_one_updates, status, whole_lanes, with_scratch, Call, Grid,
    Isa, Lane, Scratch, Source, Unfit, Unit, Vector, BLOCK, LANES, POINTS,
};
use std::cell::RefCell;

/// Most floats the parts' sums may hold together (64 MiB): more threads than that
/// allows share parts.
const MAX_SUM_FLOATS: usize = 16 << 20;

/// `out` `[outputs, inputs, 3, 3]` = the gradient of a stride-1, padding-1 3x3
/// convolution's weight, from its channels-last `input` `[n, h, w, inputs]` and the
/// gradient `grad` `[n, h, w, outputs]` of its output. Runs on libtorch's intra-op
/// threads; the sums' order depends on their number alone.
pub fn weight_gradient(
    isa: Isa,
    input: Source,
    grad: Source,
    (n, h, w): (usize, usize, usize),
    out: &mut [f32],
) -> Result<(), Unfit> {
    whole_lanes(input.channels)?;
    whole_lanes(grad.channels)?;
    super::check_len(input.pixels.len(), n * h * w * input.channels)?;
    super::check_len(grad.pixels.len(), n * h * w * grad.channels)?;
    super::check_len(out.len(), grad.channels * input.channels * 9)?;
    let grid = Grid::new(h, w);
    let jobs = n * grid.blocks;
    if jobs == 0 {
        // No tile: no part would set its sums, so none may be read.
        out.fill(0.0);
        return Ok(());
    }
    let part_len = part_lanes(input, grad);
    let parts = jobs
        .min(tch::get_num_threads().max(1) as usize)
        .min((MAX_SUM_FLOATS / (part_len * LANES)).max(1))
        .max(1);
    let shape = Shape {
        grid,
        input,
        grad,
        jobs,
        parts,
    };
    let len = parts * part_len;
    SUMS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut sums) => {
            if sums.len() < len {
                sums.resize(len, [0.0; LANES]);
            }
            sum_parts(isa, shape, &mut sums[..len], out)
        }
        Err(_) => sum_parts(isa, shape, &mut vec![[0.0; LANES]; len], out),
    })
}

thread_local! {
    /// The calling thread's buffer for the parts' sums, kept from call to call: zeroing
    /// a fresh one for every convolution cost more than the sums themselves.
    static SUMS: RefCell<Vec<Lane>> = const { RefCell::new(Vec::new()) };
}

/// Each part's sums on libtorch's threads, then their total transformed into `out`.
fn sum_parts(isa: Isa, shape: Shape, sums: &mut [Lane], out: &mut [f32]) -> Result<(), Unfit> {
    let (input, grad) = (shape.input, shape.grad);
    let base = super::SharedLanes(sums.as_mut_ptr());
    parallel_for(shape.parts, &|begin, end| {
        with_scratch(input.channels, grad.channels / LANES, |scratch| {
            for part in begin..end {
                let len = part_lanes(input, grad);
                // SAFETY: `sums` holds `parts` runs of `len` lanes, and only this part
                // touches its own.
                let sums = unsafe { std::slice::from_raw_parts_mut(base.at(part * len), len) };
                // SAFETY: `isa` proves the CPU runs its kernels.
                unsafe { part_on(isa, &shape, part, scratch, sums) };
            }
        })
    })
    .map_err(|()| Unfit::Threads)?;
    finish(sums, &shape, out)
}

/// What winograd.cpp calls for a training step's weight gradient: [`weight_gradient`] of
/// channels-last float32 `input` `[n, h, w, inputs]` and `grad` `[n, h, w, outputs]` into
/// `out` `[outputs, inputs, 3, 3]`. 1 when anything does not fit or a vector unit is
/// missing; it never unwinds into C++.
pub type WeightGradientKernel =
    extern "C" fn(*const f32, *const f32, i64, i64, i64, i64, i64, *mut f32) -> i32;

/// The [`WeightGradientKernel`] winograd.cpp calls.
pub extern "C" fn weight_gradient_kernel(
    input: *const f32,
    grad: *const f32,
    n: i64,
    h: i64,
    w: i64,
    inputs: i64,
    outputs: i64,
    out: *mut f32,
) -> i32 {
    status(|| {
        let call = Call::new([n, h, w, inputs, outputs])?;
        if input.is_null() || grad.is_null() || out.is_null() {
            return None;
        }
        let (inputs, outputs) = (call.inputs, call.outputs);
        // SAFETY: winograd.cpp passes contiguous tensors of exactly these sizes, which it
        // holds for the call; only `out`, new, is written.
        let (input, grad, out) = unsafe {
            (
                std::slice::from_raw_parts(input, call.pixels.checked_mul(inputs)?),
                std::slice::from_raw_parts(grad, call.pixels.checked_mul(outputs)?),
                std::slice::from_raw_parts_mut(out, call.filters),
            )
        };
        let (input, grad) = (
            Source {
                pixels: input,
                channels: inputs,
            },
            Source {
                pixels: grad,
                channels: outputs,
            },
        );
        weight_gradient(call.isa, input, grad, (call.n, call.h, call.w), out).ok()
    })
}

/// What every part of one weight gradient reads.
struct Shape<'a> {
    grid: Grid,
    input: Source<'a>,
    grad: Source<'a>,
    jobs: usize,
    parts: usize,
}

/// Lanes of one part's sums `[point][outputs][input lanes]`.
fn part_lanes(input: Source, grad: Source) -> usize {
    POINTS * grad.channels * input.channels / LANES
}

/// Adds the products of part `part`'s blocks (a fixed share of the jobs) into `sums`.
///
/// # Safety
/// The CPU has `isa`.
unsafe fn part_on(isa: Isa, shape: &Shape, part: usize, scratch: &mut Scratch, sums: &mut [Lane]) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (isa, shape, part, scratch, sums);
    #[cfg(target_arch = "x86_64")]
    match isa.0 {
        Unit::Avx512 => part_avx512(shape, part, scratch, sums),
        Unit::Avx2 => part_avx2(shape, part, scratch, sums),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn part_avx512(shape: &Shape, part: usize, scratch: &mut Scratch, sums: &mut [Lane]) {
    // 16 of the 32 registers accumulate: 8 outputs x 2 lanes of inputs, or 16 x 1.
    if (shape.input.channels / LANES).is_multiple_of(2) {
        part_with::<x86::Zmm, 2, 8>(shape, part, scratch, sums)
    } else {
        part_with::<x86::Zmm, 1, 16>(shape, part, scratch, sums)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn part_avx2(shape: &Shape, part: usize, scratch: &mut Scratch, sums: &mut [Lane]) {
    // 8 of the 16 registers accumulate: 4 outputs x one lane of two registers.
    part_with::<x86::Ymm2, 1, 4>(shape, part, scratch, sums)
}

/// Each block of the part: both transforms into `scratch`, then the products added.
#[inline(always)]
unsafe fn part_with<V: Vector, const NB: usize, const R: usize>(
    shape: &Shape,
    part: usize,
    scratch: &mut Scratch,
    sums: &mut [Lane],
) {
    let grid = &shape.grid;
    let (begin, end) = (
        part * shape.jobs / shape.parts,
        (part + 1) * shape.jobs / shape.parts,
    );
    for job in begin..end {
        let (image, block) = (job / grid.blocks, job % grid.blocks);
        let first = block * BLOCK;
        let count = BLOCK.min(grid.tiles - first);
        let pixels = grid.h * grid.w;
        let (input, grad) = (
            shape.input.image(image, pixels),
            shape.grad.image(image, pixels),
        );
        let tiles = (first, count);
        input_transform::<V>(input.channels, grid, &[input], tiles, &mut scratch.v);
        grad_transform::<V>(grid, grad, tiles, &mut scratch.m);
        products::<V, NB, R>(shape, count, job == begin, scratch, sums);
    }
}

/// `(p, p + q, p - q, -q)`: one dimension of `A e Aᵀ`.
#[inline(always)]
unsafe fn expand_1d<V: Vector>(p: V, q: V) -> [V; 4] {
    [p, p.add(q), p.sub(q), V::splat(0.0).sub(q)]
}

/// `A e Aᵀ` for each tile's 2x2 output gradient `e` (zeros outside the image), lane by
/// lane of outputs, into `m` `[point][tile][outputs]`.
#[inline(always)]
unsafe fn grad_transform<V: Vector>(
    grid: &Grid,
    grad: Source,
    (first, count): (usize, usize),
    m: &mut [Lane],
) {
    let lanes = grad.channels / LANES;
    let pixels = grad.pixels.as_chunks::<LANES>().0;
    for t in 0..count {
        let (y, x) = grid.origin(first + t);
        for lane in 0..lanes {
            let mut e = [[V::splat(0.0); 2]; 2];
            for (a, row) in e.iter_mut().enumerate() {
                for (b, value) in row.iter_mut().enumerate() {
                    *value = V::load(grid.lane(pixels, lanes, (y + a, x + b), lane));
                }
            }
            let top = expand_1d(e[0][0], e[0][1]);
            let bottom = expand_1d(e[1][0], e[1][1]);
            for j in 0..4 {
                let column = expand_1d(top[j], bottom[j]);
                for (i, value) in column.into_iter().enumerate() {
                    value.store(&mut m[((i * 4 + j) * BLOCK + t) * lanes + lane]);
                }
            }
        }
    }
}

/// `sums[point] += mᵀ[point] . v[point]` over the block's `count` tiles, for every
/// point (`=` for a part's first block, so the sums need no zeroing): `R` outputs by
/// `NB` lanes of inputs at a time, the sums in registers while the tiles stream past.
#[inline(always)]
unsafe fn products<V: Vector, const NB: usize, const R: usize>(
    shape: &Shape,
    count: usize,
    first: bool,
    scratch: &Scratch,
    sums: &mut [Lane],
) {
    let (outputs, input_lanes) = (shape.grad.channels, shape.input.channels / LANES);
    for point in 0..POINTS {
        let v = &scratch.v[point * BLOCK * input_lanes..][..count * input_lanes];
        let m = &scratch.m.as_flattened()[point * BLOCK * outputs..][..count * outputs];
        let sums = &mut sums[point * outputs * input_lanes..][..outputs * input_lanes];
        for o in (0..outputs).step_by(R) {
            for lane in (0..input_lanes).step_by(NB) {
                tile_sum::<V, NB, R>(
                    v,
                    input_lanes,
                    &m[o..],
                    outputs,
                    (count, first),
                    &mut sums[o * input_lanes + lane..],
                    lane,
                );
            }
        }
    }
}

/// `R` rows (outputs) by `NB` lanes (inputs from `lane`) of the sums, plus (or, if
/// `first`, set to) the products over `count` tiles of `m`'s `R` outputs (rows of
/// `outputs` floats) with `v`'s lanes (rows of `input_lanes`).
#[inline(always)]
unsafe fn tile_sum<V: Vector, const NB: usize, const R: usize>(
    v: &[Lane],
    input_lanes: usize,
    m: &[f32],
    outputs: usize,
    (count, first): (usize, bool),
    sums: &mut [Lane],
    lane: usize,
) {
    if sums.len() < (R - 1) * input_lanes + NB {
        return;
    }
    let mut acc = [[V::splat(0.0); NB]; R];
    if !first {
        for (r, row) in acc.iter_mut().enumerate() {
            for (j, a) in row.iter_mut().enumerate() {
                *a = V::load(&sums[r * input_lanes + j]);
            }
        }
    }
    let v = v.get(lane..).unwrap_or_default();
    if !rank_one_updates(&mut acc, m, (1, outputs), v, input_lanes, count) {
        return;
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            a.store(&mut sums[r * input_lanes + j]);
        }
    }
}

/// `(a0 + ½(a1 + a2), ½(a1 - a2), ½(a1 + a2) + a3)` lane by lane: one dimension of
/// `Gᵀ s G`.
fn shrink_1d(a: [&Lane; 4]) -> [Lane; 3] {
    let mut out = [[0.0; LANES]; 3];
    for k in 0..LANES {
        let (plus, minus) = (0.5 * (a[1][k] + a[2][k]), 0.5 * (a[1][k] - a[2][k]));
        out[0][k] = a[0][k] + plus;
        out[1][k] = minus;
        out[2][k] = plus + a[3][k];
    }
    out
}

/// `out[o, i] = Gᵀ (Σ_parts sums[o, i]) G` for every channel pair, a lane of inputs at
/// a time, output by output on libtorch's threads.
fn finish(sums: &[Lane], shape: &Shape, out: &mut [f32]) -> Result<(), Unfit> {
    let (inputs, outputs) = (shape.input.channels, shape.grad.channels);
    let input_lanes = inputs / LANES;
    let part_len = part_lanes(shape.input, shape.grad);
    let parts = shape.parts;
    let base = super::SharedOut(out.as_mut_ptr());
    parallel_for(outputs, &|begin, end| {
        for o in begin..end {
            // SAFETY: `out` holds outputs * inputs * 9 floats; this output's run of
            // inputs * 9 is written by this job alone.
            let out =
                unsafe { std::slice::from_raw_parts_mut(base.at(o * inputs * 9), inputs * 9) };
            for lane in 0..input_lanes {
                let mut s = [[0.0f32; LANES]; POINTS];
                for part in sums.chunks_exact(part_len).take(parts) {
                    for (point, sum) in s.iter_mut().enumerate() {
                        let lanes = &part[(point * outputs + o) * input_lanes + lane];
                        for (a, b) in sum.iter_mut().zip(lanes) {
                            *a += b;
                        }
                    }
                }
                let mut rows = [[[0.0; LANES]; 3]; 4];
                for (row, s) in rows.iter_mut().zip(s.chunks_exact(4)) {
                    *row = shrink_1d([&s[0], &s[1], &s[2], &s[3]]);
                }
                for kx in 0..3 {
                    let column =
                        shrink_1d([&rows[0][kx], &rows[1][kx], &rows[2][kx], &rows[3][kx]]);
                    for (ky, values) in column.iter().enumerate() {
                        for (k, value) in values.iter().enumerate() {
                            out[(lane * LANES + k) * 9 + ky * 3 + kx] = *value;
                        }
                    }
                }
            }
        }
    })
    .map_err(|()| Unfit::Threads)
}

#[cfg(test)]
mod tests {
    use super::super::super::simd::{units, values, worst_error};
    use super::*;

    /// The direct sum, one float at a time: `input` `[n, h, w, inputs]`, `grad`
    /// `[n, h, w, outputs]`, the result `[outputs, inputs, 3, 3]`.
    fn reference(
        input: &[f32],
        grad: &[f32],
        (n, h, w): (usize, usize, usize),
        (inputs, outputs): (usize, usize),
    ) -> Vec<f32> {
        let mut out = vec![0.0f64; outputs * inputs * 9];
        for pixel in 0..n * h * w {
            let (image, y, x) = (pixel / (h * w), pixel / w % h, pixel % w);
            for (dy, dx) in (0..3).flat_map(|dy| (0..3).map(move |dx| (dy, dx))) {
                let (py, px) = ((y + dy).wrapping_sub(1), (x + dx).wrapping_sub(1));
                if py >= h || px >= w {
                    continue;
                }
                let at = ((image * h + py) * w + px) * inputs;
                for o in 0..outputs {
                    let e = f64::from(grad[pixel * outputs + o]);
                    for i in 0..inputs {
                        out[(o * inputs + i) * 9 + dy * 3 + dx] += e * f64::from(input[at + i]);
                    }
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn winograd_weight_gradient_matches_the_direct_sum() {
        // Odd sizes (partial tiles), more tiles than a block and fewer, several images
        // (parts split between them), odd and even lanes of inputs (each micro-kernel).
        for (n, h, w, inputs, outputs) in [
            (2, 9, 7, 32, 16),
            (1, 13, 12, 16, 32),
            (3, 4, 5, 48, 64),
            (1, 1, 1, 32, 16),
            (2, 20, 18, 32, 32),
            // No images, after calls that left sums behind: zeros.
            (0, 4, 4, 16, 16),
        ] {
            let input = values(n * h * w * inputs, 1);
            let grad = values(n * h * w * outputs, 2);
            let expected = reference(&input, &grad, (n, h, w), (inputs, outputs));
            let input = Source {
                pixels: &input,
                channels: inputs,
            };
            let grad = Source {
                pixels: &grad,
                channels: outputs,
            };
            for isa in units() {
                let mut out = vec![f32::NAN; expected.len()];
                weight_gradient(isa, input, grad, (n, h, w), &mut out).unwrap();
                let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                let worst = worst_error(&out, &expected, |_| scale);
                assert!(
                    worst < 1e-5,
                    "{isa:?}, {n}x{h}x{w}, {inputs}->{outputs}: off by {worst}"
                );
            }
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let input = Source {
            pixels: &[0.0; 2 * 2 * 16],
            channels: 16,
        };
        let grad = Source {
            pixels: &[0.0; 2 * 2 * 32],
            channels: 32,
        };
        for isa in units() {
            let mut out = vec![0.0; 16 * 32 * 9];
            let short = Source {
                pixels: &[0.0; 2 * 2 * 16 - 1],
                channels: 16,
            };
            let err = weight_gradient(isa, short, grad, (1, 2, 2), &mut out).unwrap_err();
            assert_eq!(
                err,
                Unfit::Shape {
                    got: 63,
                    expected: 64
                }
            );
            let odd = Source {
                pixels: &[0.0; 2 * 2 * 8],
                channels: 8,
            };
            let err = weight_gradient(isa, input, odd, (1, 2, 2), &mut out).unwrap_err();
            assert_eq!(err, Unfit::Channels { channels: 8 });
            let err = weight_gradient(isa, input, grad, (1, 2, 2), &mut out[1..]).unwrap_err();
            assert_eq!(
                err,
                Unfit::Shape {
                    got: 16 * 32 * 9 - 1,
                    expected: 16 * 32 * 9
                }
            );
        }
    }
}
