//! A safe, zero-copy reader for the part of Python's pickle format (protocols 2-5) that
//! numpy arrays inside plain dicts and lists use.
//!
//! Unpickling in Python runs whatever callables a file names. This reader runs nothing: it
//! interprets a fixed set of opcodes, resolves only an allow-list of numpy and codec
//! globals, and rejects everything else with the offending byte offset. Objects live in a
//! flat arena so that memo references share them without copying or recursion, and byte
//! payloads point into the input, so a memory-mapped multi-gigabyte file is parsed without
//! touching the pages that hold array data.

use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use thiserror::Error;

/// Most dimensions an array may declare; numpy itself allows 64.
pub const MAX_NDIM: usize = 64;

/// Opcode bytes, named as in CPython's `pickle.py`.
pub(crate) mod op {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_LIST: u8 = b']';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const TUPLE: u8 = b't';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const BINUNICODE: u8 = b'X';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINBYTES8: u8 = 0x8e;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const BINFLOAT: u8 = b'G';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const GLOBAL: u8 = b'c';
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const REDUCE: u8 = b'R';
    pub const BUILD: u8 = b'b';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const MEMOIZE: u8 = 0x94;
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
}

/// Why a pickle was refused. `offset` is the byte offset of the opcode that failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PickleError {
    #[error("not a pickle of protocol 2-5: first byte is {found:#04x}, not PROTO (0x80)")]
    NotAPickle { found: u8 },
    #[error("unsupported pickle protocol {version} at byte {offset} (only 2-5 are read)")]
    UnsupportedProtocol { offset: usize, version: u8 },
    #[error("pickle is truncated: the opcode at byte {offset} runs past the end of the input")]
    Truncated { offset: usize },
    #[error("opcode {opcode:#04x} at byte {offset} is not supported")]
    UnsupportedOpcode { offset: usize, opcode: u8 },
    #[error("global {module}.{name} at byte {offset} is not allowed")]
    ForbiddenGlobal {
        offset: usize,
        module: String,
        name: String,
    },
    #[error("{op} at byte {offset} needs more values on the stack")]
    StackUnderflow { offset: usize, op: &'static str },
    #[error("{op} at byte {offset} has no matching MARK")]
    MissingMark { offset: usize, op: &'static str },
    #[error("memo entry {index} read at byte {offset} was never stored")]
    MissingMemo { offset: usize, index: usize },
    #[error("{op} at byte {offset} expected {expected}, found {found}")]
    Unexpected {
        offset: usize,
        op: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("invalid argument at byte {offset}: {what}")]
    BadArgument { offset: usize, what: &'static str },
    #[error("string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: usize },
    #[error("integer at byte {offset} does not fit in 64 bits")]
    IntegerOverflow { offset: usize },
    #[error("text at byte {offset} is not latin-1 (character U+{code:04X})")]
    NotLatin1 { offset: usize, code: u32 },
    #[error("numpy dtype {typecode:?} at byte {offset} is not supported (only f4, f8, u1, b1)")]
    UnsupportedDtype { offset: usize, typecode: String },
    #[error("byte order {order:?} at byte {offset} is invalid for dtype {element}")]
    InvalidByteOrder {
        offset: usize,
        order: String,
        element: ElementType,
    },
    #[error("array at byte {offset} has {ndim} dimensions (at most {MAX_NDIM} are read)")]
    TooManyDimensions { offset: usize, ndim: usize },
    #[error("array at byte {offset}: shape {shape:?} is too large to address")]
    ShapeOverflow { offset: usize, shape: Vec<usize> },
    #[error(
        "array at byte {offset}: shape {shape:?} of {dtype} needs {expected} bytes, \
         but its payload has {found}"
    )]
    PayloadSize {
        offset: usize,
        shape: Vec<usize>,
        dtype: Dtype,
        expected: usize,
        found: usize,
    },
}

/// Why an array's values could not be written out.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConvertError {
    #[error("output holds {found} values but the array has {expected}")]
    OutputLength { expected: usize, found: usize },
    #[error("dtype {dtype} cannot be read as {wanted}")]
    Dtype { dtype: Dtype, wanted: &'static str },
    #[error("non-finite value {value} at {position:?}")]
    NonFinite { position: Vec<usize>, value: f64 },
    #[error("value {value} at {position:?} is neither 0 nor 1")]
    NotBinary { position: Vec<usize>, value: f64 },
}

/// The callables and classes a pickle may name; anything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `numpy.core.multiarray._reconstruct` (protocols 2-4).
    Reconstruct,
    /// `numpy.ndarray`, only as `_reconstruct`'s first argument.
    NdArray,
    /// `numpy.dtype`.
    Dtype,
    /// `numpy.core.numeric._frombuffer` (protocol 5).
    FromBuffer,
    /// `_codecs.encode`, which protocol 2 uses to carry bytes as latin-1 text.
    CodecsEncode,
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        const MULTIARRAY: [&str; 2] = ["numpy.core.multiarray", "numpy._core.multiarray"];
        const NUMERIC: [&str; 2] = ["numpy.core.numeric", "numpy._core.numeric"];
        let in_numpy = module == "numpy" || MULTIARRAY.contains(&module);
        match name {
            "_reconstruct" if MULTIARRAY.contains(&module) => Some(Self::Reconstruct),
            "ndarray" if in_numpy => Some(Self::NdArray),
            "dtype" if in_numpy => Some(Self::Dtype),
            "_frombuffer" if NUMERIC.contains(&module) => Some(Self::FromBuffer),
            "encode" if module == "_codecs" => Some(Self::CodecsEncode),
            _ => None,
        }
    }
}

/// Index of an object in a [`Pickle`]'s arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId(usize);

/// A stack or container slot: scalars inline, everything else by arena index so that
/// copies made by the memo are cheap and share the object as Python would.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Global(Global),
    Object(ObjectId),
}

/// An object in the arena.
#[derive(Debug)]
pub enum Object<'a> {
    Str(&'a str),
    /// `bytes` or `bytearray`.
    Bytes(Payload<'a>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Entries in insertion order; a repeated key is kept as a second entry.
    Dict(Vec<(Value, Value)>),
    Dtype(Dtype),
    Array(Box<ArrayView<'a>>),
    /// A `numpy.dtype(...)` result still waiting for BUILD to set its byte order.
    PendingDtype(ElementType),
    /// A `_reconstruct(...)` result still waiting for BUILD to set its contents.
    PendingArray,
}

impl Object<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Self::Str(_) => "str",
            Self::Bytes(_) => "bytes",
            Self::List(_) => "list",
            Self::Tuple(_) => "tuple",
            Self::Dict(_) => "dict",
            Self::Dtype(_) => "numpy.dtype",
            Self::Array(_) => "numpy.ndarray",
            Self::PendingDtype(_) => "numpy.dtype without state",
            Self::PendingArray => "numpy.ndarray without state",
        }
    }
}

/// Bytes of a payload: borrowed from the input where the pickle stores them verbatim, and
/// shared-owned where protocol 2's latin-1 text had to be decoded, so that clones of an
/// array referenced many times never copy its data.
#[derive(Clone)]
pub enum Payload<'a> {
    Borrowed(&'a [u8]),
    Decoded(Arc<Vec<u8>>),
}

impl Deref for Payload<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Borrowed(bytes) => bytes,
            Self::Decoded(bytes) => bytes,
        }
    }
}

impl fmt::Debug for Payload<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self {
            Self::Borrowed(_) => "borrowed",
            Self::Decoded(_) => "decoded",
        };
        write!(f, "Payload({} bytes, {how})", self.len())
    }
}

/// Element types the reader accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElementType {
    F4,
    F8,
    U1,
    B1,
}

impl ElementType {
    fn from_typecode(code: &str) -> Option<Self> {
        match code {
            "f4" => Some(Self::F4),
            "f8" => Some(Self::F8),
            "u1" => Some(Self::U1),
            "b1" => Some(Self::B1),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        match self {
            Self::F4 => 4,
            Self::F8 => 8,
            Self::U1 | Self::B1 => 1,
        }
    }

    /// numpy's type code, e.g. `f4`.
    pub fn code(self) -> &'static str {
        match self {
            Self::F4 => "f4",
            Self::F8 => "f8",
            Self::U1 => "u1",
            Self::B1 => "b1",
        }
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Byte order as numpy records it; one-byte types have none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ByteOrder {
    Little,
    Big,
    NotApplicable,
}

/// Element type and byte order of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dtype {
    pub element: ElementType,
    pub byte_order: ByteOrder,
}

impl Dtype {
    fn new(element: ElementType, order: &str) -> Option<Self> {
        let byte_order = match order {
            "<" => ByteOrder::Little,
            ">" => ByteOrder::Big,
            "|" if element.itemsize() == 1 => ByteOrder::NotApplicable,
            _ => return None,
        };
        Some(Self {
            element,
            byte_order,
        })
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = match self.byte_order {
            ByteOrder::Little => '<',
            ByteOrder::Big => '>',
            ByteOrder::NotApplicable => '|',
        };
        write!(f, "{order}{}", self.element)
    }
}

/// Layout of the payload: C (last axis fastest) or Fortran (first axis fastest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryOrder {
    C,
    Fortran,
}

/// A numpy array as the file stores it. Building one only checks that shape, dtype and
/// payload length agree; values are read by the `write_*` methods.
#[derive(Debug, Clone)]
pub struct ArrayView<'a> {
    shape: Vec<usize>,
    dtype: Dtype,
    order: MemoryOrder,
    data: Payload<'a>,
}

/// An f32's exponent bits: all set for infinities and NaNs.
const F32_EXPONENT: u32 = 0x7f80_0000;

/// Whether every little-endian f32 in `bytes` is finite (a vectorised check).
pub fn finite_f32_le(bytes: &[u8]) -> bool {
    let bad = bytes.chunks_exact(4).fold(false, |bad, b| {
        bad | (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & F32_EXPONENT == F32_EXPONENT)
    });
    !bad
}

/// Whether every byte is 0 or 1 (a vectorised check).
pub fn binary_u8(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |acc, &b| acc | (b & !1)) == 0
}

impl ArrayView<'_> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    pub fn memory_order(&self) -> MemoryOrder {
        self.order
    }

    /// The raw payload in the array's memory order and byte order.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The same array over a copy of its payload (read into a buffer of the caller's, say,
    /// instead of through a memory map); `None` if `data` is not the payload's length.
    pub fn with_data<'b>(&self, data: &'b [u8]) -> Option<ArrayView<'b>> {
        (data.len() == self.data.len()).then(|| ArrayView {
            shape: self.shape.clone(),
            dtype: self.dtype,
            order: self.order,
            data: Payload::Borrowed(data),
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len() / self.dtype.element.itemsize()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Writes the values as f32 in C order; only f4 and f8 arrays qualify, and a value
    /// that is not finite as f32 is an error.
    pub fn write_f32(&self, out: &mut [f32]) -> Result<(), ConvertError> {
        self.check_output(out.len())?;
        if self.bulk_f32(out) {
            return Ok(());
        }
        let shape = &self.shape;
        let store = |out: &mut [f32], index: usize, value: f32, original: f64| {
            if value.is_finite() {
                out[index] = value;
                Ok(())
            } else {
                Err(ConvertError::NonFinite {
                    position: position(shape, index),
                    value: original,
                })
            }
        };
        match (self.dtype.element, self.dtype.byte_order) {
            (ElementType::F4, ByteOrder::Big) => self.for_each(|i, b: [u8; 4]| {
                let v = f32::from_be_bytes(b);
                store(out, i, v, v.into())
            }),
            (ElementType::F4, _) => self.for_each(|i, b: [u8; 4]| {
                let v = f32::from_le_bytes(b);
                store(out, i, v, v.into())
            }),
            (ElementType::F8, ByteOrder::Big) => self.for_each(|i, b: [u8; 8]| {
                let v = f64::from_be_bytes(b);
                store(out, i, v as f32, v)
            }),
            (ElementType::F8, _) => self.for_each(|i, b: [u8; 8]| {
                let v = f64::from_le_bytes(b);
                store(out, i, v as f32, v)
            }),
            (ElementType::U1 | ElementType::B1, _) => Err(ConvertError::Dtype {
                dtype: self.dtype,
                wanted: "float32 or float64",
            }),
        }
    }

    /// Writes a binary mask as 0/1 bytes in C order; any other value is an error.
    pub fn write_u8_mask(&self, out: &mut [u8]) -> Result<(), ConvertError> {
        self.check_output(out.len())?;
        if self.bulk_u8_mask(out) {
            return Ok(());
        }
        let shape = &self.shape;
        let store = |out: &mut [u8], index: usize, one: Option<bool>, value: f64| match one {
            Some(one) => {
                out[index] = u8::from(one);
                Ok(())
            }
            None => Err(ConvertError::NotBinary {
                position: position(shape, index),
                value,
            }),
        };
        let binary = |v: f64| (v == 0.0 || v == 1.0).then_some(v == 1.0);
        match (self.dtype.element, self.dtype.byte_order) {
            (ElementType::U1 | ElementType::B1, _) => {
                self.for_each(|i, [b]: [u8; 1]| store(out, i, (b <= 1).then_some(b == 1), b.into()))
            }
            (ElementType::F4, ByteOrder::Big) => self.for_each(|i, b: [u8; 4]| {
                let v = f32::from_be_bytes(b).into();
                store(out, i, binary(v), v)
            }),
            (ElementType::F4, _) => self.for_each(|i, b: [u8; 4]| {
                let v = f32::from_le_bytes(b).into();
                store(out, i, binary(v), v)
            }),
            (ElementType::F8, ByteOrder::Big) => self.for_each(|i, b: [u8; 8]| {
                let v = f64::from_be_bytes(b);
                store(out, i, binary(v), v)
            }),
            (ElementType::F8, _) => self.for_each(|i, b: [u8; 8]| {
                let v = f64::from_le_bytes(b);
                store(out, i, binary(v), v)
            }),
        }
    }

    /// Whether the payload's bytes are already what [`ArrayView::write_f32`] writes,
    /// as little-endian bytes: C-order little-endian f4.
    pub fn is_verbatim_f32(&self) -> bool {
        self.c_ordered()
            && self.dtype.element == ElementType::F4
            && self.dtype.byte_order != ByteOrder::Big
    }

    /// Whether the payload's bytes are already what [`ArrayView::write_u8_mask`] writes
    /// when every value is 0 or 1: C-order u1 or b1.
    pub fn is_verbatim_u8_mask(&self) -> bool {
        self.c_ordered() && matches!(self.dtype.element, ElementType::U1 | ElementType::B1)
    }

    /// Whether the elements lie in memory in C order, as the output wants them.
    fn c_ordered(&self) -> bool {
        self.order == MemoryOrder::C || self.shape.len() < 2
    }

    /// [`ArrayView::write_f32`] for the common layouts (C order, little-endian f4 or f8),
    /// in loops the compiler vectorises: it converts everything and tells whether every
    /// value was finite. `false` (another layout, or a bad value) leaves the element-wise
    /// path to do the work and name the first bad value.
    fn bulk_f32(&self, out: &mut [f32]) -> bool {
        if !self.c_ordered() || self.dtype.byte_order == ByteOrder::Big {
            return false;
        }
        let mut bad = false;
        match self.dtype.element {
            ElementType::F4 => {
                for (o, b) in out.iter_mut().zip(self.data.chunks_exact(4)) {
                    let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    bad |= v.to_bits() & F32_EXPONENT == F32_EXPONENT;
                    *o = v;
                }
            }
            ElementType::F8 => {
                let chunks = self.data.chunks_exact(8).filter_map(|b| b.try_into().ok());
                for (o, b) in out.iter_mut().zip(chunks) {
                    let v = f64::from_le_bytes(b) as f32;
                    bad |= v.to_bits() & F32_EXPONENT == F32_EXPONENT;
                    *o = v;
                }
            }
            ElementType::U1 | ElementType::B1 => return false,
        }
        !bad
    }

    /// [`ArrayView::write_u8_mask`] for the common layouts (C order; u1, b1 or
    /// little-endian f4), vectorised as [`ArrayView::bulk_f32`] is.
    fn bulk_u8_mask(&self, out: &mut [u8]) -> bool {
        if !self.c_ordered() || self.dtype.byte_order == ByteOrder::Big {
            return false;
        }
        match self.dtype.element {
            ElementType::U1 | ElementType::B1 => {
                out.copy_from_slice(&self.data);
                binary_u8(out)
            }
            ElementType::F4 => {
                let mut bad = false;
                for (o, b) in out.iter_mut().zip(self.data.chunks_exact(4)) {
                    let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    bad |= !(v == 0.0 || v == 1.0);
                    *o = u8::from(v == 1.0);
                }
                !bad
            }
            ElementType::F8 => false,
        }
    }

    fn check_output(&self, found: usize) -> Result<(), ConvertError> {
        let expected = self.len();
        if found == expected {
            Ok(())
        } else {
            Err(ConvertError::OutputLength { expected, found })
        }
    }

    /// Calls `f(c_order_index, element_bytes)` for every element, in memory order.
    fn for_each<const N: usize>(
        &self,
        mut f: impl FnMut(usize, [u8; N]) -> Result<(), ConvertError>,
    ) -> Result<(), ConvertError> {
        let mut element = [0u8; N];
        let chunks = self.data.chunks_exact(N);
        if self.order == MemoryOrder::C || self.shape.len() < 2 {
            for (index, chunk) in chunks.enumerate() {
                element.copy_from_slice(chunk);
                f(index, element)?;
            }
        } else {
            let mut walk = FortranWalk::new(&self.shape);
            for chunk in chunks {
                element.copy_from_slice(chunk);
                f(walk.offset, element)?;
                walk.advance();
            }
        }
        Ok(())
    }
}

/// Multi-dimensional position of a C-order flat index, for error messages.
fn position(shape: &[usize], mut index: usize) -> Vec<usize> {
    let mut position = vec![0; shape.len()];
    for (slot, &dim) in position.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = index % dim;
            index /= dim;
        }
    }
    position
}

/// Walks an array in Fortran order (first axis fastest), tracking each element's C-order
/// offset, so Fortran payloads are converted in one sequential read.
struct FortranWalk<'s> {
    shape: &'s [usize],
    strides: Vec<usize>,
    counter: Vec<usize>,
    offset: usize,
}

impl<'s> FortranWalk<'s> {
    fn new(shape: &'s [usize]) -> Self {
        let mut strides = vec![1usize; shape.len()];
        for axis in (0..shape.len().saturating_sub(1)).rev() {
            strides[axis] = strides[axis + 1].saturating_mul(shape[axis + 1]);
        }
        Self {
            shape,
            strides,
            counter: vec![0; shape.len()],
            offset: 0,
        }
    }

    fn advance(&mut self) {
        for ((count, &dim), &stride) in self.counter.iter_mut().zip(self.shape).zip(&self.strides) {
            *count += 1;
            self.offset = self.offset.wrapping_add(stride);
            if *count < dim {
                return;
            }
            *count = 0;
            self.offset = self.offset.wrapping_sub(stride.wrapping_mul(dim));
        }
    }
}

/// A parsed pickle: an object arena and the value STOP returned.
#[derive(Debug)]
pub struct Pickle<'a> {
    objects: Vec<Object<'a>>,
    root: Value,
}

impl<'a> Pickle<'a> {
    /// The value the pickle returns.
    pub fn root(&self) -> Value {
        self.root
    }

    pub fn object(&self, value: Value) -> Option<&Object<'a>> {
        object(&self.objects, value)
    }

    pub fn as_str(&self, value: Value) -> Option<&'a str> {
        match self.object(value)? {
            Object::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_dict(&self, value: Value) -> Option<&[(Value, Value)]> {
        match self.object(value)? {
            Object::Dict(entries) => Some(entries),
            _ => None,
        }
    }

    /// Items of a list or tuple.
    pub fn as_sequence(&self, value: Value) -> Option<&[Value]> {
        match self.object(value)? {
            Object::List(items) | Object::Tuple(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_array(&self, value: Value) -> Option<&ArrayView<'a>> {
        match self.object(value)? {
            Object::Array(array) => Some(array),
            _ => None,
        }
    }

    /// Python-style type name of a value, for error messages.
    pub fn kind(&self, value: Value) -> &'static str {
        kind(&self.objects, value)
    }
}

fn object<'o, 'a>(objects: &'o [Object<'a>], value: Value) -> Option<&'o Object<'a>> {
    match value {
        Value::Object(ObjectId(index)) => objects.get(index),
        _ => None,
    }
}

fn kind(objects: &[Object<'_>], value: Value) -> &'static str {
    match value {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Global(_) => "global",
        Value::Object(_) => object(objects, value).map_or("object", Object::kind),
    }
}

/// Parses a pickle of protocol 2-5. Array payloads are located but not read.
pub fn parse(input: &[u8]) -> Result<Pickle<'_>, PickleError> {
    parse_with_progress(input, &mut |_| {})
}

/// Input bytes between two calls of a progress callback.
pub const PROGRESS_STEP: usize = 64 << 20;

/// `parse`, calling `progress(pos)` each time another `PROGRESS_STEP` bytes of input have
/// been consumed: a caller that memory-maps a large file can hand back the pages behind
/// `pos`, which page fault-around maps in while the opcodes between arrays are read.
pub fn parse_with_progress<'a>(
    input: &'a [u8],
    progress: &mut dyn FnMut(usize),
) -> Result<Pickle<'a>, PickleError> {
    match input.first() {
        None => return Err(PickleError::Truncated { offset: 0 }),
        Some(&op::PROTO) => {}
        Some(&found) => return Err(PickleError::NotAPickle { found }),
    }
    Parser {
        input,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        decoded: HashMap::new(),
        objects: Vec::new(),
        progress,
        next_report: PROGRESS_STEP,
    }
    .run()
}

struct Parser<'a, 'p> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK; the stack never shrinks below the last one.
    marks: Vec<usize>,
    /// Keyed by index rather than a vector because files may name any 32-bit index.
    memo: HashMap<usize, Value>,
    /// Latin-1 payloads already decoded, by the index of their text object.
    decoded: HashMap<usize, Arc<Vec<u8>>>,
    objects: Vec<Object<'a>>,
    progress: &'p mut dyn FnMut(usize),
    next_report: usize,
}

impl<'a> Parser<'a, '_> {
    fn run(mut self) -> Result<Pickle<'a>, PickleError> {
        loop {
            let at = self.pos;
            if at >= self.next_report {
                (self.progress)(at);
                self.next_report = at + PROGRESS_STEP;
            }
            let [opcode] = self.take_array(at)?;
            if opcode == op::STOP {
                let root = self.pop(at, "STOP")?;
                return Ok(Pickle {
                    objects: self.objects,
                    root,
                });
            }
            self.execute(at, opcode)?;
        }
    }

    /// Runs the opcode read at `at`, one named step per opcode or family of opcodes.
    fn execute(&mut self, at: usize, opcode: u8) -> Result<(), PickleError> {
        match opcode {
            op::PROTO => self.proto(at)?,
            op::FRAME => self.frame(at)?,
            op::MARK => self.marks.push(self.stack.len()),
            op::EMPTY_DICT => self.push_object(Object::Dict(Vec::new())),
            op::EMPTY_LIST => self.push_object(Object::List(Vec::new())),
            op::EMPTY_TUPLE => self.push_object(Object::Tuple(Vec::new())),
            op::SETITEM => self.setitem(at)?,
            op::SETITEMS => self.setitems(at)?,
            op::APPEND => self.append(at)?,
            op::APPENDS => self.appends(at)?,
            op::TUPLE => {
                let items = self.pop_mark(at, "TUPLE")?;
                self.push_object(Object::Tuple(items));
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                self.small_tuple(at, opcode - op::TUPLE1 + 1)?
            }
            op::SHORT_BINUNICODE => self.string::<1>(at)?,
            op::BINUNICODE => self.string::<4>(at)?,
            op::BINUNICODE8 => self.string::<8>(at)?,
            op::SHORT_BINBYTES => self.bytes::<1>(at)?,
            op::BINBYTES => self.bytes::<4>(at)?,
            op::BINBYTES8 | op::BYTEARRAY8 => self.bytes::<8>(at)?,
            op::BININT => {
                let value = i32::from_le_bytes(self.take_array(at)?);
                self.stack.push(Value::Int(value.into()));
            }
            op::BININT1 => {
                let [value] = self.take_array(at)?;
                self.stack.push(Value::Int(value.into()));
            }
            op::BININT2 => {
                let value = u16::from_le_bytes(self.take_array(at)?);
                self.stack.push(Value::Int(value.into()));
            }
            op::LONG1 => self.long1(at)?,
            op::BINFLOAT => {
                let value = f64::from_be_bytes(self.take_array(at)?);
                self.stack.push(Value::Float(value));
            }
            op::NONE => self.stack.push(Value::None),
            op::NEWTRUE => self.stack.push(Value::Bool(true)),
            op::NEWFALSE => self.stack.push(Value::Bool(false)),
            op::GLOBAL => self.global(at)?,
            op::STACK_GLOBAL => self.stack_global(at)?,
            op::REDUCE => {
                let args = self.pop(at, "REDUCE")?;
                let callable = self.pop(at, "REDUCE")?;
                let result = self.reduce(at, callable, args)?;
                self.push_object(result);
            }
            op::BUILD => {
                let state = self.pop(at, "BUILD")?;
                self.build(at, state)?;
            }
            op::BINPUT | op::LONG_BINPUT => {
                let index = self.memo_index(at, opcode == op::BINPUT)?;
                self.memo_put(at, index)?;
            }
            op::MEMOIZE => self.memo_put(at, self.memo.len())?,
            op::BINGET | op::LONG_BINGET => {
                let index = self.memo_index(at, opcode == op::BINGET)?;
                self.memo_get(at, index)?;
            }
            _ => return Err(PickleError::UnsupportedOpcode { offset: at, opcode }),
        }
        Ok(())
    }

    /// The memo index after BINPUT or BINGET (one byte) or their LONG_ forms (four).
    fn memo_index(&mut self, at: usize, short: bool) -> Result<usize, PickleError> {
        let index = if short {
            self.take_len::<1>(at)
        } else {
            self.take_len::<4>(at)
        };
        index.ok_or(PickleError::Truncated { offset: at })
    }

    fn proto(&mut self, at: usize) -> Result<(), PickleError> {
        let [version] = self.take_array(at)?;
        if (2..=5).contains(&version) {
            Ok(())
        } else {
            Err(PickleError::UnsupportedProtocol {
                offset: at,
                version,
            })
        }
    }

    /// Frames only group opcodes for buffered reads; the input is in memory, so a frame is
    /// only checked to fit in it.
    fn frame(&mut self, at: usize) -> Result<(), PickleError> {
        self.take_len::<8>(at)
            .and_then(|len| self.input.len().checked_sub(self.pos)?.checked_sub(len))
            .map(|_| ())
            .ok_or(PickleError::Truncated { offset: at })
    }

    fn setitem(&mut self, at: usize) -> Result<(), PickleError> {
        let value = self.pop(at, "SETITEM")?;
        let key = self.pop(at, "SETITEM")?;
        match self.target(at, "SETITEM")? {
            Object::Dict(entries) => {
                entries.push((key, value));
                Ok(())
            }
            other => Err(unexpected(at, "SETITEM", "a dict", other.kind())),
        }
    }

    fn setitems(&mut self, at: usize) -> Result<(), PickleError> {
        let items = self.pop_mark(at, "SETITEMS")?;
        if items.len() % 2 != 0 {
            return Err(PickleError::BadArgument {
                offset: at,
                what: "SETITEMS needs key/value pairs",
            });
        }
        match self.target(at, "SETITEMS")? {
            Object::Dict(entries) => {
                entries.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            other => Err(unexpected(at, "SETITEMS", "a dict", other.kind())),
        }
    }

    fn append(&mut self, at: usize) -> Result<(), PickleError> {
        let value = self.pop(at, "APPEND")?;
        match self.target(at, "APPEND")? {
            Object::List(items) => {
                items.push(value);
                Ok(())
            }
            other => Err(unexpected(at, "APPEND", "a list", other.kind())),
        }
    }

    fn appends(&mut self, at: usize) -> Result<(), PickleError> {
        let values = self.pop_mark(at, "APPENDS")?;
        match self.target(at, "APPENDS")? {
            Object::List(items) => {
                items.extend(values);
                Ok(())
            }
            other => Err(unexpected(at, "APPENDS", "a list", other.kind())),
        }
    }

    /// TUPLE1, TUPLE2 and TUPLE3: the top `n` values, which must lie above the last MARK.
    fn small_tuple(&mut self, at: usize, n: u8) -> Result<(), PickleError> {
        let n = usize::from(n);
        if self.stack.len() < self.floor() + n {
            return Err(PickleError::StackUnderflow {
                offset: at,
                op: "TUPLE1-3",
            });
        }
        let items = self.stack.split_off(self.stack.len() - n);
        self.push_object(Object::Tuple(items));
        Ok(())
    }

    fn long1(&mut self, at: usize) -> Result<(), PickleError> {
        let len = self
            .take_len::<1>(at)
            .ok_or(PickleError::Truncated { offset: at })?;
        let bytes = self.take(len, at)?;
        let value = long1(bytes).ok_or(PickleError::IntegerOverflow { offset: at })?;
        self.stack.push(Value::Int(value));
        Ok(())
    }

    fn global(&mut self, at: usize) -> Result<(), PickleError> {
        let module = self.line(at)?;
        let name = self.line(at)?;
        let global = resolve(at, module, name)?;
        self.stack.push(Value::Global(global));
        Ok(())
    }

    fn stack_global(&mut self, at: usize) -> Result<(), PickleError> {
        let name = self.pop(at, "STACK_GLOBAL")?;
        let module = self.pop(at, "STACK_GLOBAL")?;
        let (Some(Object::Str(module)), Some(Object::Str(name))) =
            (object(&self.objects, module), object(&self.objects, name))
        else {
            return Err(PickleError::BadArgument {
                offset: at,
                what: "STACK_GLOBAL needs two strings",
            });
        };
        let global = resolve(at, module.as_bytes(), name.as_bytes())?;
        self.stack.push(Value::Global(global));
        Ok(())
    }

    fn remaining(&self) -> &'a [u8] {
        let input: &'a [u8] = self.input;
        input.get(self.pos..).unwrap_or_default()
    }

    /// Takes `len` bytes, refusing any length the rest of the input cannot back, so a
    /// declared length never drives an allocation.
    fn take(&mut self, len: usize, at: usize) -> Result<&'a [u8], PickleError> {
        let bytes = self
            .remaining()
            .get(..len)
            .ok_or(PickleError::Truncated { offset: at })?;
        self.pos += len;
        Ok(bytes)
    }

    fn take_array<const N: usize>(&mut self, at: usize) -> Result<[u8; N], PickleError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N, at)?);
        Ok(array)
    }

    /// Reads an `N`-byte little-endian length; `None` if the input ends or it overflows.
    fn take_len<const N: usize>(&mut self, at: usize) -> Option<usize> {
        let bytes = self.take(N, at).ok()?;
        let mut wide = [0; 8];
        wide[..N].copy_from_slice(bytes);
        usize::try_from(u64::from_le_bytes(wide)).ok()
    }

    fn line(&mut self, at: usize) -> Result<&'a [u8], PickleError> {
        let rest = self.remaining();
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated { offset: at })?;
        self.pos += len + 1;
        Ok(&rest[..len])
    }

    fn string<const N: usize>(&mut self, at: usize) -> Result<(), PickleError> {
        let len = self
            .take_len::<N>(at)
            .ok_or(PickleError::Truncated { offset: at })?;
        let bytes = self.take(len, at)?;
        let text =
            std::str::from_utf8(bytes).map_err(|_| PickleError::InvalidUtf8 { offset: at })?;
        self.push_object(Object::Str(text));
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, at: usize) -> Result<(), PickleError> {
        let len = self
            .take_len::<N>(at)
            .ok_or(PickleError::Truncated { offset: at })?;
        let bytes = self.take(len, at)?;
        self.push_object(Object::Bytes(Payload::Borrowed(bytes)));
        Ok(())
    }

    fn push_object(&mut self, object: Object<'a>) {
        self.stack.push(Value::Object(ObjectId(self.objects.len())));
        self.objects.push(object);
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self, at: usize, op: &'static str) -> Result<Value, PickleError> {
        let underflow = PickleError::StackUnderflow { offset: at, op };
        if self.stack.len() <= self.floor() {
            return Err(underflow);
        }
        self.stack.pop().ok_or(underflow)
    }

    fn peek(&self, at: usize, op: &'static str) -> Result<Value, PickleError> {
        match self.stack.last() {
            Some(&value) if self.stack.len() > self.floor() => Ok(value),
            _ => Err(PickleError::StackUnderflow { offset: at, op }),
        }
    }

    fn pop_mark(&mut self, at: usize, op: &'static str) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or(PickleError::MissingMark { offset: at, op })?;
        Ok(self.stack.split_off(mark))
    }

    /// The object on top of the stack, which a mutating opcode changes in place.
    fn target(&mut self, at: usize, op: &'static str) -> Result<&mut Object<'a>, PickleError> {
        let top = self.peek(at, op)?;
        match top {
            Value::Object(ObjectId(index)) => Ok(&mut self.objects[index]),
            other => Err(unexpected(at, op, "an object", kind(&self.objects, other))),
        }
    }

    fn memo_put(&mut self, at: usize, index: usize) -> Result<(), PickleError> {
        let value = self.peek(at, "PUT")?;
        self.memo.insert(index, value);
        Ok(())
    }

    fn memo_get(&mut self, at: usize, index: usize) -> Result<(), PickleError> {
        let value = *self
            .memo
            .get(&index)
            .ok_or(PickleError::MissingMemo { offset: at, index })?;
        self.stack.push(value);
        Ok(())
    }

    fn str_arg(&self, value: Value, at: usize, what: &'static str) -> Result<&'a str, PickleError> {
        match object(&self.objects, value) {
            Some(Object::Str(s)) => Ok(s),
            _ => Err(PickleError::BadArgument { offset: at, what }),
        }
    }

    /// The items of a tuple that must have exactly `N` of them.
    fn tuple<const N: usize>(
        &self,
        value: Value,
        at: usize,
        what: &'static str,
    ) -> Result<[Value; N], PickleError> {
        match object(&self.objects, value) {
            Some(Object::Tuple(items)) => <[Value; N]>::try_from(items.as_slice()).ok(),
            _ => None,
        }
        .ok_or(PickleError::BadArgument { offset: at, what })
    }

    /// Decodes a text object once, however often the memo feeds it to `_codecs.encode`,
    /// so repeated references cannot multiply the copies.
    fn decode_latin1(&mut self, at: usize, text: Value) -> Result<Arc<Vec<u8>>, PickleError> {
        let (Value::Object(ObjectId(index)), Some(Object::Str(string))) =
            (text, object(&self.objects, text))
        else {
            return Err(PickleError::BadArgument {
                offset: at,
                what: "_codecs.encode needs a string",
            });
        };
        if let Some(bytes) = self.decoded.get(&index) {
            return Ok(Arc::clone(bytes));
        }
        let bytes = Arc::new(latin1(string, at)?);
        self.decoded.insert(index, Arc::clone(&bytes));
        Ok(bytes)
    }

    fn reduce(
        &mut self,
        at: usize,
        callable: Value,
        args: Value,
    ) -> Result<Object<'a>, PickleError> {
        let Value::Global(global) = callable else {
            let found = kind(&self.objects, callable);
            return Err(unexpected(at, "REDUCE", "an allowed global", found));
        };
        Ok(match global {
            Global::Reconstruct => {
                let [class, _, _] = self.tuple(args, at, "_reconstruct takes 3 arguments")?;
                if class != Value::Global(Global::NdArray) {
                    return Err(PickleError::BadArgument {
                        offset: at,
                        what: "_reconstruct only builds numpy.ndarray",
                    });
                }
                Object::PendingArray
            }
            Global::Dtype => {
                let [code, _, _] = self.tuple(args, at, "numpy.dtype takes 3 arguments")?;
                let code = self.str_arg(code, at, "numpy.dtype needs a type code string")?;
                let element = ElementType::from_typecode(code).ok_or_else(|| {
                    PickleError::UnsupportedDtype {
                        offset: at,
                        typecode: shown(code.as_bytes()),
                    }
                })?;
                Object::PendingDtype(element)
            }
            Global::FromBuffer => {
                let [buffer, dtype, shape, order] =
                    self.tuple(args, at, "_frombuffer takes 4 arguments")?;
                let order = match self.str_arg(order, at, "_frombuffer order must be 'C' or 'F'")? {
                    "C" => MemoryOrder::C,
                    "F" => MemoryOrder::Fortran,
                    _ => {
                        return Err(PickleError::BadArgument {
                            offset: at,
                            what: "_frombuffer order must be 'C' or 'F'",
                        })
                    }
                };
                Object::Array(Box::new(self.array(at, shape, dtype, order, buffer)?))
            }
            Global::CodecsEncode => {
                let [text, encoding] = self.tuple(args, at, "_codecs.encode takes 2 arguments")?;
                let encoding = self.str_arg(encoding, at, "_codecs.encode needs an encoding")?;
                if !matches!(encoding, "latin1" | "latin-1") {
                    return Err(PickleError::BadArgument {
                        offset: at,
                        what: "_codecs.encode is only read with the latin1 encoding",
                    });
                }
                Object::Bytes(Payload::Decoded(self.decode_latin1(at, text)?))
            }
            Global::NdArray => {
                return Err(PickleError::BadArgument {
                    offset: at,
                    what: "numpy.ndarray is only read as _reconstruct's argument",
                })
            }
        })
    }

    /// Applies BUILD's state to the array or dtype on top of the stack, in place, so every
    /// memo reference to it sees the finished object.
    fn build(&mut self, at: usize, state: Value) -> Result<(), PickleError> {
        let target = self.peek(at, "BUILD")?;
        let Some(ObjectId(index)) = (match target {
            Value::Object(id) => Some(id),
            _ => None,
        }) else {
            let found = kind(&self.objects, target);
            return Err(unexpected(
                at,
                "BUILD",
                "an array or dtype without state",
                found,
            ));
        };
        let built = match &self.objects[index] {
            Object::PendingArray => {
                let [_version, shape, dtype, fortran, raw] =
                    self.tuple(state, at, "ndarray state must have 5 items")?;
                let order = match fortran {
                    Value::Bool(false) | Value::Int(0) => MemoryOrder::C,
                    Value::Bool(true) | Value::Int(1) => MemoryOrder::Fortran,
                    _ => {
                        return Err(PickleError::BadArgument {
                            offset: at,
                            what: "ndarray state's Fortran flag must be a bool",
                        })
                    }
                };
                Object::Array(Box::new(self.array(at, shape, dtype, order, raw)?))
            }
            &Object::PendingDtype(element) => {
                let order = match object(&self.objects, state) {
                    Some(Object::Tuple(items)) => items.get(1).copied(),
                    _ => None,
                };
                let order = self.str_arg(
                    order.unwrap_or(Value::None),
                    at,
                    "dtype state must carry a byte order string",
                )?;
                let dtype =
                    Dtype::new(element, order).ok_or_else(|| PickleError::InvalidByteOrder {
                        offset: at,
                        order: shown(order.as_bytes()),
                        element,
                    })?;
                Object::Dtype(dtype)
            }
            other => {
                return Err(unexpected(
                    at,
                    "BUILD",
                    "an array or dtype without state",
                    other.kind(),
                ))
            }
        };
        self.objects[index] = built;
        Ok(())
    }

    /// Checks that shape, dtype and payload agree, without reading the payload.
    fn array(
        &self,
        at: usize,
        shape: Value,
        dtype: Value,
        order: MemoryOrder,
        data: Value,
    ) -> Result<ArrayView<'a>, PickleError> {
        let Some(Object::Tuple(dims)) = object(&self.objects, shape) else {
            return Err(PickleError::BadArgument {
                offset: at,
                what: "array shape must be a tuple",
            });
        };
        if dims.len() > MAX_NDIM {
            return Err(PickleError::TooManyDimensions {
                offset: at,
                ndim: dims.len(),
            });
        }
        let shape = dims
            .iter()
            .map(|dim| match *dim {
                Value::Int(n) => usize::try_from(n).ok(),
                _ => None,
            })
            .collect::<Option<Vec<usize>>>()
            .ok_or(PickleError::BadArgument {
                offset: at,
                what: "array dimensions must be non-negative integers",
            })?;
        let dtype = match object(&self.objects, dtype) {
            Some(Object::Dtype(dtype)) => *dtype,
            Some(Object::PendingDtype(_)) => {
                return Err(PickleError::BadArgument {
                    offset: at,
                    what: "dtype used before its state was set",
                })
            }
            _ => {
                return Err(PickleError::BadArgument {
                    offset: at,
                    what: "array dtype must be a numpy.dtype",
                })
            }
        };
        let Some(Object::Bytes(data)) = object(&self.objects, data) else {
            return Err(PickleError::BadArgument {
                offset: at,
                what: "array data must be bytes",
            });
        };
        let Some(expected) = shape
            .iter()
            .try_fold(dtype.element.itemsize(), |acc, &dim| acc.checked_mul(dim))
        else {
            return Err(PickleError::ShapeOverflow { offset: at, shape });
        };
        if expected != data.len() {
            return Err(PickleError::PayloadSize {
                offset: at,
                shape,
                dtype,
                expected,
                found: data.len(),
            });
        }
        Ok(ArrayView {
            shape,
            dtype,
            order,
            data: data.clone(),
        })
    }
}

fn unexpected(
    offset: usize,
    op: &'static str,
    expected: &'static str,
    found: &'static str,
) -> PickleError {
    PickleError::Unexpected {
        offset,
        op,
        expected,
        found,
    }
}

fn resolve(at: usize, module: &[u8], name: &[u8]) -> Result<Global, PickleError> {
    let global = match (std::str::from_utf8(module), std::str::from_utf8(name)) {
        (Ok(module), Ok(name)) => Global::resolve(module, name),
        _ => None,
    };
    global.ok_or_else(|| PickleError::ForbiddenGlobal {
        offset: at,
        module: shown(module),
        name: shown(name),
    })
}

/// A name from the file, shortened so a hostile one cannot bloat the error message.
fn shown(bytes: &[u8]) -> String {
    const LIMIT: usize = 200;
    let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(LIMIT)]).into_owned();
    if bytes.len() > LIMIT {
        text.push('…');
    }
    text
}

/// Decodes LONG1's little-endian two's-complement integer.
fn long1(bytes: &[u8]) -> Option<i64> {
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0 };
    let (low, high) = bytes.split_at(bytes.len().min(8));
    if high.iter().any(|&b| b != fill) {
        return None;
    }
    let mut wide = [fill; 8];
    wide[..low.len()].copy_from_slice(low);
    let value = i64::from_le_bytes(wide);
    (value.is_negative() == negative).then_some(value)
}

/// Recovers the bytes that protocol 2 stored as `bytes.decode('latin1')`.
fn latin1(text: &str, at: usize) -> Result<Vec<u8>, PickleError> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        let code = u32::from(c);
        let byte = u8::try_from(code).map_err(|_| PickleError::NotLatin1 { offset: at, code })?;
        out.push(byte);
    }
    Ok(out)
}

/// Builders for hand-assembled pickles in unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::op;

    /// Writes opcodes the way CPython's pickler lays them out.
    pub struct Writer {
        pub bytes: Vec<u8>,
        memo: u32,
    }

    impl Writer {
        pub fn new(protocol: u8) -> Self {
            Self {
                bytes: vec![op::PROTO, protocol],
                memo: 0,
            }
        }

        pub fn op(&mut self, opcode: u8) -> &mut Self {
            self.bytes.push(opcode);
            self
        }

        pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
            self.bytes.extend_from_slice(bytes);
            self
        }

        pub fn str(&mut self, text: &str) -> &mut Self {
            let len = u32::try_from(text.len()).unwrap();
            self.op(op::BINUNICODE)
                .raw(&len.to_le_bytes())
                .raw(text.as_bytes())
        }

        pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
            let len = u32::try_from(data.len()).unwrap();
            self.op(op::BINBYTES).raw(&len.to_le_bytes()).raw(data)
        }

        pub fn int(&mut self, value: i32) -> &mut Self {
            self.op(op::BININT).raw(&value.to_le_bytes())
        }

        pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(op::GLOBAL)
                .raw(module.as_bytes())
                .raw(b"\n")
                .raw(name.as_bytes())
                .raw(b"\n")
        }

        /// Stores the top of the stack in the next memo slot and returns the slot.
        pub fn put(&mut self) -> u32 {
            let index = self.memo;
            self.memo += 1;
            self.op(op::LONG_BINPUT).raw(&index.to_le_bytes());
            index
        }

        pub fn get(&mut self, index: u32) -> &mut Self {
            self.op(op::LONG_BINGET).raw(&index.to_le_bytes())
        }

        pub fn shape(&mut self, shape: &[usize]) -> &mut Self {
            self.op(op::MARK);
            for &dim in shape {
                match i32::try_from(dim) {
                    Ok(small) => self.int(small),
                    Err(_) => self
                        .op(op::LONG1)
                        .raw(&[8])
                        .raw(&(dim as u64).to_le_bytes()),
                };
            }
            self.op(op::TUPLE)
        }

        /// `numpy.dtype(code, False, True)` followed by BUILD with its byte order.
        pub fn dtype(&mut self, code: &str, order: &str) -> &mut Self {
            self.global("numpy", "dtype")
                .str(code)
                .op(op::NEWFALSE)
                .op(op::NEWTRUE)
                .op(op::TUPLE3)
                .op(op::REDUCE)
                .op(op::MARK)
                .int(3)
                .str(order)
                .op(op::NONE)
                .op(op::NONE)
                .op(op::NONE)
                .int(-1)
                .int(-1)
                .int(0)
                .op(op::TUPLE)
                .op(op::BUILD)
        }

        /// An array as protocols 2-4 write it: `_reconstruct` then BUILD.
        pub fn reconstruct(
            &mut self,
            dtype: (&str, &str),
            shape: &[usize],
            fortran: bool,
            data: &[u8],
        ) -> &mut Self {
            self.global("numpy._core.multiarray", "_reconstruct")
                .global("numpy", "ndarray")
                .shape(&[0])
                .bytes(b"b")
                .op(op::TUPLE3)
                .op(op::REDUCE)
                .op(op::MARK)
                .int(1)
                .shape(shape)
                .dtype(dtype.0, dtype.1)
                .op(if fortran { op::NEWTRUE } else { op::NEWFALSE })
                .bytes(data)
                .op(op::TUPLE)
                .op(op::BUILD)
        }

        /// An array as protocol 5 writes it: `_frombuffer(buffer, dtype, shape, order)`.
        pub fn frombuffer(
            &mut self,
            dtype: (&str, &str),
            shape: &[usize],
            fortran: bool,
            data: &[u8],
        ) -> &mut Self {
            self.global("numpy._core.numeric", "_frombuffer")
                .op(op::MARK)
                .op(op::BYTEARRAY8)
                .raw(&(data.len() as u64).to_le_bytes())
                .raw(data)
                .dtype(dtype.0, dtype.1)
                .shape(shape)
                .str(if fortran { "F" } else { "C" })
                .op(op::TUPLE)
                .op(op::REDUCE)
        }

        pub fn finish(&mut self) -> Vec<u8> {
            self.op(op::STOP);
            std::mem::take(&mut self.bytes)
        }
    }

    /// Little-endian f32 payload.
    pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{f32_bytes, Writer};
    use super::*;

    fn root_of(bytes: &[u8]) -> (Pickle<'_>, Value) {
        let pickle = parse(bytes).unwrap();
        let root = pickle.root();
        (pickle, root)
    }

    #[test]
    fn scalars() {
        let cases: [(&[u8], Value); 12] = [
            (&[op::NONE], Value::None),
            (&[op::NEWTRUE], Value::Bool(true)),
            (&[op::NEWFALSE], Value::Bool(false)),
            (&[op::BININT1, 200], Value::Int(200)),
            (&[op::BININT2, 0x34, 0x12], Value::Int(0x1234)),
            (&[op::BININT, 0xfe, 0xff, 0xff, 0xff], Value::Int(-2)),
            (&[op::LONG1, 0], Value::Int(0)),
            (&[op::LONG1, 1, 0x80], Value::Int(-128)),
            (&[op::LONG1, 2, 0x80, 0x00], Value::Int(128)),
            (
                &[op::LONG1, 9, 0, 0, 0, 0, 0, 0, 0, 0x80, 0xff],
                Value::Int(i64::MIN),
            ),
            (
                &[
                    op::LONG1,
                    9,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0xff,
                    0x7f,
                    0,
                ],
                Value::Int(i64::MAX),
            ),
            (
                &[op::BINFLOAT, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0],
                Value::Float(1.5),
            ),
        ];
        for (body, expected) in cases {
            let bytes = Writer::new(2).raw(body).finish();
            assert_eq!(parse(&bytes).unwrap().root(), expected, "{body:?}");
        }
    }

    #[test]
    fn long1_beyond_64_bits_is_refused() {
        for body in [
            &[op::LONG1, 9, 0, 0, 0, 0, 0, 0, 0, 0x80, 0][..],
            &[
                op::LONG1,
                9,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x7f,
                0xff,
            ][..],
            &[op::LONG1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 1][..],
        ] {
            let bytes = Writer::new(2).raw(body).finish();
            assert_eq!(
                parse(&bytes).unwrap_err(),
                PickleError::IntegerOverflow { offset: 2 }
            );
        }
    }

    #[test]
    fn strings_and_bytes_borrow_from_the_input() {
        let mut w = Writer::new(5);
        w.op(op::MARK);
        w.op(op::SHORT_BINUNICODE).raw(&[2]).raw(b"ab");
        w.str("héllo");
        w.op(op::BINUNICODE8).raw(&1u64.to_le_bytes()).raw(b"z");
        w.op(op::SHORT_BINBYTES).raw(&[3]).raw(b"\x00\x01\x02");
        w.bytes(b"xyz");
        w.op(op::BINBYTES8).raw(&2u64.to_le_bytes()).raw(b"pq");
        w.op(op::BYTEARRAY8).raw(&1u64.to_le_bytes()).raw(b"!");
        let bytes = w.op(op::TUPLE).finish();
        let (pickle, root) = root_of(&bytes);
        let items = pickle.as_sequence(root).unwrap();
        let strs: Vec<_> = items[..3]
            .iter()
            .map(|&v| pickle.as_str(v).unwrap())
            .collect();
        assert_eq!(strs, ["ab", "héllo", "z"]);
        let input = bytes.as_ptr_range();
        for (&value, expected) in items[3..]
            .iter()
            .zip([&b"\x00\x01\x02"[..], b"xyz", b"pq", b"!"])
        {
            let Some(Object::Bytes(Payload::Borrowed(data))) = pickle.object(value) else {
                panic!("not borrowed bytes: {:?}", pickle.object(value));
            };
            assert_eq!(*data, expected);
            assert!(input.contains(&data.as_ptr()));
        }
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let bytes = Writer::new(4)
            .op(op::SHORT_BINUNICODE)
            .raw(&[1, 0xff])
            .finish();
        assert_eq!(
            parse(&bytes).unwrap_err(),
            PickleError::InvalidUtf8 { offset: 2 }
        );
    }

    #[test]
    fn containers_keep_insertion_order() {
        let mut w = Writer::new(3);
        w.op(op::EMPTY_DICT).str("b").int(1).op(op::SETITEM);
        w.op(op::MARK)
            .str("a")
            .int(2)
            .str("b")
            .int(3)
            .op(op::SETITEMS);
        w.str("list").op(op::EMPTY_LIST).int(4).op(op::APPEND);
        w.op(op::MARK).int(5).int(6).op(op::APPENDS).op(op::SETITEM);
        w.str("tuples")
            .op(op::MARK)
            .op(op::EMPTY_TUPLE)
            .int(7)
            .op(op::TUPLE1);
        w.int(8)
            .int(9)
            .op(op::TUPLE2)
            .int(1)
            .int(2)
            .int(3)
            .op(op::TUPLE3)
            .op(op::TUPLE);
        let bytes = w.op(op::SETITEM).finish();
        let (pickle, root) = root_of(&bytes);
        let entries = pickle.as_dict(root).unwrap();
        let keys: Vec<_> = entries
            .iter()
            .map(|&(k, _)| pickle.as_str(k).unwrap())
            .collect();
        assert_eq!(keys, ["b", "a", "b", "list", "tuples"]);
        assert_eq!(entries[2].1, Value::Int(3));
        let list = pickle.as_sequence(entries[3].1).unwrap();
        assert_eq!(list, [Value::Int(4), Value::Int(5), Value::Int(6)]);
        let tuples = pickle.as_sequence(entries[4].1).unwrap();
        let lens: Vec<_> = tuples
            .iter()
            .map(|&t| pickle.as_sequence(t).unwrap().len())
            .collect();
        assert_eq!(lens, [0, 1, 2, 3]);
    }

    #[test]
    fn memo_shares_objects() {
        let mut w = Writer::new(4);
        w.op(op::EMPTY_LIST);
        let list = w.put();
        w.op(op::MEMOIZE);
        w.op(op::BINPUT).raw(&[200]);
        w.op(op::MARK)
            .get(list)
            .op(op::BINGET)
            .raw(&[1])
            .op(op::BINGET)
            .raw(&[200]);
        let bytes = w.op(op::APPENDS).finish();
        let (pickle, root) = root_of(&bytes);
        let items = pickle.as_sequence(root).unwrap();
        assert_eq!(items, [root, root, root]);
    }

    #[test]
    fn missing_memo_is_refused() {
        let bytes = Writer::new(2).op(op::BINGET).raw(&[7]).finish();
        assert_eq!(
            parse(&bytes).unwrap_err(),
            PickleError::MissingMemo {
                offset: 2,
                index: 7
            }
        );
    }

    #[test]
    fn frames_are_checked_and_skipped() {
        let bytes = Writer::new(4)
            .op(op::FRAME)
            .raw(&2u64.to_le_bytes())
            .op(op::NONE)
            .finish();
        assert_eq!(parse(&bytes).unwrap().root(), Value::None);
        let bytes = Writer::new(4)
            .op(op::FRAME)
            .raw(&3u64.to_le_bytes())
            .op(op::NONE)
            .finish();
        assert_eq!(
            parse(&bytes).unwrap_err(),
            PickleError::Truncated { offset: 2 }
        );
    }

    #[test]
    fn not_a_pickle_or_wrong_protocol() {
        assert_eq!(
            parse(b"").unwrap_err(),
            PickleError::Truncated { offset: 0 }
        );
        assert_eq!(
            parse(b"hello").unwrap_err(),
            PickleError::NotAPickle { found: b'h' }
        );
        assert_eq!(
            parse(&[op::PROTO, 1, op::NONE, op::STOP]).unwrap_err(),
            PickleError::UnsupportedProtocol {
                offset: 0,
                version: 1
            }
        );
        let bytes = Writer::new(2).op(b'I').finish();
        assert_eq!(
            parse(&bytes).unwrap_err(),
            PickleError::UnsupportedOpcode {
                offset: 2,
                opcode: b'I'
            }
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = Writer::new(3)
            .op(op::EMPTY_DICT)
            .str("image")
            .reconstruct(("f4", "<"), &[2], false, &f32_bytes(&[1.0, 2.0]))
            .op(op::SETITEM)
            .finish();
        parse(&bytes).unwrap();
        for len in 0..bytes.len() {
            assert!(
                parse(&bytes[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
    }

    #[test]
    fn huge_declared_lengths_do_not_allocate() {
        for opcode in [op::BINUNICODE8, op::BINBYTES8, op::BYTEARRAY8, op::FRAME] {
            let bytes = Writer::new(5)
                .op(opcode)
                .raw(&u64::MAX.to_le_bytes())
                .finish();
            assert_eq!(
                parse(&bytes).unwrap_err(),
                PickleError::Truncated { offset: 2 }
            );
        }
        let bytes = Writer::new(4)
            .op(op::BINBYTES)
            .raw(&u32::MAX.to_le_bytes())
            .finish();
        assert_eq!(
            parse(&bytes).unwrap_err(),
            PickleError::Truncated { offset: 2 }
        );
    }

    #[test]
    fn stack_discipline() {
        let cases: [(&[u8], PickleError); 6] = [
            (
                &[op::STOP],
                PickleError::StackUnderflow {
                    offset: 2,
                    op: "STOP",
                },
            ),
            (
                &[op::EMPTY_LIST, op::MARK, op::APPEND],
                PickleError::StackUnderflow {
                    offset: 4,
                    op: "APPEND",
                },
            ),
            (
                &[op::NONE, op::TUPLE],
                PickleError::MissingMark {
                    offset: 3,
                    op: "TUPLE",
                },
            ),
            (
                &[op::MARK, op::NONE, op::TUPLE2],
                PickleError::StackUnderflow {
                    offset: 4,
                    op: "TUPLE1-3",
                },
            ),
            (
                &[op::EMPTY_DICT, op::MARK, op::NONE, op::SETITEMS],
                PickleError::BadArgument {
                    offset: 5,
                    what: "SETITEMS needs key/value pairs",
                },
            ),
            (
                &[op::EMPTY_LIST, op::NONE, op::NONE, op::SETITEM],
                PickleError::Unexpected {
                    offset: 5,
                    op: "SETITEM",
                    expected: "a dict",
                    found: "list",
                },
            ),
        ];
        for (body, expected) in cases {
            let bytes = Writer::new(2).raw(body).finish();
            assert_eq!(parse(&bytes).unwrap_err(), expected, "{body:?}");
        }
    }

    #[test]
    fn forbidden_globals_are_named_with_their_offset() {
        let bytes = Writer::new(2).op(op::NONE).global("os", "system").finish();
        assert_eq!(
            parse(&bytes).unwrap_err(),
            PickleError::ForbiddenGlobal {
                offset: 3,
                module: "os".into(),
                name: "system".into()
            }
        );
        let bytes = Writer::new(4)
            .op(op::SHORT_BINUNICODE)
            .raw(b"\x08builtins")
            .op(op::SHORT_BINUNICODE)
            .raw(b"\x04eval")
            .op(op::STACK_GLOBAL)
            .finish();
        let err = parse(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "global builtins.eval at byte 18 is not allowed"
        );
        let bytes = Writer::new(2).global("numpy", "_reconstruct").finish();
        assert!(matches!(
            parse(&bytes).unwrap_err(),
            PickleError::ForbiddenGlobal { offset: 2, .. }
        ));
    }

    #[test]
    fn allowed_globals_under_both_numpy_paths() {
        for (module, name, global) in [
            ("numpy.core.multiarray", "_reconstruct", Global::Reconstruct),
            (
                "numpy._core.multiarray",
                "_reconstruct",
                Global::Reconstruct,
            ),
            ("numpy", "ndarray", Global::NdArray),
            ("numpy", "dtype", Global::Dtype),
            ("numpy.core.numeric", "_frombuffer", Global::FromBuffer),
            ("numpy._core.numeric", "_frombuffer", Global::FromBuffer),
            ("_codecs", "encode", Global::CodecsEncode),
        ] {
            let bytes = Writer::new(2).global(module, name).finish();
            assert_eq!(parse(&bytes).unwrap().root(), Value::Global(global));
        }
    }

    #[test]
    fn reconstructed_array_shared_through_the_memo() {
        let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut w = Writer::new(3);
        w.op(op::EMPTY_LIST).op(op::MARK);
        w.global("numpy.core.multiarray", "_reconstruct")
            .global("numpy", "ndarray")
            .shape(&[0])
            .bytes(b"b")
            .op(op::TUPLE3)
            .op(op::REDUCE);
        // Memoised before BUILD, as CPython does: the later reference must see the state.
        let array = w.put();
        w.op(op::MARK)
            .int(1)
            .shape(&[2, 3])
            .dtype("f4", "<")
            .op(op::NEWFALSE)
            .bytes(&data);
        w.op(op::TUPLE).op(op::BUILD).get(array).op(op::APPENDS);
        let bytes = w.finish();
        let (pickle, root) = root_of(&bytes);
        let items = pickle.as_sequence(root).unwrap();
        assert_eq!(items[0], items[1]);
        let array = pickle.as_array(items[1]).unwrap();
        assert_eq!(array.shape(), [2, 3]);
        assert_eq!(
            array.dtype(),
            Dtype {
                element: ElementType::F4,
                byte_order: ByteOrder::Little
            }
        );
        assert_eq!(array.memory_order(), MemoryOrder::C);
        assert_eq!(array.data().as_ptr_range(), {
            let start = bytes.windows(data.len()).position(|w| w == data).unwrap();
            bytes[start..start + data.len()].as_ptr_range()
        });
        let mut out = [0.0; 6];
        array.write_f32(&mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn dtype_shared_through_the_memo() {
        let mut w = Writer::new(5);
        w.op(op::MARK);
        w.global("numpy.core.numeric", "_frombuffer")
            .op(op::MARK)
            .bytes(&[0; 8]);
        w.dtype("f8", ">");
        let dtype = w.put();
        w.shape(&[1]).str("C").op(op::TUPLE).op(op::REDUCE);
        w.global("numpy.core.numeric", "_frombuffer")
            .op(op::MARK)
            .bytes(&[0; 16]);
        w.get(dtype)
            .shape(&[2])
            .str("F")
            .op(op::TUPLE)
            .op(op::REDUCE);
        let bytes = w.op(op::TUPLE).finish();
        let (pickle, root) = root_of(&bytes);
        let arrays: Vec<_> = pickle
            .as_sequence(root)
            .unwrap()
            .iter()
            .map(|&v| pickle.as_array(v).unwrap())
            .collect();
        let big_f8 = Dtype {
            element: ElementType::F8,
            byte_order: ByteOrder::Big,
        };
        assert_eq!((arrays[0].dtype(), arrays[1].dtype()), (big_f8, big_f8));
        assert_eq!(arrays[1].memory_order(), MemoryOrder::Fortran);
    }

    #[test]
    fn protocol_2_latin1_payload() {
        let values = [1.0f32, -2.5, 255.0];
        let data = f32_bytes(&values);
        let text: String = data.iter().map(|&b| char::from(b)).collect();
        let mut w = Writer::new(2);
        w.global("numpy.core.multiarray", "_reconstruct")
            .global("numpy", "ndarray")
            .shape(&[0]);
        w.global("_codecs", "encode")
            .str("b")
            .str("latin1")
            .op(op::TUPLE2)
            .op(op::REDUCE);
        w.op(op::TUPLE3).op(op::REDUCE);
        w.op(op::MARK)
            .int(1)
            .shape(&[3])
            .dtype("f4", "<")
            .op(op::NEWFALSE);
        w.global("_codecs", "encode")
            .str(&text)
            .str("latin1")
            .op(op::TUPLE2)
            .op(op::REDUCE);
        let bytes = w.op(op::TUPLE).op(op::BUILD).finish();
        let (pickle, root) = root_of(&bytes);
        let array = pickle.as_array(root).unwrap();
        assert_eq!(array.data(), data);
        let mut out = [0.0; 3];
        array.write_f32(&mut out).unwrap();
        assert_eq!(out, values);
    }

    #[test]
    fn latin1_text_reused_through_the_memo_is_decoded_once() {
        let mut w = Writer::new(2);
        w.op(op::MARK).str("\u{ff}abc");
        let text = w.put();
        w.op(op::MARK)
            .global("_codecs", "encode")
            .get(text)
            .str("latin1");
        w.op(op::TUPLE2)
            .op(op::REDUCE)
            .global("_codecs", "encode")
            .get(text)
            .str("latin1");
        let bytes = w
            .op(op::TUPLE2)
            .op(op::REDUCE)
            .op(op::TUPLE)
            .op(op::TUPLE)
            .finish();
        let (pickle, root) = root_of(&bytes);
        let outer = pickle.as_sequence(root).unwrap();
        let inner = pickle.as_sequence(outer[1]).unwrap();
        let payloads: Vec<_> = inner
            .iter()
            .map(|&v| match pickle.object(v) {
                Some(Object::Bytes(payload @ Payload::Decoded(_))) => payload.clone(),
                other => panic!("not decoded bytes: {other:?}"),
            })
            .collect();
        assert_eq!(&payloads[0][..], b"\xffabc");
        assert_eq!(payloads[0].as_ptr(), payloads[1].as_ptr());
    }

    #[test]
    fn latin1_rejects_wide_characters() {
        let bytes = Writer::new(2)
            .global("_codecs", "encode")
            .str("aĀ")
            .str("latin1")
            .op(op::TUPLE2)
            .op(op::REDUCE)
            .finish();
        assert_eq!(
            parse(&bytes).unwrap_err(),
            PickleError::NotLatin1 {
                offset: 38,
                code: 0x100
            }
        );
    }

    fn array_of(bytes: &[u8]) -> ArrayView<'_> {
        let pickle = parse(bytes).unwrap();
        pickle.as_array(pickle.root()).unwrap().clone()
    }

    #[test]
    fn fortran_and_big_endian_arrays_convert_to_c_order() {
        // 2x3 array [[0,1,2],[3,4,5]] stored Fortran-ordered: 0,3,1,4,2,5.
        let fortran = [0.0f64, 3.0, 1.0, 4.0, 2.0, 5.0];
        let be: Vec<u8> = fortran.iter().flat_map(|v| v.to_be_bytes()).collect();
        let bytes = Writer::new(5)
            .frombuffer(("f8", ">"), &[2, 3], true, &be)
            .finish();
        let mut out = [0.0; 6];
        array_of(&bytes).write_f32(&mut out).unwrap();
        assert_eq!(out, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);

        // 2x3x2 array with values equal to their C index, stored Fortran-ordered.
        let shape = [2, 3, 2];
        let mut fortran = Vec::new();
        for k in 0..2 {
            for j in 0..3 {
                for i in 0..2 {
                    fortran.push((i * 6 + j * 2 + k) as f32);
                }
            }
        }
        let be: Vec<u8> = fortran.iter().flat_map(|v| v.to_be_bytes()).collect();
        let bytes = Writer::new(3)
            .reconstruct(("f4", ">"), &shape, true, &be)
            .finish();
        let mut out = [0.0; 12];
        array_of(&bytes).write_f32(&mut out).unwrap();
        let expected: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(out[..], expected[..]);
    }

    #[test]
    fn write_f32_refuses_non_finite_and_masks() {
        let bytes = Writer::new(5)
            .frombuffer(
                ("f4", "<"),
                &[2, 2],
                false,
                &f32_bytes(&[0.0, 1.0, f32::NAN, 0.5]),
            )
            .finish();
        let err = array_of(&bytes).write_f32(&mut [0.0; 4]).unwrap_err();
        assert!(
            matches!(err, ConvertError::NonFinite { ref position, value } if *position == [1, 0] && value.is_nan())
        );

        let too_big: Vec<u8> = [1e300f64, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = Writer::new(5)
            .frombuffer(("f8", "<"), &[2], false, &too_big)
            .finish();
        let err = array_of(&bytes).write_f32(&mut [0.0; 2]).unwrap_err();
        assert_eq!(
            err,
            ConvertError::NonFinite {
                position: vec![0],
                value: 1e300
            }
        );

        let bytes = Writer::new(5)
            .frombuffer(("u1", "|"), &[2], false, &[0, 1])
            .finish();
        let err = array_of(&bytes).write_f32(&mut [0.0; 2]).unwrap_err();
        assert!(matches!(err, ConvertError::Dtype { .. }));
        let err = array_of(&bytes).write_f32(&mut [0.0; 3]).unwrap_err();
        assert_eq!(
            err,
            ConvertError::OutputLength {
                expected: 2,
                found: 3
            }
        );
    }

    #[test]
    fn masks_of_every_dtype() {
        let c_values = [0u8, 1, 1, 0, 0, 1];
        let f_order = [0usize, 3, 1, 4, 2, 5];
        let fortran: Vec<u8> = f_order.iter().map(|&i| c_values[i]).collect();
        let as_f4: Vec<u8> = fortran
            .iter()
            .flat_map(|&v| f32::from(v).to_be_bytes())
            .collect();
        let as_f8: Vec<u8> = fortran
            .iter()
            .flat_map(|&v| f64::from(v).to_le_bytes())
            .collect();
        for (dtype, data) in [
            (("u1", "|"), fortran.clone()),
            (("b1", "|"), fortran.clone()),
            (("f4", ">"), as_f4),
            (("f8", "<"), as_f8),
        ] {
            let bytes = Writer::new(5)
                .frombuffer(dtype, &[2, 3], true, &data)
                .finish();
            let mut out = [9u8; 6];
            array_of(&bytes).write_u8_mask(&mut out).unwrap();
            assert_eq!(out, c_values, "{dtype:?}");
        }
    }

    #[test]
    fn c_order_little_endian_arrays_take_the_bulk_path_with_the_same_values() {
        let values = [0.0f32, -1.5, 3.25, 1e-30, -0.0, 7.0];
        let as_f4: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let as_f8: Vec<u8> = values
            .iter()
            .flat_map(|&v| f64::from(v).to_le_bytes())
            .collect();
        for (dtype, data) in [(("f4", "<"), as_f4), (("f8", "<"), as_f8)] {
            let bytes = Writer::new(5)
                .frombuffer(dtype, &[2, 3], false, &data)
                .finish();
            let view = array_of(&bytes);
            let mut out = [9f32; 6];
            assert!(view.bulk_f32(&mut out), "{dtype:?}");
            assert_eq!(out.map(f32::to_bits), values.map(f32::to_bits), "{dtype:?}");
        }
        let mask = [0u8, 1, 1, 0, 0, 1];
        let as_f4: Vec<u8> = mask
            .iter()
            .flat_map(|&v| f32::from(v).to_le_bytes())
            .collect();
        for (dtype, data) in [
            (("u1", "|"), mask.to_vec()),
            (("b1", "|"), mask.to_vec()),
            (("f4", "<"), as_f4),
        ] {
            let bytes = Writer::new(5)
                .frombuffer(dtype, &[2, 3], false, &data)
                .finish();
            let mut out = [9u8; 6];
            assert!(array_of(&bytes).bulk_u8_mask(&mut out), "{dtype:?}");
            assert_eq!(out, mask, "{dtype:?}");
        }
    }

    #[test]
    fn non_binary_masks_are_refused() {
        let bytes = Writer::new(5)
            .frombuffer(("u1", "|"), &[3], false, &[0, 2, 1])
            .finish();
        let err = array_of(&bytes).write_u8_mask(&mut [0; 3]).unwrap_err();
        assert_eq!(
            err,
            ConvertError::NotBinary {
                position: vec![1],
                value: 2.0
            }
        );
        let data: Vec<u8> = [0.0f32, 0.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = Writer::new(5)
            .frombuffer(("f4", "<"), &[2], false, &data)
            .finish();
        let err = array_of(&bytes).write_u8_mask(&mut [0; 2]).unwrap_err();
        assert_eq!(
            err,
            ConvertError::NotBinary {
                position: vec![1],
                value: 0.5
            }
        );
    }

    #[test]
    fn array_validation() {
        let payload = f32_bytes(&[0.0; 4]);
        let err = |w: &mut Writer| parse(&w.finish()).unwrap_err();
        assert!(matches!(
            err(Writer::new(5).frombuffer(("f4", "<"), &[2, 3], false, &payload)),
            PickleError::PayloadSize {
                expected: 24,
                found: 16,
                ..
            }
        ));
        assert!(matches!(
            err(Writer::new(5).frombuffer(
                ("f4", "<"),
                &[1 << 31, 1 << 31, 1 << 31, 4],
                false,
                &payload
            )),
            PickleError::ShapeOverflow { .. }
        ));
        assert!(matches!(
            err(Writer::new(5).frombuffer(("f4", "<"), &[1; MAX_NDIM + 1], false, &payload)),
            PickleError::TooManyDimensions { ndim: 65, .. }
        ));
        assert!(matches!(
            err(Writer::new(5).frombuffer(("i8", "<"), &[2], false, &payload)),
            PickleError::UnsupportedDtype { ref typecode, .. } if typecode == "i8"
        ));
        assert!(matches!(
            err(Writer::new(5).frombuffer(("f4", "|"), &[4], false, &payload)),
            PickleError::InvalidByteOrder { ref order, element: ElementType::F4, .. } if order == "|"
        ));
        let mut w = Writer::new(3);
        w.global("numpy._core.numeric", "_frombuffer")
            .op(op::MARK)
            .bytes(&payload);
        w.global("numpy", "dtype")
            .str("f4")
            .op(op::NEWFALSE)
            .op(op::NEWTRUE)
            .op(op::TUPLE3)
            .op(op::REDUCE);
        w.shape(&[4]).str("C").op(op::TUPLE).op(op::REDUCE);
        assert!(matches!(
            err(&mut w),
            PickleError::BadArgument {
                what: "dtype used before its state was set",
                ..
            }
        ));
        let mut w = Writer::new(3);
        w.global("numpy._core.numeric", "_frombuffer")
            .op(op::MARK)
            .bytes(&payload)
            .dtype("f4", "<");
        w.op(op::MARK)
            .int(-4)
            .op(op::TUPLE)
            .str("C")
            .op(op::TUPLE)
            .op(op::REDUCE);
        assert!(matches!(
            err(&mut w),
            PickleError::BadArgument {
                what: "array dimensions must be non-negative integers",
                ..
            }
        ));
    }

    #[test]
    fn build_and_reduce_only_apply_to_numpy() {
        let bytes = Writer::new(2)
            .op(op::EMPTY_DICT)
            .op(op::EMPTY_DICT)
            .op(op::BUILD)
            .finish();
        assert!(matches!(
            parse(&bytes).unwrap_err(),
            PickleError::Unexpected {
                op: "BUILD",
                found: "dict",
                ..
            }
        ));
        let bytes = Writer::new(2)
            .op(op::NONE)
            .op(op::EMPTY_TUPLE)
            .op(op::REDUCE)
            .finish();
        assert!(matches!(
            parse(&bytes).unwrap_err(),
            PickleError::Unexpected {
                op: "REDUCE",
                found: "None",
                ..
            }
        ));
        let bytes = Writer::new(2)
            .global("numpy", "ndarray")
            .op(op::EMPTY_TUPLE)
            .op(op::REDUCE)
            .finish();
        assert!(matches!(
            parse(&bytes).unwrap_err(),
            PickleError::BadArgument { .. }
        ));
        let bytes = Writer::new(3)
            .dtype("f4", "<")
            .op(op::EMPTY_TUPLE)
            .op(op::BUILD)
            .finish();
        assert!(matches!(
            parse(&bytes).unwrap_err(),
            PickleError::Unexpected {
                op: "BUILD",
                found: "numpy.dtype",
                ..
            }
        ));
    }
}
