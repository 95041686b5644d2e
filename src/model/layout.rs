//! The memory layout of activations on the CPU, chosen per vector ISA and per pass.
//!
//! oneDNN runs convolutions in a channel-blocked layout. From NCHW tensors libtorch converts
//! each convolution's input into it and the output back; from channels-last tensors it runs
//! kernels that read and write that layout directly, and probunet's own Winograd kernel
//! (`super::winograd`) reads and writes channels-last only. So on a CPU with AVX2 or
//! AVX-512 both passes run channels-last (docs/performance.md):
//! - AVX-512: channels-last trained faster even before the Winograd kernel; the conversions
//!   were a quarter of an NCHW step.
//! - AVX2: oneDNN's channels-last weight-gradient kernel runs at 34-77 GFLOP/s against
//!   74-95 for the blocked one, so before the Winograd kernel NCHW trained 1.27x faster.
//!   Now all three of a convolution's passes in training are Winograd's.
//! - Sampling (forward only, with fcomb's 1x1 convolutions over every sample) was faster
//!   channels-last on both.
//! - Without either (no Winograd kernel), training stays NCHW.
//!
//! `PROBUNET_CPU_LAYOUT=nchw` or `channels-last` fixes one layout for every pass (to compare
//! them); unset or `auto` chooses as above.
use std::sync::OnceLock;

/// How a 4-d activation tensor is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Contiguous `[N, C, H, W]`.
    Nchw,
    /// `[N, C, H, W]` with channels innermost (NHWC in memory).
    ChannelsLast,
}

/// The layouts the model runs its two kinds of pass in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layouts {
    /// The ELBO: training, and validation with the same graph.
    pub elbo: Layout,
    /// Prior sampling: the U-Net and prior once per image, fcomb per sample.
    pub sample: Layout,
}

impl Layouts {
    /// `layout` for every pass.
    pub const fn both(layout: Layout) -> Self {
        Self {
            elbo: layout,
            sample: layout,
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Nchw => "nchw",
            Layout::ChannelsLast => "channels-last",
        })
    }
}

impl std::fmt::Display for Layouts {
    /// "trains nchw, samples channels-last".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "trains {}, samples {}", self.elbo, self.sample)
    }
}

/// What `PROBUNET_CPU_LAYOUT` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuLayout {
    /// Per ISA and pass, as measured.
    Auto,
    /// One layout everywhere.
    Fixed(Layout),
}

/// Reads `PROBUNET_CPU_LAYOUT`; a value that cannot be read is an error naming it.
pub fn from_env() -> Result<CpuLayout, String> {
    choose(std::env::var("PROBUNET_CPU_LAYOUT").ok().as_deref())
}

fn choose(value: Option<&str>) -> Result<CpuLayout, String> {
    match value {
        None | Some("auto") => Ok(CpuLayout::Auto),
        Some("nchw") => Ok(CpuLayout::Fixed(Layout::Nchw)),
        Some("channels-last") => Ok(CpuLayout::Fixed(Layout::ChannelsLast)),
        Some(other) => Err(format!(
            "PROBUNET_CPU_LAYOUT={other:?}: expected \"auto\", \"nchw\" or \"channels-last\""
        )),
    }
}

static INSTALLED: OnceLock<CpuLayout> = OnceLock::new();

/// Makes `choice` the CPU layout of every model built from now on. The first call decides;
/// later calls return what it chose.
pub fn install(choice: CpuLayout) -> CpuLayout {
    *INSTALLED.get_or_init(|| choice)
}

/// The CPU layouts in force: the installed choice, [`CpuLayout::Auto`] if none.
pub fn cpu_layouts() -> Layouts {
    static ISA: OnceLock<String> = OnceLock::new();
    let choice = INSTALLED.get().copied().unwrap_or(CpuLayout::Auto);
    resolve(choice, ISA.get_or_init(crate::sys::cpu_capability))
}

/// The layouts of `choice` on a CPU whose vector ISA is `isa` (as `sys::cpu_capability`
/// names it).
fn resolve(choice: CpuLayout, isa: &str) -> Layouts {
    match choice {
        CpuLayout::Fixed(layout) => Layouts::both(layout),
        CpuLayout::Auto if isa == "AVX512" || isa == "AVX2" => Layouts::both(Layout::ChannelsLast),
        CpuLayout::Auto => Layouts {
            elbo: Layout::Nchw,
            sample: Layout::ChannelsLast,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_a_layout_or_is_refused() {
        assert_eq!(choose(None), Ok(CpuLayout::Auto));
        assert_eq!(choose(Some("auto")), Ok(CpuLayout::Auto));
        assert_eq!(choose(Some("nchw")), Ok(CpuLayout::Fixed(Layout::Nchw)));
        assert_eq!(
            choose(Some("channels-last")),
            Ok(CpuLayout::Fixed(Layout::ChannelsLast))
        );
        let err = choose(Some("NHWC")).unwrap_err();
        assert!(err.contains("PROBUNET_CPU_LAYOUT=\"NHWC\""), "{err}");
    }

    #[test]
    fn vector_units_run_channels_last_and_others_train_nchw() {
        assert_eq!(
            resolve(CpuLayout::Auto, "AVX2"),
            Layouts::both(Layout::ChannelsLast)
        );
        assert_eq!(
            resolve(CpuLayout::Auto, "other"),
            Layouts {
                elbo: Layout::Nchw,
                sample: Layout::ChannelsLast
            }
        );
        assert_eq!(
            resolve(CpuLayout::Auto, "AVX512"),
            Layouts::both(Layout::ChannelsLast)
        );
        assert_eq!(
            resolve(CpuLayout::Fixed(Layout::Nchw), "AVX512"),
            Layouts::both(Layout::Nchw)
        );
    }
}
