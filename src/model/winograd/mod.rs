//! 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin & Gray 2016), on the CPU.
//!
//! A direct 3x3 convolution spends 36 multiplications on a 2x2 patch of outputs per pair
//! of channels; F(2x2, 3x3) spends 16: the 4x4 input patch and the filter are each
//! transformed (additions only, and halves for the filter), multiplied point by point,
//! summed over input channels (sixteen small matrix products), and transformed back.
//! oneDNN 3.x has no float32 Winograd on x86, and its direct kernels already run these
//! layers near the FMA peak, so fewer multiplications is what is left to win. The
//! transforms use only 0, ±1 and ±1/2, so the sums differ from a direct convolution's by
//! rounding alone. Sampling runs its forward passes here (ReLU fused); training runs the
//! forward pass, the input's gradient and ([`weight`]) the weight's gradient here, inside
//! an autograd node that winograd.cpp makes. Float32, channels-last, channels in whole
//! lanes of 16; [`Conv2d`](super::Conv2d) keeps libtorch's path for everything else.
#[cfg(target_arch = "x86_64")]
use super::simd::x86;
pub use super::simd::LANES;
use super::simd::{parallel_for, Isa, Lane, SharedOut, Unit, Vector};
use std::cell::RefCell;
pub use weight::{weight_gradient_kernel, WeightGradientKernel};

mod weight;

/// Points of a transformed 4x4 tile.
const POINTS: usize = 16;

/// Tiles (of 2x2 outputs) per block: a block's transformed inputs and products, up to
/// 2 x 16 x 24 x 192 floats (590 KB), stay in a core's L2 between the three steps.
const BLOCK: usize = 24;

/// Why a convolution cannot take the Winograd path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error("{channels} channels: the Winograd path takes whole lanes of {LANES}")]
    Channels { channels: usize },
    #[error("{got} values where {expected} were expected")]
    Shape { got: usize, expected: usize },
    #[error("libtorch's thread pool failed to run the Winograd convolution")]
    Threads,
}

/// A 3x3 filter bank transformed for F(2x2, 3x3): `U = G g Gᵀ` for every pair of
/// channels, laid out `[point][input channel][output lanes]`, and the bias in lanes.
#[derive(Debug, Clone)]
pub struct Filter {
    inputs: usize,
    output_lanes: usize,
    u: Vec<Lane>,
    bias: Vec<Lane>,
}

fn check_len(got: usize, expected: usize) -> Result<(), Unfit> {
    if got == expected {
        Ok(())
    } else {
        Err(Unfit::Shape { got, expected })
    }
}

fn whole_lanes(channels: usize) -> Result<usize, Unfit> {
    if channels == 0 || !channels.is_multiple_of(LANES) {
        return Err(Unfit::Channels { channels });
    }
    Ok(channels / LANES)
}

/// `G g Gᵀ` for one 3x3 filter `g` (row-major), with
/// `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
fn transform_filter(g: &[f32]) -> [f32; POINTS] {
    let rows = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    let mut gg = [[0.0f32; 3]; 4];
    for j in 0..3 {
        let column = rows(g[j], g[3 + j], g[6 + j]);
        for i in 0..4 {
            gg[i][j] = column[i];
        }
    }
    let mut u = [0.0; POINTS];
    for (i, row) in gg.iter().enumerate() {
        u[i * 4..i * 4 + 4].copy_from_slice(&rows(row[0], row[1], row[2]));
    }
    u
}

impl Filter {
    /// `weight` `[outputs, inputs, 3, 3]` and `bias` `[outputs]`, as libtorch holds them.
    pub fn new(weight: &[f32], bias: &[f32], inputs: usize) -> Result<Self, Unfit> {
        let outputs = bias.len();
        let output_lanes = whole_lanes(outputs)?;
        whole_lanes(inputs)?;
        check_len(weight.len(), outputs * inputs * 9)?;
        let mut u = vec![[0.0; LANES]; POINTS * inputs * output_lanes];
        let base = SharedLanes(u.as_mut_ptr());
        // A lane of outputs per job: it reads its 16 filters' rows (in cache) and writes
        // whole lanes.
        parallel_for(output_lanes, &|begin, end| {
            for lane in begin..end {
                for i in 0..inputs {
                    let mut points = [[0.0; LANES]; POINTS];
                    for k in 0..LANES {
                        let g = &weight[((lane * LANES + k) * inputs + i) * 9..][..9];
                        for (point, value) in transform_filter(g).into_iter().enumerate() {
                            points[point][k] = value;
                        }
                    }
                    for (point, values) in points.into_iter().enumerate() {
                        // SAFETY: `u` holds POINTS * inputs * output_lanes lanes, and this
                        // job alone writes the lanes of output lane `lane`.
                        unsafe { *base.at((point * inputs + i) * output_lanes + lane) = values };
                    }
                }
            }
        })
        .map_err(|()| Unfit::Threads)?;
        let mut lanes = vec![[0.0; LANES]; output_lanes];
        lanes.as_flattened_mut().copy_from_slice(bias);
        Ok(Self {
            inputs,
            output_lanes,
            u,
            bias: lanes,
        })
    }

    /// The filters of the input's gradient for `weight` `[outputs, inputs, 3, 3]`: a
    /// convolution from `outputs` channels to `inputs` with every filter turned half a
    /// circle, and no bias.
    pub fn transposed(weight: &[f32], outputs: usize, inputs: usize) -> Result<Self, Unfit> {
        check_len(weight.len(), outputs * inputs * 9)?;
        let mut turned = vec![0.0; weight.len()];
        for o in 0..outputs {
            for i in 0..inputs {
                let from = &weight[(o * inputs + i) * 9..][..9];
                let to = &mut turned[(i * outputs + o) * 9..][..9];
                for (k, value) in from.iter().enumerate() {
                    to[8 - k] = *value;
                }
            }
        }
        Self::new(&turned, &vec![0.0; inputs], outputs)
    }

    fn outputs(&self) -> usize {
        self.output_lanes * LANES
    }
}

/// `u`'s lanes, written by the threads of [`parallel_for`] in disjoint sets.
struct SharedLanes(*mut Lane);
// SAFETY: each thread writes lanes no other writes (see `Filter::new`).
unsafe impl Sync for SharedLanes {}

impl SharedLanes {
    /// The `i`th lane; a method, so closures capture the whole (Sync) wrapper.
    fn at(&self, i: usize) -> *mut Lane {
        self.0.wrapping_add(i)
    }
}

/// Images `(n, h, w)` and their tiling into 2x2 output tiles and blocks of tiles.
#[derive(Debug, Clone, Copy)]
struct Grid {
    h: usize,
    w: usize,
    tiles_wide: usize,
    tiles: usize,
    blocks: usize,
}

impl Grid {
    fn new(h: usize, w: usize) -> Self {
        let tiles_wide = w.div_ceil(2);
        let tiles = h.div_ceil(2) * tiles_wide;
        Self {
            h,
            w,
            tiles_wide,
            tiles,
            blocks: tiles.div_ceil(BLOCK),
        }
    }

    /// The top-left output pixel of tile `t`.
    fn origin(&self, t: usize) -> (usize, usize) {
        (2 * (t / self.tiles_wide), 2 * (t % self.tiles_wide))
    }

    /// Lane `lane` of pixel `(py, px)` of one image's `pixels` (`lanes` lanes each), or
    /// zeros where the pixel lies outside the image (padding, partial tiles).
    #[inline(always)]
    fn lane<'a>(
        &self,
        pixels: &'a [Lane],
        lanes: usize,
        (py, px): (usize, usize),
        lane: usize,
    ) -> &'a Lane {
        static ZERO: Lane = [0.0; LANES];
        if py < self.h && px < self.w {
            &pixels[(py * self.w + px) * lanes + lane]
        } else {
            &ZERO
        }
    }
}

/// What winograd.cpp calls for the forward pass and the input's gradient of a training
/// step's convolution: `out = conv3x3(input) (+ bias)` on channels-last float32 images,
/// with `weight` `[outputs, inputs, 3, 3]`, or with the input gradient's filters of
/// `weight` `[inputs, outputs, 3, 3]` when `transposed`. 1 when anything does not fit
/// or a vector unit is missing; it never unwinds into C++.
pub type AutogradKernel = extern "C" fn(
    *const f32,
    i64,
    i64,
    i64,
    i64,
    *const f32,
    *const f32,
    i64,
    i32,
    *mut f32,
) -> i32;

/// The [`AutogradKernel`] winograd.cpp calls.
pub extern "C" fn autograd_kernel(
    input: *const f32,
    n: i64,
    h: i64,
    w: i64,
    inputs: i64,
    weight: *const f32,
    bias: *const f32,
    outputs: i64,
    transposed: i32,
    out: *mut f32,
) -> i32 {
    status(|| {
        let Call {
            isa,
            n,
            h,
            w,
            inputs,
            outputs,
            pixels,
            filters,
        } = Call::new([n, h, w, inputs, outputs])?;
        if input.is_null() || weight.is_null() || out.is_null() {
            return None;
        }
        // SAFETY: winograd.cpp passes contiguous tensors of exactly these sizes: `input`
        // [n, h, w, inputs], `weight` of `filters` floats, `bias` (if any) [outputs],
        // `out` [n, h, w, outputs], which it made and nothing else touches.
        let (input, weight, bias, out) = unsafe {
            (
                std::slice::from_raw_parts(input, pixels.checked_mul(inputs)?),
                std::slice::from_raw_parts(weight, filters),
                (!bias.is_null()).then(|| std::slice::from_raw_parts(bias, outputs)),
                std::slice::from_raw_parts_mut(out, pixels.checked_mul(outputs)?),
            )
        };
        let filter = if transposed != 0 {
            Filter::transposed(weight, inputs, outputs).ok()?
        } else {
            let zeros;
            let bias = match bias {
                Some(bias) => bias,
                None => {
                    zeros = vec![0.0; outputs];
                    &zeros
                }
            };
            Filter::new(weight, bias, inputs).ok()?
        };
        let source = [Source {
            pixels: input,
            channels: inputs,
        }];
        conv3x3(isa, &filter, &source, (n, h, w), false, out).ok()
    })
}

/// A call from winograd.cpp, its sizes checked: non-negative, and products that fit.
struct Call {
    isa: Isa,
    n: usize,
    h: usize,
    w: usize,
    inputs: usize,
    outputs: usize,
    /// `n * h * w`
    pixels: usize,
    /// `inputs * outputs * 9`, a filter bank's floats.
    filters: usize,
}

impl Call {
    /// `None` where a size is negative, a product overflows, or no vector unit serves.
    fn new(sizes: [i64; 5]) -> Option<Self> {
        let [n, h, w, inputs, outputs] = sizes.map(|v| usize::try_from(v).ok());
        let (n, h, w, inputs, outputs) = (n?, h?, w?, inputs?, outputs?);
        Some(Self {
            isa: Isa::available()?,
            n,
            h,
            w,
            inputs,
            outputs,
            pixels: n.checked_mul(h)?.checked_mul(w)?,
            filters: inputs.checked_mul(outputs)?.checked_mul(9)?,
        })
    }
}

/// What winograd.cpp reads of a kernel's run: 0 on success, 1 on a refusal or a panic,
/// which never unwinds into C++.
fn status(run: impl FnOnce() -> Option<()> + std::panic::UnwindSafe) -> i32 {
    match std::panic::catch_unwind(run) {
        Ok(Some(())) => 0,
        _ => 1,
    }
}

/// Channels-last images `[n, h, w, channels]`: one of the inputs whose concatenation
/// along channels a convolution takes.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub pixels: &'a [f32],
    pub channels: usize,
}

impl<'a> Source<'a> {
    /// Image `image` of these images of `pixels` pixels each.
    fn image(self, image: usize, pixels: usize) -> Source<'a> {
        let len = pixels * self.channels;
        Source {
            pixels: &self.pixels[image * len..(image + 1) * len],
            channels: self.channels,
        }
    }
}

/// `out = conv3x3(input) + bias`, then ReLU if `relu`, with stride 1 and padding 1, on
/// channels-last images: `input` is the concatenation of `sources` along channels (never
/// built), `out` is `[n, h, w, outputs]`. Runs on libtorch's intra-op threads.
pub fn conv3x3(
    isa: Isa,
    filter: &Filter,
    sources: &[Source],
    (n, h, w): (usize, usize, usize),
    relu: bool,
    out: &mut [f32],
) -> Result<(), Unfit> {
    for source in sources {
        whole_lanes(source.channels)?;
        check_len(source.pixels.len(), n * h * w * source.channels)?;
    }
    check_len(sources.iter().map(|s| s.channels).sum(), filter.inputs)?;
    check_len(out.len(), n * h * w * filter.outputs())?;
    let grid = Grid::new(h, w);
    if grid.tiles == 0 {
        return Ok(());
    }
    let base = SharedOut(out.as_mut_ptr());
    parallel_for(n * grid.blocks, &|begin, end| {
        with_scratch(filter.inputs, filter.output_lanes, |scratch| {
            let mut images = Vec::with_capacity(sources.len());
            for job in begin..end {
                let (image, block) = (job / grid.blocks, job % grid.blocks);
                let first = block * BLOCK;
                let count = BLOCK.min(grid.tiles - first);
                images.clear();
                images.extend(sources.iter().map(|source| source.image(image, h * w)));
                let image_out = base.at(image * h * w * filter.outputs());
                let tiles = (first, count);
                // SAFETY: `out` holds n images of h * w * outputs floats; this block
                // writes only the pixels of its own tiles of its own image, which no
                // other job writes, and `isa` proves the CPU runs its kernels.
                unsafe { block_on(isa, filter, &grid, &images, tiles, relu, scratch, image_out) };
            }
        })
    })
    .map_err(|()| Unfit::Threads)
}

thread_local! {
    /// Each thread's scratch, kept from call to call: allocating and zeroing it afresh
    /// for every convolution cost 2-3% of a training step.
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            v: Vec::new(),
            m: Vec::new(),
        })
    };
}

/// Runs `body` with this thread's scratch, grown to fit a block of `inputs` channels
/// and `output_lanes` lanes.
fn with_scratch(inputs: usize, output_lanes: usize, body: impl FnOnce(&mut Scratch)) {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            scratch.fit(inputs, output_lanes);
            body(&mut scratch)
        }
        // Only a call from inside `body` could find it taken; it gets one of its own.
        Err(_) => {
            let mut scratch = Scratch {
                v: Vec::new(),
                m: Vec::new(),
            };
            scratch.fit(inputs, output_lanes);
            body(&mut scratch)
        }
    })
}

/// One thread's transformed inputs `[point][tile][inputs]` and products
/// `[point][tile][output lanes]` for a block.
struct Scratch {
    v: Vec<Lane>,
    m: Vec<Lane>,
}

impl Scratch {
    /// Grows the buffers to hold a block of `inputs` channels and `output_lanes` lanes
    /// (never shrinks them: the lanes past a block's are not read).
    fn fit(&mut self, inputs: usize, output_lanes: usize) {
        let v = POINTS * BLOCK * inputs / LANES;
        let m = POINTS * BLOCK * output_lanes;
        if self.v.len() < v {
            self.v.resize(v, [0.0; LANES]);
        }
        if self.m.len() < m {
            self.m.resize(m, [0.0; LANES]);
        }
    }
}

/// The three steps for the `count` tiles from `first` of one image.
///
/// # Safety
/// `out` points at that image's `h * w * outputs` floats, and the CPU has `isa`.
#[allow(clippy::too_many_arguments)]
unsafe fn block_on(
    isa: Isa,
    filter: &Filter,
    grid: &Grid,
    images: &[Source],
    tiles: (usize, usize),
    relu: bool,
    scratch: &mut Scratch,
    out: *mut f32,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (isa, filter, grid, images, tiles, relu, scratch, out);
    #[cfg(target_arch = "x86_64")]
    match isa.0 {
        Unit::Avx512 => block_avx512(filter, grid, images, tiles, relu, scratch, out),
        Unit::Avx2 => block_avx2(filter, grid, images, tiles, relu, scratch, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn block_avx512(
    filter: &Filter,
    grid: &Grid,
    images: &[Source],
    tiles: (usize, usize),
    relu: bool,
    scratch: &mut Scratch,
    out: *mut f32,
) {
    input_transform::<x86::Zmm>(filter.inputs, grid, images, tiles, &mut scratch.v);
    // 24 of the 32 registers accumulate: 6 tiles x 4 lanes, 12 x 2 or 24 x 1.
    match filter.output_lanes {
        l if l % 4 == 0 => products::<x86::Zmm, 4, 6>(filter, scratch),
        l if l % 2 == 0 => products::<x86::Zmm, 2, 12>(filter, scratch),
        _ => products::<x86::Zmm, 1, 24>(filter, scratch),
    }
    output_transform::<x86::Zmm>(filter, grid, tiles, relu, &scratch.m, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(
    filter: &Filter,
    grid: &Grid,
    images: &[Source],
    tiles: (usize, usize),
    relu: bool,
    scratch: &mut Scratch,
    out: *mut f32,
) {
    input_transform::<x86::Ymm2>(filter.inputs, grid, images, tiles, &mut scratch.v);
    // 12 of the 16 registers accumulate: 6 tiles x one lane of two registers.
    products::<x86::Ymm2, 1, 6>(filter, scratch);
    output_transform::<x86::Ymm2>(filter, grid, tiles, relu, &scratch.m, out);
}

/// `(a0 - a2, a1 + a2, a2 - a1, a1 - a3)`: one dimension of `Bᵀ d B`.
#[inline(always)]
unsafe fn forward_1d<V: Vector>(a: [V; 4]) -> [V; 4] {
    [
        a[0].sub(a[2]),
        a[1].add(a[2]),
        a[2].sub(a[1]),
        a[1].sub(a[3]),
    ]
}

/// `(a0 + a1 + a2, a1 - a2 - a3)`: one dimension of `Aᵀ m A`.
#[inline(always)]
unsafe fn inverse_1d<V: Vector>(a: [V; 4]) -> [V; 2] {
    [a[0].add(a[1]).add(a[2]), a[1].sub(a[2]).sub(a[3])]
}

/// `V = Bᵀ d B` for each tile's 4x4 input patch `d` (zeros outside the image), lane by
/// lane of input channels, source after source, into `v` `[point][tile][inputs]`.
#[inline(always)]
unsafe fn input_transform<V: Vector>(
    inputs: usize,
    grid: &Grid,
    images: &[Source],
    (first, count): (usize, usize),
    v: &mut [Lane],
) {
    for t in 0..count {
        let (y, x) = grid.origin(first + t);
        let mut offset = 0;
        for &Source {
            pixels,
            channels: c,
        } in images
        {
            // Whole lanes: every lane starts at a multiple of LANES.
            let pixels = pixels.as_chunks::<LANES>().0;
            for lane in 0..c / LANES {
                let mut d = [[V::splat(0.0); 4]; 4];
                for (i, row) in d.iter_mut().enumerate() {
                    for (j, value) in row.iter_mut().enumerate() {
                        let at = ((y + i).wrapping_sub(1), (x + j).wrapping_sub(1));
                        *value = V::load(grid.lane(pixels, c / LANES, at, lane));
                    }
                }
                let lane = (offset + lane * LANES) / LANES;
                store_transformed(transform_patch(d), t, inputs / LANES, lane, v);
            }
            offset += c;
        }
    }
}

/// `Bᵀ d B` for one 4x4 patch of a lane.
#[inline(always)]
unsafe fn transform_patch<V: Vector>(d: [[V; 4]; 4]) -> [[V; 4]; 4] {
    let mut columns = d;
    for j in 0..4 {
        let column = forward_1d([d[0][j], d[1][j], d[2][j], d[3][j]]);
        for i in 0..4 {
            columns[i][j] = column[i];
        }
    }
    // A loop, not `map`: a closure would not inherit the caller's target features.
    let mut patch = columns;
    for (out, row) in patch.iter_mut().zip(columns) {
        *out = forward_1d(row);
    }
    patch
}

/// Stores a transformed patch of tile `t` at `lane` of `v` `[point][tile][input lanes]`.
#[inline(always)]
unsafe fn store_transformed<V: Vector>(
    patch: [[V; 4]; 4],
    t: usize,
    input_lanes: usize,
    lane: usize,
    v: &mut [Lane],
) {
    for (i, row) in patch.into_iter().enumerate() {
        for (j, value) in row.into_iter().enumerate() {
            value.store(&mut v[((i * 4 + j) * BLOCK + t) * input_lanes + lane]);
        }
    }
}

/// `m[point] = v[point] . u[point]` for every point: sixteen `[BLOCK, inputs] x
/// [inputs, outputs]` products, `R` tiles by `NB` lanes of outputs at a time.
#[inline(always)]
unsafe fn products<V: Vector, const NB: usize, const R: usize>(
    filter: &Filter,
    scratch: &mut Scratch,
) {
    let (c, lanes) = (filter.inputs, filter.output_lanes);
    for point in 0..POINTS {
        let v = &scratch.v.as_flattened()[point * BLOCK * c..(point + 1) * BLOCK * c];
        let u = &filter.u[point * c * lanes..(point + 1) * c * lanes];
        let m = &mut scratch.m[point * BLOCK * lanes..(point + 1) * BLOCK * lanes];
        for lane in (0..lanes).step_by(NB) {
            for t in (0..BLOCK).step_by(R) {
                tile_product::<V, NB, R>(
                    &v[t * c..(t + R) * c],
                    c,
                    &u[lane..],
                    lanes,
                    &mut m[t * lanes + lane..],
                );
            }
        }
    }
}

/// `R` rows of `v` (`c` floats each) times `u` (`c` rows of `lanes` lanes, from the
/// first of `NB`), into `R` rows of `m` (`lanes` lanes each, from the first of `NB`).
#[inline(always)]
unsafe fn tile_product<V: Vector, const NB: usize, const R: usize>(
    v: &[f32],
    c: usize,
    u: &[Lane],
    lanes: usize,
    m: &mut [Lane],
) {
    let mut acc = [[V::splat(0.0); NB]; R];
    if m.len() < (R - 1) * lanes + NB || !rank_one_updates(&mut acc, v, (c, 1), u, lanes, c) {
        return;
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            a.store(&mut m[r * lanes + j]);
        }
    }
}

/// `acc[r][j] += Σ_k a[r * row_step + k * k_step] · b[k * b_step + j]` over `count`
/// values of `k`: `R` broadcast floats by `NB` loaded lanes a step, what both products
/// (the forward pass's and the weight gradient's) are made of. False, with nothing
/// done, where `a` or `b` is too short for that.
#[inline(always)]
unsafe fn rank_one_updates<V: Vector, const NB: usize, const R: usize>(
    acc: &mut [[V; NB]; R],
    a: &[f32],
    (row_step, k_step): (usize, usize),
    b: &[Lane],
    b_step: usize,
    count: usize,
) -> bool {
    let Some(last) = count.checked_sub(1) else {
        return true;
    };
    // The bounds, checked once: the loop below indexes without checks.
    if a.len() <= (R - 1) * row_step + last * k_step || b.len() < last * b_step + NB {
        return false;
    }
    for k in 0..count {
        let mut x = [V::splat(0.0); NB];
        for (j, xj) in x.iter_mut().enumerate() {
            // SAFETY: k * b_step + j < last * b_step + NB <= b.len(), checked above.
            *xj = V::load(b.get_unchecked(k * b_step + j));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: r * row_step + k * k_step <= (R - 1) * row_step + last * k_step
            // < a.len(), checked above.
            let y = V::splat(*a.get_unchecked(r * row_step + k * k_step));
            for (sum, xj) in row.iter_mut().zip(&x) {
                *sum = xj.mul_add(y, *sum);
            }
        }
    }
    true
}

/// `Y = Aᵀ m A + bias` (then ReLU) for each tile, written to the image's pixels that
/// lie inside it.
#[inline(always)]
unsafe fn output_transform<V: Vector>(
    filter: &Filter,
    grid: &Grid,
    (first, count): (usize, usize),
    relu: bool,
    m: &[Lane],
    out: *mut f32,
) {
    let lanes = filter.output_lanes;
    let outputs = filter.outputs();
    for t in 0..count {
        let (y, x) = grid.origin(first + t);
        for lane in 0..lanes {
            // An index, not a load: a closure would not inherit the target features.
            let at = |point: usize| (point * BLOCK + t) * lanes + lane;
            let mut rows = [[V::splat(0.0); 4]; 2];
            let [top, bottom] = &mut rows;
            for (j, (top, bottom)) in top.iter_mut().zip(bottom).enumerate() {
                [*top, *bottom] = inverse_1d([
                    V::load(&m[at(j)]),
                    V::load(&m[at(4 + j)]),
                    V::load(&m[at(8 + j)]),
                    V::load(&m[at(12 + j)]),
                ]);
            }
            let bias = V::load(&filter.bias[lane]);
            for (a, row) in rows.into_iter().enumerate() {
                for (b, value) in inverse_1d(row).into_iter().enumerate() {
                    let (py, px) = (y + a, x + b);
                    if py >= grid.h || px >= grid.w {
                        continue;
                    }
                    let value = value.add(bias);
                    let value = if relu { value.relu() } else { value };
                    let start = (py * grid.w + px) * outputs + lane * LANES;
                    // SAFETY: (py, px) lies inside the image, so `start + LANES` is
                    // within its h * w * outputs floats (the caller's promise).
                    value.store(&mut *(out.add(start) as *mut Lane));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::simd::{units, values, worst_error};
    use super::*;

    /// The direct convolution, one float at a time: `input` `[n, h, w, inputs]`,
    /// `weight` `[outputs, inputs, 3, 3]`.
    fn reference(
        input: &[f32],
        weight: &[f32],
        bias: &[f32],
        (n, h, w, inputs): (usize, usize, usize, usize),
        relu: bool,
    ) -> Vec<f32> {
        let outputs = bias.len();
        let mut out = vec![0.0; n * h * w * outputs];
        for (pixel, out) in out.chunks_mut(outputs).enumerate() {
            let (image, y, x) = (pixel / (h * w), pixel / w % h, pixel % w);
            for (o, value) in out.iter_mut().enumerate() {
                let mut sum = bias[o];
                for (dy, dx) in (0..3).flat_map(|dy| (0..3).map(move |dx| (dy, dx))) {
                    let (py, px) = ((y + dy).wrapping_sub(1), (x + dx).wrapping_sub(1));
                    if py >= h || px >= w {
                        continue;
                    }
                    let at = ((image * h + py) * w + px) * inputs;
                    for i in 0..inputs {
                        sum += input[at + i] * weight[((o * inputs + i) * 3 + dy) * 3 + dx];
                    }
                }
                *value = if relu { sum.max(0.0) } else { sum };
            }
        }
        out
    }

    #[test]
    fn winograd_matches_the_direct_convolution() {
        // Odd sizes (partial tiles), more tiles than a block and fewer, one and two
        // sources, each micro-kernel shape (4, 2 and 1 lanes of outputs), with and
        // without ReLU.
        for (n, h, w, sources, outputs, relu) in [
            (2, 9, 7, vec![16], 64, true),
            (1, 13, 12, vec![32, 16], 32, false),
            (3, 4, 5, vec![16], 16, true),
            (1, 1, 1, vec![48], 48, false),
        ] {
            let inputs: usize = sources.iter().sum();
            let parts: Vec<Vec<f32>> = sources
                .iter()
                .enumerate()
                .map(|(k, &c)| values(n * h * w * c, k))
                .collect();
            // The concatenation the reference convolves.
            let mut whole = vec![];
            for pixel in 0..n * h * w {
                for (part, &c) in parts.iter().zip(&sources) {
                    whole.extend_from_slice(&part[pixel * c..(pixel + 1) * c]);
                }
            }
            let weight = values(outputs * inputs * 9, 7);
            let bias = values(outputs, 8);
            let expected = reference(&whole, &weight, &bias, (n, h, w, inputs), relu);
            let filter = Filter::new(&weight, &bias, inputs).unwrap();
            let sources: Vec<Source> = parts
                .iter()
                .zip(&sources)
                .map(|(pixels, &channels)| Source { pixels, channels })
                .collect();
            for isa in units() {
                let mut out = vec![f32::NAN; expected.len()];
                conv3x3(isa, &filter, &sources, (n, h, w), relu, &mut out).unwrap();
                let worst = worst_error(&out, &expected, |b| b.abs().max(1.0));
                assert!(
                    worst < 1e-5,
                    "{isa:?}, {h}x{w}, {inputs}->{outputs}: off by {worst}"
                );
            }
        }
    }

    #[test]
    fn channels_outside_whole_lanes_and_wrong_sizes_are_refused() {
        assert_eq!(
            Filter::new(&[0.0; 9 * 16 * 8], &[0.0; 8], 16).unwrap_err(),
            Unfit::Channels { channels: 8 }
        );
        assert_eq!(
            Filter::new(&[0.0; 9 * 16 * 3], &[0.0; 16], 3).unwrap_err(),
            Unfit::Channels { channels: 3 }
        );
        assert_eq!(
            Filter::new(&[0.0; 100], &[0.0; 16], 16).unwrap_err(),
            Unfit::Shape {
                got: 100,
                expected: 16 * 16 * 9
            }
        );
        let filter = Filter::new(&[0.0; 9 * 16 * 16], &[0.0; 16], 16).unwrap();
        for isa in units() {
            let mut out = vec![0.0; 2 * 2 * 16];
            let short = [Source {
                pixels: &[0.0; 2 * 2 * 16 - 1],
                channels: 16,
            }];
            let err = conv3x3(isa, &filter, &short, (1, 2, 2), true, &mut out).unwrap_err();
            assert_eq!(
                err,
                Unfit::Shape {
                    got: 63,
                    expected: 64
                }
            );
            let wide = [Source {
                pixels: &[0.0; 2 * 2 * 32],
                channels: 32,
            }];
            let err = conv3x3(isa, &filter, &wide, (1, 2, 2), true, &mut out).unwrap_err();
            assert_eq!(
                err,
                Unfit::Shape {
                    got: 32,
                    expected: 16
                }
            );
        }
    }
}
