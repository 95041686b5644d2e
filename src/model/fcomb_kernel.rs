//! Fcomb's 1x1 convolutions fused into one pass per pixel tile, for sampling on the CPU.
//!
//! Decoding a sample through libtorch writes and reads every hidden layer's activations
//! (`[samples, F, H, W]`) through memory, runs ReLU as its own pass, and its 1x1
//! convolutions with 32 channels are bound by that traffic. Here each tile of pixels goes
//! through every layer while it sits in registers and L1: the same sums in another order.
//! It serves inference only (no autograd) in float32; [`Fcomb`](super::Fcomb) falls back
//! to libtorch for anything else.
#[cfg(target_arch = "x86_64")]
use super::simd::x86;
use super::simd::{parallel_for, Isa, Lane, SharedOut, Unit, Vector, LANES};

/// Pixels per tile: a tile's activations stay in L1 between layers.
const TILE: usize = 32;

/// The most lanes of channels the kernel is built for (64 channels); wider fcombs
/// take libtorch's path.
pub const MAX_LANES: usize = 4;

/// Fcomb's layers after the first, their weights transposed (input channel major) and
/// padded with zeros to whole lanes.
#[derive(Debug, Clone)]
pub struct Layers {
    features: usize,
    classes: usize,
    hidden: Vec<Hidden>,
    /// Per class: `lanes` lanes of weights; then the biases.
    last: Vec<Lane>,
    last_bias: Vec<f32>,
}

/// Why the fused path cannot take a layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error("{features} channels: the fused fcomb takes at most {} channels", MAX_LANES * LANES)]
    TooWide { features: usize },
    #[error("{got} values where {expected} were expected")]
    Shape { got: usize, expected: usize },
    #[error("libtorch's thread pool failed to run the fused fcomb")]
    Threads,
}

fn lanes_for(features: usize) -> usize {
    features.div_ceil(LANES)
}

impl Layers {
    /// `hidden` as `(weight [F, F] row-major by output, bias [F])`, `last` as
    /// `(weight [classes, F], bias [classes])`.
    pub fn new(
        features: usize,
        hidden: &[(Vec<f32>, Vec<f32>)],
        last: (&[f32], &[f32]),
    ) -> Result<Self, Unfit> {
        let lanes = lanes_for(features);
        if lanes > MAX_LANES || features == 0 {
            return Err(Unfit::TooWide { features });
        }
        let hidden = hidden
            .iter()
            .map(|(w, b)| transpose_padded(features, w, b))
            .collect::<Result<_, _>>()?;
        let classes = last.1.len();
        check_len(last.0.len(), classes * features)?;
        let mut rows = vec![[0.0; LANES]; classes * lanes];
        for c in 0..classes {
            for k in 0..features {
                rows[c * lanes + k / LANES][k % LANES] = last.0[c * features + k];
            }
        }
        Ok(Self {
            features,
            classes,
            hidden,
            last: rows,
            last_bias: last.1.to_vec(),
        })
    }

    fn lanes(&self) -> usize {
        lanes_for(self.features)
    }
}

fn check_len(got: usize, expected: usize) -> Result<(), Unfit> {
    if got == expected {
        Ok(())
    } else {
        Err(Unfit::Shape { got, expected })
    }
}

/// A hidden layer: `lanes * LANES` input rows of `lanes` output lanes, and its bias.
#[derive(Debug, Clone)]
struct Hidden {
    rows: Vec<Lane>,
    bias: Vec<Lane>,
}

fn transpose_padded(features: usize, weight: &[f32], bias: &[f32]) -> Result<Hidden, Unfit> {
    check_len(weight.len(), features * features)?;
    check_len(bias.len(), features)?;
    let lanes = lanes_for(features);
    let mut rows = vec![[0.0; LANES]; lanes * LANES * lanes];
    let mut padded = vec![[0.0; LANES]; lanes];
    for o in 0..features {
        for k in 0..features {
            rows[k * lanes + o / LANES][o % LANES] = weight[o * features + k];
        }
        padded[o / LANES][o % LANES] = bias[o];
    }
    Ok(Hidden { rows, bias: padded })
}

/// Writes logits `[m * n, classes, pixels]` (image-major, then sample) into `out` from the
/// first layer's two parts: `feature_part` `[m, pixels, F]` (pixel-major) and
/// `latent_part` `[m, n, F]`, on libtorch's intra-op threads.
pub fn decode(
    isa: Isa,
    layers: &Layers,
    feature_part: &[f32],
    latent_part: &[f32],
    (m, n, pixels): (usize, usize, usize),
    out: &mut [f32],
) -> Result<(), Unfit> {
    let f = layers.features;
    check_len(feature_part.len(), m * pixels * f)?;
    check_len(latent_part.len(), m * n * f)?;
    let per_sample = layers.classes * pixels;
    check_len(out.len(), m * n * per_sample)?;
    if per_sample == 0 {
        return Ok(());
    }
    let base = SharedOut(out.as_mut_ptr());
    parallel_for(m * n, &|begin, end| {
        // SAFETY: `parallel_for` hands each call its own range of 0..m * n, so these
        // slices of `out` (m * n * per_sample floats) never overlap.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(base.at(begin * per_sample), (end - begin) * per_sample)
        };
        for (sample, logits) in (begin..end).zip(chunk.chunks_exact_mut(per_sample)) {
            let image = sample / n;
            let features = &feature_part[image * pixels * f..(image + 1) * pixels * f];
            let latent = &latent_part[sample * f..(sample + 1) * f];
            decode_sample(isa, layers, features, latent, logits);
        }
    })
    .map_err(|()| Unfit::Threads)
}

/// One sample's logits `[classes, pixels]` on `isa`.
fn decode_sample(isa: Isa, layers: &Layers, features: &[f32], latent: &[f32], logits: &mut [f32]) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (isa, layers, features, latent, logits);
    #[cfg(target_arch = "x86_64")]
    match isa.0 {
        // SAFETY: an `Isa` of Avx512 exists only where the CPU has AVX-512F and FMA.
        Unit::Avx512 => unsafe { decode_avx512(layers, features, latent, logits) },
        // SAFETY: an `Isa` of Avx2 exists only where the CPU has AVX2 and FMA.
        Unit::Avx2 => unsafe { decode_avx2(layers, features, latent, logits) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn decode_avx512(layers: &Layers, features: &[f32], latent: &[f32], logits: &mut [f32]) {
    // Eight pixels: at the default 32 channels (two lanes) 16 of the 32 registers
    // accumulate.
    decode_tiles::<x86::Zmm, 8>(layers, features, latent, logits)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_avx2(layers: &Layers, features: &[f32], latent: &[f32], logits: &mut [f32]) {
    // Two pixels: a lane takes two of the 16 registers, so 32 channels take 8.
    decode_tiles::<x86::Ymm2, 2>(layers, features, latent, logits)
}

/// Every tile of one sample, for the lane count of `layers`, `R` pixels at a time.
#[inline(always)]
unsafe fn decode_tiles<V: Vector, const R: usize>(
    layers: &Layers,
    features: &[f32],
    latent: &[f32],
    logits: &mut [f32],
) {
    match layers.lanes() {
        1 => tiles::<V, 1, R>(layers, features, latent, logits),
        2 => tiles::<V, 2, R>(layers, features, latent, logits),
        3 => tiles::<V, 3, R>(layers, features, latent, logits),
        _ => tiles::<V, 4, R>(layers, features, latent, logits),
    }
}

#[inline(always)]
unsafe fn tiles<V: Vector, const NB: usize, const R: usize>(
    layers: &Layers,
    features: &[f32],
    latent: &[f32],
    logits: &mut [f32],
) {
    let f = layers.features;
    let pixels = features.len() / f;
    let mut z = [[0.0; LANES]; NB];
    z.as_flattened_mut()[..f].copy_from_slice(latent);
    let mut a = [[[0.0f32; LANES]; NB]; TILE];
    let mut b = [[[0.0f32; LANES]; NB]; TILE];
    for first in (0..pixels).step_by(TILE) {
        let count = TILE.min(pixels - first);
        first_layer::<V, NB>(&features[first * f..(first + count) * f], f, &z, &mut a);
        for layer in &layers.hidden {
            dense_relu::<V, NB, R>(layer, &a, &mut b);
            std::mem::swap(&mut a, &mut b);
        }
        for c in 0..layers.classes {
            let weight = &layers.last[c * NB..(c + 1) * NB];
            let bias = layers.last_bias[c];
            let row = &mut logits[c * pixels + first..c * pixels + first + count];
            for (out, pixel) in row.iter_mut().zip(&a) {
                *out = bias + dot::<V, NB>(pixel, weight);
            }
        }
    }
}

/// `relu(feature part + latent part)` for a tile of `features.len() / f` pixels; the rest
/// of the tile is zeros.
#[inline(always)]
unsafe fn first_layer<V: Vector, const NB: usize>(
    features: &[f32],
    f: usize,
    z: &[Lane; NB],
    out: &mut [[Lane; NB]; TILE],
) {
    let mut row = [[0.0; LANES]; NB];
    let rows = features.chunks_exact(f);
    for (pixel, values) in out
        .iter_mut()
        .zip(rows.map(Some).chain(std::iter::repeat(None)))
    {
        let Some(values) = values else {
            *pixel = [[0.0; LANES]; NB];
            continue;
        };
        let lanes: &[Lane] = match values.as_chunks::<LANES>() {
            (whole, []) => whole,
            _ => {
                row.as_flattened_mut()[..f].copy_from_slice(values);
                &row
            }
        };
        for ((lane, r), zl) in pixel.iter_mut().zip(lanes).zip(z) {
            V::load(r).add(V::load(zl)).relu().store(lane);
        }
    }
}

/// `out = relu(input . W + bias)` for a tile, `R` pixels at a time so each weight lane
/// loaded serves `R` sums.
#[inline(always)]
unsafe fn dense_relu<V: Vector, const NB: usize, const R: usize>(
    layer: &Hidden,
    input: &[[Lane; NB]; TILE],
    out: &mut [[Lane; NB]; TILE],
) {
    let rows = &layer.rows[..NB * LANES * NB];
    let bias = &layer.bias[..NB];
    for (inp, outp) in input.chunks_exact(R).zip(out.chunks_exact_mut(R)) {
        let mut acc = [[V::splat(0.0); NB]; R];
        for pixel in &mut acc {
            for (a, b) in pixel.iter_mut().zip(bias) {
                *a = V::load(b);
            }
        }
        for (k, w) in rows.chunks_exact(NB).enumerate() {
            let mut wv = [V::splat(0.0); NB];
            for (v, lane) in wv.iter_mut().zip(w) {
                *v = V::load(lane);
            }
            for (pixel, x) in acc.iter_mut().zip(inp) {
                let x = V::splat(x[k / LANES][k % LANES]);
                for (a, w) in pixel.iter_mut().zip(&wv) {
                    *a = w.mul_add(x, *a);
                }
            }
        }
        for (o, a) in outp.iter_mut().zip(&acc) {
            for (lane, v) in o.iter_mut().zip(a) {
                v.relu().store(lane);
            }
        }
    }
}

#[inline(always)]
unsafe fn dot<V: Vector, const NB: usize>(x: &[Lane; NB], w: &[Lane]) -> f32 {
    let mut acc = V::splat(0.0);
    for (xl, wl) in x.iter().zip(w) {
        acc = V::load(xl).mul_add(V::load(wl), acc);
    }
    acc.sum()
}

#[cfg(test)]
mod tests {
    use super::super::simd::{units, values};
    use super::*;

    /// Fcomb after its first layer, one float at a time.
    fn reference(
        f: usize,
        hidden: &[(Vec<f32>, Vec<f32>)],
        last: (&[f32], &[f32]),
        features: &[f32],
        latent: &[f32],
        (m, n, pixels): (usize, usize, usize),
    ) -> Vec<f32> {
        let classes = last.1.len();
        let mut out = vec![0.0; m * n * classes * pixels];
        for (sample, z) in latent.chunks(f).enumerate() {
            let image = sample / n;
            for p in 0..pixels {
                let row = &features[(image * pixels + p) * f..][..f];
                let mut h: Vec<f32> = row.iter().zip(z).map(|(a, b)| (a + b).max(0.0)).collect();
                for (w, b) in hidden {
                    h = (0..f)
                        .map(|o| (b[o] + (0..f).map(|k| w[o * f + k] * h[k]).sum::<f32>()).max(0.0))
                        .collect();
                }
                for c in 0..classes {
                    let dot: f32 = (0..f).map(|k| last.0[c * f + k] * h[k]).sum();
                    out[(sample * classes + c) * pixels + p] = last.1[c] + dot;
                }
            }
        }
        out
    }

    #[test]
    fn fused_layers_match_fcomb_one_float_at_a_time() {
        // Channels a whole number of lanes and not; pixels past the last whole tile; no,
        // one and two hidden layers after the first; one and two classes.
        for (f, hidden_layers, classes) in
            [(32, 2, 1), (24, 1, 2), (40, 0, 1), (64, 2, 2), (5, 2, 1)]
        {
            let (m, n, pixels) = (2, 3, 2 * TILE + 5);
            let hidden: Vec<_> = (0..hidden_layers)
                .map(|i| (values(f * f, i), values(f, 10 + i)))
                .collect();
            let (weight, bias) = (values(classes * f, 20), values(classes, 21));
            let layers = Layers::new(f, &hidden, (&weight, &bias)).unwrap();
            let features = values(m * pixels * f, 30);
            let latent = values(m * n * f, 31);
            let expected = reference(
                f,
                &hidden,
                (&weight, &bias),
                &features,
                &latent,
                (m, n, pixels),
            );
            for isa in units() {
                let mut out = vec![f32::NAN; expected.len()];
                decode(isa, &layers, &features, &latent, (m, n, pixels), &mut out).unwrap();
                let worst = out
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                    .fold(0.0f32, f32::max);
                assert!(worst < 1e-5, "{isa:?}, {f} channels: off by {worst}");
            }
        }
    }

    #[test]
    fn wider_fcombs_and_wrong_sizes_are_refused() {
        let wide = MAX_LANES * LANES + 1;
        assert_eq!(
            Layers::new(wide, &[], (&vec![0.0; wide], &[0.0])).unwrap_err(),
            Unfit::TooWide { features: wide }
        );
        let short = Layers::new(4, &[(vec![0.0; 15], vec![0.0; 4])], (&[0.0; 4], &[0.0]));
        assert_eq!(
            short.unwrap_err(),
            Unfit::Shape {
                got: 15,
                expected: 16
            }
        );
        let layers = Layers::new(4, &[], (&[0.0; 4], &[0.0])).unwrap();
        for isa in units() {
            let mut out = vec![0.0; 6];
            let err = decode(isa, &layers, &[0.0; 23], &[0.0; 8], (1, 2, 6), &mut out);
            assert_eq!(
                err.unwrap_err(),
                Unfit::Shape {
                    got: 23,
                    expected: 24
                }
            );
            let err = decode(isa, &layers, &[0.0; 24], &[0.0; 8], (1, 2, 6), &mut out);
            assert_eq!(
                err.unwrap_err(),
                Unfit::Shape {
                    got: 6,
                    expected: 12
                }
            );
        }
    }
}
