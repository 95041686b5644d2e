//! Perceptual colormaps for probabilities and uncertainty: matplotlib's viridis and magma
//! (CC0), sampled at nine evenly spaced points and interpolated linearly between them,
//! which stays within a few levels of the 256-entry tables.

/// A colormap from [0, 1] to RGB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Colormap {
    /// Mean foreground probability: dark purple at 0, yellow at 1.
    Viridis,
    /// Uncertainty: black at 0, pale yellow at the largest.
    Magma,
}

const VIRIDIS: [[u8; 3]; 9] = [
    [0x44, 0x01, 0x54],
    [0x47, 0x2c, 0x7a],
    [0x3b, 0x51, 0x8b],
    [0x2c, 0x71, 0x8e],
    [0x21, 0x90, 0x8d],
    [0x27, 0xad, 0x81],
    [0x5c, 0xc8, 0x63],
    [0xaa, 0xdc, 0x32],
    [0xfd, 0xe7, 0x25],
];

const MAGMA: [[u8; 3]; 9] = [
    [0x00, 0x00, 0x04],
    [0x1c, 0x10, 0x44],
    [0x4f, 0x12, 0x7b],
    [0x81, 0x25, 0x81],
    [0xb5, 0x36, 0x7a],
    [0xe5, 0x50, 0x64],
    [0xfb, 0x87, 0x61],
    [0xfe, 0xc2, 0x87],
    [0xfc, 0xfd, 0xbf],
];

impl Colormap {
    /// The colour of `t`, clamped to [0, 1]; NaN shows as the low end.
    pub fn rgb(self, t: f32) -> [u8; 3] {
        let stops = match self {
            Colormap::Viridis => &VIRIDIS,
            Colormap::Magma => &MAGMA,
        };
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        let x = t * (stops.len() - 1) as f32;
        let i = (x.floor() as usize).min(stops.len() - 2);
        let f = x - i as f32;
        let mix = |a: u8, b: u8| (f32::from(a) + (f32::from(b) - f32::from(a)) * f).round() as u8;
        let (a, b) = (stops[i], stops[i + 1]);
        [mix(a[0], b[0]), mix(a[1], b[1]), mix(a[2], b[2])]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_are_the_tables_ends_and_lightness_rises() {
        assert_eq!(Colormap::Viridis.rgb(0.0), [0x44, 0x01, 0x54]);
        assert_eq!(Colormap::Viridis.rgb(1.0), [0xfd, 0xe7, 0x25]);
        assert_eq!(Colormap::Magma.rgb(-3.0), [0x00, 0x00, 0x04]);
        assert_eq!(Colormap::Magma.rgb(f32::NAN), [0x00, 0x00, 0x04]);
        assert_eq!(Colormap::Magma.rgb(7.0), [0xfc, 0xfd, 0xbf]);
        // Perceptual: luma never falls as the value rises.
        for map in [Colormap::Viridis, Colormap::Magma] {
            let luma = |t: f32| {
                let [r, g, b] = map.rgb(t);
                0.299 * f32::from(r) + 0.587 * f32::from(g) + 0.114 * f32::from(b)
            };
            for k in 0..100 {
                let (a, b) = (k as f32 / 100.0, (k + 1) as f32 / 100.0);
                assert!(luma(b) + 0.5 >= luma(a), "{map:?} at {a}");
            }
        }
    }
}
