//! Convolutions with the seed's initialisers.
//!
//! tch's `nn::conv2d` draws its own initial values; the Probabilistic U-Net needs three
//! specific schemes (Kaiming-normal weights with tiny truncated-normal biases, a unit-normal
//! bias on the latent head, orthogonal 1x1 weights in fcomb), so the layers here create
//! their variables through the `Path` with exactly those values.
use super::simd::{grad_enabled, Isa};
use super::winograd::{self, Filter, Source};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::nn::{self, Init};
use tch::{Device, Kind, TchError, Tensor};

/// How a convolution's weight and bias are initialised (spec/model.md, "Initialisation").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvInit {
    /// U-Net and encoder convs: Kaiming normal (fan-in, ReLU gain), bias truncated normal std 0.001.
    KaimingTruncated,
    /// The 1x1 mu/log-sigma head: Kaiming normal weights, bias plain normal std 1.
    KaimingUnitBias,
    /// Fcomb: orthogonal weights (gain 1), bias truncated normal std 0.001.
    OrthogonalTruncated,
}

/// Standard deviation of the seed's truncated-normal biases.
const BIAS_STD: f64 = 0.001;

/// A 2-D convolution with "same" padding (odd kernel, stride 1).
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    padding: i64,
    /// The weight transformed for [`winograd`] while a sampling pass holds it
    /// ([`Prepared`]).
    prepared: Mutex<Option<Arc<Filter>>>,
}

impl Conv2d {
    pub fn new(
        p: nn::Path,
        c_in: i64,
        c_out: i64,
        kernel: i64,
        init: ConvInit,
    ) -> Result<Self, TchError> {
        let dims = [c_out, c_in, kernel, kernel];
        let weight = match init {
            ConvInit::KaimingTruncated | ConvInit::KaimingUnitBias => {
                p.f_var("weight", &dims, nn::init::DEFAULT_KAIMING_NORMAL)?
            }
            ConvInit::OrthogonalTruncated => {
                // tch's orthogonal init returns the flattened [out, in*k*k] matrix.
                let flat = nn::init::f_init(
                    Init::Orthogonal { gain: 1.0 },
                    &[c_out, c_in * kernel * kernel],
                    p.device(),
                    Kind::Float,
                )?;
                p.f_var_copy("weight", &flat.f_view(dims)?)?
            }
        };
        let bias = match init {
            ConvInit::KaimingUnitBias => p.f_var(
                "bias",
                &[c_out],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            ConvInit::KaimingTruncated | ConvInit::OrthogonalTruncated => {
                let bias = p.f_zeros("bias", &[c_out])?;
                tch::no_grad(|| truncated_normal_(&bias, BIAS_STD))?;
                bias
            }
        };
        Ok(Self {
            weight,
            bias,
            padding: kernel / 2,
            prepared: Mutex::new(None),
        })
    }

    /// `relu(forward(xs))`, by [`winograd`] where a sampling pass prepared this layer and
    /// `xs` fits it.
    pub fn forward_relu(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        match self.winograd_relu(&[xs])? {
            Some(out) => Ok(out),
            None => self.forward(xs)?.f_relu_(),
        }
    }

    /// `relu(forward_split(a, b))`, by [`winograd`] where it applies (see
    /// [`Conv2d::forward_relu`]).
    pub fn forward_split_relu(&self, a: &Tensor, b: &Tensor) -> Result<Tensor, TchError> {
        match self.winograd_relu(&[a, b])? {
            Some(out) => Ok(out),
            None => self.forward_split(a, b)?.f_relu_(),
        }
    }

    /// Runs in the input's precision: a bfloat16 input casts the float32 weights, as
    /// autocast does, while the parameters and their gradients stay float32.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        self.convolve(xs, &self.weight, Some(&self.bias))
    }

    /// [`Conv2d::forward`] over `a` and `b` concatenated along channels, without the
    /// concatenation: the sum of a conv over each with its slice of the weight.
    pub fn forward_split(&self, a: &Tensor, b: &Tensor) -> Result<Tensor, TchError> {
        let a_channels = a.size()[1];
        let b_channels = self.weight.size()[1] - a_channels;
        let a_weight = self.weight.f_narrow(1, 0, a_channels)?;
        let b_weight = self.weight.f_narrow(1, a_channels, b_channels)?;
        // In place: the sum's backward needs neither operand.
        self.convolve(a, &a_weight, Some(&self.bias))?
            .f_add_(&self.convolve(b, &b_weight, None)?)
    }

    /// `xs` convolved with `weight` (and `bias`) at this layer's padding, the parameters
    /// cast to `xs`'s kind where they differ (bf16 autocast on CUDA); by [`winograd`]
    /// inside autograd where that fits ([`winograd_trainable`]).
    fn convolve(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor, TchError> {
        let cast = |t: &Tensor| {
            if t.kind() == xs.kind() {
                Ok(t.shallow_clone())
            } else {
                t.f_to_kind(xs.kind())
            }
        };
        let (weight, bias) = (cast(weight)?, bias.map(cast).transpose()?);
        if let Some(out) = winograd_trainable(xs, &weight, bias.as_ref())? {
            return Ok(out);
        }
        xs.f_conv2d(
            &weight,
            bias.as_ref(),
            [1, 1],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }

    /// The weight and bias, in that order (for the l2 term and parameter counts).
    pub fn parameters(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }

    pub(super) fn prepared(&self) -> MutexGuard<'_, Option<Arc<Filter>>> {
        // The guarded value is a plain cache, whole at every moment: a panic elsewhere
        // while it was held leaves nothing half-written.
        self.prepared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Transforms the weight for [`winograd`] where this layer fits it: 3x3, float32 on a
    /// CPU with a vector unit for it, channels in whole lanes.
    fn prepare(&self) -> Result<(), TchError> {
        let size = self.weight.size();
        let fits = Isa::available().is_some()
            && self.weight.device() == Device::Cpu
            && self.weight.kind() == Kind::Float
            && size.get(2..) == Some(&[3, 3][..]);
        if !fits {
            return Ok(());
        }
        let weight = Vec::<f32>::try_from(&self.weight.f_contiguous()?.f_flatten(0, -1)?)?;
        let bias = Vec::<f32>::try_from(&self.bias.f_contiguous()?)?;
        *self.prepared() = match Filter::new(&weight, &bias, size[1] as usize) {
            Ok(filter) => Some(Arc::new(filter)),
            Err(winograd::Unfit::Channels { .. }) => None,
            Err(e) => return Err(TchError::Shape(format!("winograd filter: {e}"))),
        };
        Ok(())
    }

    /// `relu(conv(cat(inputs)))` by [`winograd`]; `None` where this layer is not prepared,
    /// autograd records, or an input is not a channels-last float32 CPU tensor in whole
    /// lanes of channels.
    fn winograd_relu(&self, inputs: &[&Tensor]) -> Result<Option<Tensor>, TchError> {
        let Some(filter) = self.prepared().clone() else {
            return Ok(None);
        };
        let Some(isa) = Isa::available() else {
            return Ok(None);
        };
        let Some(first) = inputs.first() else {
            return Ok(None);
        };
        let (n, _, h, w) = first.size4()?;
        if grad_enabled() || !inputs.iter().all(|x| winograd_input(x, (n, h, w))) {
            return Ok(None);
        }
        let outputs = self.bias.size()[0];
        let out = Tensor::f_empty([n, h, w, outputs], (Kind::Float, Device::Cpu))?;
        // SAFETY: `winograd_input` checked that every input is a dense channels-last
        // float32 CPU tensor of `numel` floats from `data_ptr`; `out` is a new contiguous
        // one. All are held here for the whole call, and only `out` is written.
        let (sources, out_floats) = unsafe {
            let sources: Vec<Source> = inputs
                .iter()
                .map(|x| Source {
                    pixels: std::slice::from_raw_parts(x.data_ptr() as *const f32, x.numel()),
                    channels: x.size()[1] as usize,
                })
                .collect();
            let floats = std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, out.numel());
            (sources, floats)
        };
        let dims = (n as usize, h as usize, w as usize);
        winograd::conv3x3(isa, &filter, &sources, dims, true, out_floats)
            .map_err(|e| TchError::Shape(format!("winograd convolution: {e}")))?;
        Ok(Some(out.f_permute([0, 3, 1, 2])?))
    }
}

/// Whether `x` can be read as `[n, h, w, channels]` floats for [`winograd`].
fn winograd_input(x: &Tensor, (n, h, w): (i64, i64, i64)) -> bool {
    let size = x.size();
    let [xn, c, xh, xw] = size[..] else {
        return false;
    };
    (xn, xh, xw) == (n, h, w)
        && c % winograd::LANES as i64 == 0
        && x.kind() == Kind::Float
        && x.device() == Device::Cpu
        && x.stride() == [h * w * c, 1, w * c, c]
}

extern "C" {
    fn probunet_winograd_autograd(
        kernel: winograd::AutogradKernel,
        weight_kernel: winograd::WeightGradientKernel,
        input: *const torch_sys::C_tensor,
        weight: *const torch_sys::C_tensor,
        bias: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
    ) -> i32;
    fn probunet_winograd_error(buffer: *mut std::ffi::c_char, size: usize);
}

/// What the last failed `probunet_winograd_autograd` on this thread said.
fn winograd_error() -> String {
    let mut buffer = [0 as std::ffi::c_char; 1024];
    // SAFETY: plain FFI writing at most `buffer.len()` bytes, NUL-terminated.
    unsafe { probunet_winograd_error(buffer.as_mut_ptr(), buffer.len()) };
    // SAFETY: the buffer is NUL-terminated within its length.
    unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// `conv(xs, weight) + bias` as one autograd node (winograd.cpp) whose forward pass and
/// input and weight gradients run [`winograd`], and whose bias gradient is libtorch's
/// sum; `None` where it does not fit: a 3x3 float32 filter bank on the CPU in whole
/// lanes of channels, a channels-last input, a vector unit.
fn winograd_trainable(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>, TchError> {
    let size = weight.size();
    let (Some(&outputs), Ok((n, c, h, w))) = (size.first(), xs.size4()) else {
        return Ok(None);
    };
    if Isa::available().is_none() {
        return Ok(None);
    }
    let fits = weight.kind() == Kind::Float
        && weight.device() == Device::Cpu
        && size[1..] == [c, 3, 3]
        && outputs % winograd::LANES as i64 == 0
        && winograd_input(xs, (n, h, w));
    if !fits {
        return Ok(None);
    }
    let mut out = std::ptr::null_mut();
    // SAFETY: plain FFI on live tensors; winograd.cpp catches every C++ exception and
    // hands back a new tensor it allocated, which `from_ptr` then owns.
    let rc = unsafe {
        probunet_winograd_autograd(
            winograd::autograd_kernel,
            winograd::weight_gradient_kernel,
            xs.as_ptr(),
            weight.as_ptr(),
            bias.map_or(std::ptr::null(), Tensor::as_ptr),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(TchError::Torch(format!(
            "probunet's Winograd convolution of a {:?} input: {}",
            xs.size(),
            winograd_error()
        )));
    }
    // SAFETY: `out` is the new tensor winograd.cpp allocated for us alone.
    Ok(Some(unsafe { Tensor::from_ptr(out) }))
}

/// Convolutions prepared for [`winograd`] while this lives: a sampling pass holds one, so
/// the weights are transformed once per pass rather than once per part, and released
/// after it, so a later optimiser step never meets a stale transform.
pub struct Prepared<'a>(Vec<&'a Conv2d>);

impl<'a> Prepared<'a> {
    pub fn new(convs: impl IntoIterator<Item = &'a Conv2d>) -> Result<Self, TchError> {
        let prepared = Self(convs.into_iter().collect());
        for conv in &prepared.0 {
            conv.prepare()?;
        }
        Ok(prepared)
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        for conv in &self.0 {
            *conv.prepared() = None;
        }
    }
}

/// Fills `t` in place with a normal(0, std) truncated at two standard deviations, by
/// inverse-CDF sampling as `torch.nn.init.trunc_normal_` does (no rejection loop).
pub fn truncated_normal_(t: &Tensor, std: f64) -> Result<(), TchError> {
    // erf(2 / sqrt 2): the truncation point in the uniform domain of erfinv.
    let edge = Tensor::from(std::f64::consts::SQRT_2)
        .f_erf()?
        .f_double_value(&[])?;
    let mut t = t.shallow_clone();
    let _ = t.f_uniform_(-edge, edge)?;
    let _ = t.f_erfinv_()?;
    let _ = t.f_mul_scalar_(std * std::f64::consts::SQRT_2)?;
    let _ = t.f_clamp_(-2.0 * std, 2.0 * std)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn truncated_normal_stays_within_two_std_with_the_truncated_spread() {
        tch::manual_seed(1);
        let t = Tensor::zeros([200_000], (Kind::Float, Device::Cpu));
        truncated_normal_(&t, 0.001).unwrap();
        assert!(t.abs().max().double_value(&[]) <= 0.002);
        // A normal truncated at +-2 sigma has std 0.8796 sigma.
        let std = t.std(true).double_value(&[]);
        assert!((std / 0.001 - 0.8796).abs() < 0.01, "std {std}");
    }

    #[test]
    fn initialisers_follow_the_seed() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let kaiming = Conv2d::new(vs.root() / "k", 64, 128, 3, ConvInit::KaimingTruncated).unwrap();
        let expected = (2.0f64 / (64.0 * 9.0)).sqrt();
        let std = kaiming.weight.std(true).double_value(&[]);
        assert!(
            (std / expected - 1.0).abs() < 0.02,
            "kaiming std {std} vs {expected}"
        );
        let head = Conv2d::new(vs.root() / "h", 8, 4096, 1, ConvInit::KaimingUnitBias).unwrap();
        let std = head.bias.std(true).double_value(&[]);
        assert!((std - 1.0).abs() < 0.05, "head bias std {std}");
        let ortho = Conv2d::new(vs.root() / "o", 34, 32, 1, ConvInit::OrthogonalTruncated).unwrap();
        let w = ortho.weight.view([32, 34]);
        let gram = w.matmul(&w.tr());
        let identity = Tensor::eye(32, (Kind::Float, Device::Cpu));
        assert!((gram - identity).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn a_split_conv_is_the_conv_of_the_concatenation_with_its_gradients() {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = Conv2d::new(vs.root(), 6 + 4, 5, 3, ConvInit::KaimingTruncated).unwrap();
        let _ = tch::no_grad(|| conv.bias.shallow_clone().normal_(0.0, 1.0));
        let a = Tensor::randn([2, 6, 9, 7], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::randn([2, 4, 9, 7], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let grads = |out: Tensor| {
            let out = out.relu();
            let inputs = [&a, &b, &conv.weight, &conv.bias];
            let grads = Tensor::run_backward(&[out.sum(Kind::Float)], &inputs, false, false);
            (out.detach(), grads)
        };
        let (split, split_grads) = grads(conv.forward_split(&a, &b).unwrap());
        let (whole, whole_grads) = grads(conv.forward(&Tensor::cat(&[&a, &b], 1)).unwrap());
        assert!((split - whole).abs().max().double_value(&[]) < 1e-5);
        for (name, (s, w)) in ["a", "b", "weight", "bias"]
            .iter()
            .zip(split_grads.iter().zip(&whole_grads))
        {
            let diff = (s - w).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "gradient of {name}: {diff}");
        }
    }

    /// `[n, c, h, w]` values with channels-last strides, as the model's passes hold them.
    fn channels_last(n: i64, c: i64, h: i64, w: i64) -> Tensor {
        Tensor::randn([n, h, w, c], (Kind::Float, Device::Cpu)).permute([0, 3, 1, 2])
    }

    #[test]
    fn prepared_convs_take_the_winograd_path_only_where_it_applies() {
        if Isa::available().is_none() {
            return;
        }
        tch::manual_seed(6);
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = Conv2d::new(vs.root(), 32 + 16, 32, 3, ConvInit::KaimingTruncated).unwrap();
        let (a, b) = (channels_last(2, 32, 9, 6), channels_last(2, 16, 9, 6));
        let whole = Tensor::cat(&[&a, &b], 1).contiguous();
        let expected = tch::no_grad(|| conv.forward(&whole).unwrap().relu());
        let close = |got: &Tensor| {
            let diff = (got - &expected).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "off by {diff}");
        };
        tch::no_grad(|| assert!(conv.winograd_relu(&[&a, &b]).unwrap().is_none()));
        {
            let _prepared = Prepared::new([&conv]).unwrap();
            tch::no_grad(|| {
                close(&conv.winograd_relu(&[&a, &b]).unwrap().unwrap());
                close(&conv.forward_split_relu(&a, &b).unwrap());
                // NCHW input, or channels outside whole lanes: libtorch's path.
                assert!(conv.winograd_relu(&[&whole]).unwrap().is_none());
            });
            // Autograd recording: libtorch's path, with its gradients.
            assert!(conv.winograd_relu(&[&a, &b]).unwrap().is_none());
            let out = conv.forward_split_relu(&a, &b).unwrap();
            assert!(out.requires_grad());
        }
        tch::no_grad(|| assert!(conv.winograd_relu(&[&a, &b]).unwrap().is_none()));
        let unfit = Conv2d::new(vs.root() / "u", 16, 24, 3, ConvInit::KaimingTruncated).unwrap();
        let _prepared = Prepared::new([&unfit]).unwrap();
        let x = channels_last(1, 16, 4, 4);
        tch::no_grad(|| assert!(unfit.winograd_relu(&[&x]).unwrap().is_none()));
    }

    #[test]
    fn trainable_winograd_convs_match_libtorch_with_their_gradients() {
        if Isa::available().is_none() {
            return;
        }
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let conv = Conv2d::new(vs.root(), 32 + 16, 16, 3, ConvInit::KaimingTruncated).unwrap();
        let _ = tch::no_grad(|| conv.bias.shallow_clone().normal_(0.0, 1.0));
        let a = channels_last(2, 32, 7, 10).set_requires_grad(true);
        let b = channels_last(2, 16, 7, 10).set_requires_grad(true);
        // NCHW copies take libtorch's path.
        let a_nchw = a.detach().contiguous().set_requires_grad(true);
        let b_nchw = b.detach().contiguous().set_requires_grad(true);
        let grads = |a: &Tensor, b: &Tensor| {
            let out = conv.forward_split(a, b).unwrap().relu();
            let inputs = [a, b, &conv.weight, &conv.bias];
            let grads = Tensor::run_backward(&[out.sum(Kind::Float)], &inputs, false, false);
            (out.detach(), grads)
        };
        let x = Tensor::cat(&[&a, &b], 1);
        let (n, c, h, w) = x.size4().unwrap();
        assert!(winograd_trainable(&x, &conv.weight, Some(&conv.bias))
            .unwrap()
            .is_some());
        assert!(winograd_input(&a, (n, h, w)) && !winograd_input(&a_nchw, (n, h, w)));
        assert_eq!(c, 48);
        let (winograd, winograd_grads) = grads(&a, &b);
        let (libtorch, libtorch_grads) = grads(&a_nchw, &b_nchw);
        assert!((winograd - libtorch).abs().max().double_value(&[]) < 1e-4);
        for (name, (w, l)) in ["a", "b", "weight", "bias"]
            .iter()
            .zip(winograd_grads.iter().zip(&libtorch_grads))
        {
            let scale = l.abs().max().double_value(&[]).max(1.0);
            let diff = (w - l).abs().max().double_value(&[]);
            assert!(diff < 1e-4 * scale, "gradient of {name}: {diff} of {scale}");
        }
    }
}
